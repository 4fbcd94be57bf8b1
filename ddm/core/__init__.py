"""What every layer of ddm shares, none of it about diffusion: typed configs from YAML with dotted
overrides (``config``), secrets kept out of logs, files and other islands (``secrets``), logging and
progress lines (``logs``), and test-only fault injection at named points (``faults``). No torch.

May import: nothing of ddm.
"""

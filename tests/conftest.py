import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed: silence the accelerator probe on CPU machines

"""The ``ddm`` command: its parser (``parser``: every command's help, read from source so ``--help``
needs no torch) and what each command does once parsed (``commands``, each importing its code when it
runs). ``ddm = ddm.cli:console`` is the console script; ``python -m ddm.cli`` runs the same.

May import: core, store, distributed, checkpoint, models, data, ensemble, train, eval, launchers, demo.
"""

from ddm.cli.parser import EPILOG, build_parser, console, main

__all__ = ["EPILOG", "build_parser", "console", "main"]

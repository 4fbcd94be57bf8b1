"""``python -m ddm.cli``: the ``ddm`` command."""

from ddm.cli.parser import console

console()

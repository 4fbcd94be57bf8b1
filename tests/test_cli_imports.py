"""``ddm --help`` is fast because parsing imports no command: every command's parser and help come
from light modules (config dataclasses, docstrings read from source), never torch, Ray or DeepSpeed.
Checked by what a fresh process has imported, not by timing (``bench/cli_help.py`` times it)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

HEAVY = ("torch", "ray", "deepspeed", "numpy", "pyarrow")

# In a fresh interpreter: build the parser, print the help of `ddm` and of every command and
# sub-command found in it, then report what was imported.
PROBE = """
import argparse, contextlib, io, json, sys
from ddm.cli import build_parser, main

def commands(parser, prefix):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield [*prefix, name]
                yield from commands(sub, [*prefix, name])

helps = {}
for argv in [[], *commands(build_parser(), [])]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main([*argv, "--help"])
        except SystemExit as e:
            assert e.code == 0, (argv, e.code)
    helps[" ".join(argv)] = out.getvalue()
print(json.dumps({"helps": helps, "modules": sorted(sys.modules)}))
"""


def test_help_of_every_command_imports_no_heavy_stack():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.splitlines()[-1])
    helps, modules = got["helps"], set(got["modules"])
    expected = {"", "run", "demo", "ingest", "partition", "train", "train expert", "train router", "distill"}
    expected |= {"assemble", "sample", "evaluate", "submit", "status", "resume", "models"}
    assert expected <= set(helps), sorted(helps)
    for argv, text in helps.items():
        assert text.startswith(f"usage: ddm {argv}".rstrip()), (argv, text[:200])
    for command in ("run", "demo", "ingest", "partition", "train expert", "sample", "evaluate"):
        assert "Options (key=value):" in helps[command], command  # the config's fields, from its dataclass
    loaded = sorted(m for m in modules if m.split(".")[0] in HEAVY)
    assert not loaded, f"parsing and --help imported {sorted({m.split('.')[0] for m in loaded})}"


def test_config_modules_and_specs_load_without_torch():
    """Run specs, job configs and the commands' settings load (and validate) without torch."""
    probe = (
        "import sys\n"
        "from ddm.core.config import load\n"
        "from ddm.launchers.spec import RunSpec\n"
        "from ddm.demo.config import DemoConfig\n"
        "load(RunSpec, 'launch/digits.yaml', ['seed=1'])\n"
        "load(DemoConfig, 'launch/demo.yaml', ['rules=[top1, threshold:0.2]'])\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]", out.stdout

"""Fast feedback: ``ddm --help`` and every ``ddm <command> --help`` against ``import torch``, each in
a fresh process, measured side by side on this machine.

Parsing and help import no command (no torch, Ray or DeepSpeed): the help text is read from each
command module's source and its config dataclass, whose module is light. The target (issue 22):
every help under half the time of ``import torch``. Each figure is the median wall time of
``--runs`` runs (default 5), the runs of all commands interleaved so that a busy machine slows
them alike.

    .venv/bin/python bench/cli_help.py

The last line printed is a JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_RATIO = 0.5


def commands() -> list[list[str]]:
    """Every command and sub-command of the ddm parser, e.g. ["train", "expert"]."""
    from ddm.cli import build_parser

    out: list[list[str]] = []

    def walk(parser: argparse.ArgumentParser, prefix: list[str]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    out.append([*prefix, name])
                    walk(sub, [*prefix, name])

    walk(build_parser(), [])
    return out


def ddm_command() -> list[str]:
    """The installed ``ddm`` script beside this Python (what users run), else ``python -m ddm.cli``."""
    script = os.path.join(os.path.dirname(sys.executable), "ddm")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "ddm.cli"]


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, timeout=120)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    ddm = ddm_command()
    cases = {"import torch": [sys.executable, "-c", "import torch"], "ddm --help": [*ddm, "--help"]}
    cases |= {f"ddm {' '.join(c)} --help": [*ddm, *c, "--help"] for c in commands()}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.runs):
        for name, cmd in cases.items():
            times[name].append(timed(cmd))
    torch_s = statistics.median(times["import torch"])
    helps = {name: statistics.median(t) for name, t in times.items() if name != "import torch"}
    width = max(map(len, cases))
    print(f"{'':<{width}}  median s  / import torch")
    print(f"{'import torch':<{width}}  {torch_s:8.3f}")
    for name, s in helps.items():
        print(f"{name:<{width}}  {s:8.3f}  {s / torch_s:6.2f}")
    worst = max(helps.values()) / torch_s
    print(
        json.dumps(
            {
                "runs": args.runs,
                "import_torch_s": round(torch_s, 3),
                "help_s": {name: round(s, 3) for name, s in helps.items()},
                "ratio_to_import_torch": {name: round(s / torch_s, 3) for name, s in helps.items()},
                "max_ratio": round(worst, 3),
                "target_ratio": TARGET_RATIO,
                "meets_target": worst < TARGET_RATIO,
            }
        )
    )


if __name__ == "__main__":
    main()

"""``python -m ddm.train [-c spec.yaml] key=value ...``: one training job without Ray.

One process, or under ``torchrun`` / ``deepspeed`` (which set the ranks). The same function
Ray Train workers run (``ddm.train.trainer.train``); prints the job's summary as JSON.
"""

import argparse
import json
import sys

from ddm.config import load
from ddm.job import JobConfig, check_inputs, with_teacher
from ddm.logs import setup_logging
from ddm.train.trainer import train


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ddm.train", description=__doc__.split("\n")[0])
    parser.add_argument("-c", "--config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    setup_logging()
    cfg = with_teacher(load(JobConfig, args.config, args.overrides))
    check_inputs(cfg)
    summary = train(cfg)
    print(json.dumps(summary), file=sys.stdout, flush=True)


if __name__ == "__main__":
    main()

"""``python -m ddm.train [-c spec.yaml] key=value ...``: one training job without Ray.

One process, or under ``torchrun`` / ``deepspeed`` (which set the ranks). The same function
Ray Train workers run (``ddm.train.trainer.train``); prints the job's summary as JSON.
"""

import argparse
import json
import os
import sys

from ddm.core.config import load
from ddm.core.logs import setup_logging, stdout_to_stderr
from ddm.store.lease import LeaseHeld, LeaseLost
from ddm.train.job import JobConfig, check_inputs, with_teacher
from ddm.train.trainer import job_lease, train


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ddm.train", description=__doc__.split("\n")[0])
    parser.add_argument("-c", "--config")
    parser.add_argument("--force", action="store_true", help="take the job folder's lease from a live holder")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        cfg = with_teacher(load(JobConfig, args.config, args.overrides))
        check_inputs(cfg)
        with stdout_to_stderr():  # stdout carries the JSON summary only
            # Under torchrun rank 0 holds the lease; every rank writes fenced by its token.
            if int(os.environ.get("RANK", 0)) == 0:
                with job_lease(cfg, args.force) as token:
                    summary = train(cfg, lease=token, lease_from_rank0=True)
            else:
                summary = train(cfg, lease_from_rank0=True)
    except (LeaseHeld, LeaseLost) as e:  # another writer has the job folder: one line, exit 3
        print(f"python -m ddm.train: error: {e}", file=sys.stderr)
        sys.exit(3)
    except ValueError as e:  # settings that do not fit the store: one line, exit 2 (as `ddm train`)
        print(f"python -m ddm.train: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(summary), file=sys.stdout, flush=True)


if __name__ == "__main__":
    main()

"""``python -m tests.system [--minutes N] [--seed S] [--hosts H]``: the system fault suite.

Prints the seed first, one line per fault, then the report; exits 0 only when the oracle is
satisfied. The same seed draws the same faults, targets, hold times and workload (wall-clock
timing, and so the interleavings, still differ from run to run).
"""

from __future__ import annotations

import argparse
import random
import sys

from tests.system.chaos import FAULTS
from tests.system.netns import available
from tests.system.suite import Options, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.system", description=__doc__)
    parser.add_argument("--minutes", type=float, default=3.0, help="how long faults are drawn")
    parser.add_argument("--seed", type=int, default=None, help="default: a new random seed")
    parser.add_argument("--hosts", type=int, default=4, help="build hosts (at least 3)")
    parser.add_argument(
        "--faults",
        default=",".join(FAULTS),
        help=f"comma-separated kinds to draw from (default: all of {', '.join(FAULTS)})",
    )
    args = parser.parse_args(argv)
    kinds = tuple(k for k in args.faults.split(",") if k)
    unknown = [k for k in kinds if k not in FAULTS]
    if unknown or not kinds:
        parser.error(f"--faults: unknown kind(s) {unknown}; choose from {', '.join(FAULTS)}")
    reason = available()
    if reason is not None:
        print(f"cannot run the system suite: {reason}", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    options = Options(
        seed=seed,
        minutes=args.minutes,
        hosts=max(3, args.hosts),
        faults=tuple(k for k in FAULTS if k in kinds),
    )
    report = run(options)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())

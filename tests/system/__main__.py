"""``python -m tests.system [--minutes N] [--seed S] [--hosts H]``: the system fault suite.

Prints the seed first, one line per fault, then the report; exits 0 only when the oracle is
satisfied. The same seed draws the same faults, targets, hold times and workload (wall-clock
timing, and so the interleavings, still differ from run to run).
"""

from __future__ import annotations

import argparse
import random
import sys

from tests.system.netns import available
from tests.system.suite import Options, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.system", description=__doc__)
    parser.add_argument("--minutes", type=float, default=3.0, help="how long faults are drawn")
    parser.add_argument("--seed", type=int, default=None, help="default: a new random seed")
    parser.add_argument("--hosts", type=int, default=3, help="build hosts (at least 3)")
    args = parser.parse_args(argv)
    reason = available()
    if reason is not None:
        print(f"cannot run the system suite: {reason}", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    report = run(Options(seed=seed, minutes=args.minutes, hosts=max(3, args.hosts)))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())

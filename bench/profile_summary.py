"""Summarise py-spy ``--format raw`` output: where the samples are, by function.

``python -m bench.profile_summary FILE [--top 30] [--filter agent/] [--under Pipeline.process]``
prints self and inclusive sample shares per function, which is how BENCHMARKS.md reports hot
paths.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path


def summarise(path: Path, top: int, only: str | None, under: str | None = None) -> str:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        if under and not any(under in frame for frame in frames):
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    out = [f"{total} samples"]
    for title, table in (("self", own), ("inclusive", inclusive)):
        out.append(f"-- {title} --")
        shown = 0
        for frame, count in table.most_common():
            if only and only not in frame:
                continue
            out.append(f"{100 * count / total:6.1f}%  {frame}")
            shown += 1
            if shown >= top:
                break
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("file")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--filter", help="only show frames containing this text")
    parser.add_argument("--under", help="only count stacks with a frame containing this text")
    args = parser.parse_args()
    print(summarise(Path(args.file), args.top, args.filter, args.under))


if __name__ == "__main__":
    main()

"""The system fault suite as one test: several hosts, two replicas on PostgreSQL, a proxy, and
random faults for a few minutes (``ADW_SYSTEM_MINUTES``, default 4), from a printed seed
(``ADW_SYSTEM_SEED`` repeats one). Its report is printed whether it passes or not.

Needs root (network namespaces, a tmpfs per host) and Debian's PostgreSQL; without them it
skips, and under CI (``CI=true``) it fails instead.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tests.system.netns import available
from tests.system.suite import Options, run


@pytest.mark.timeout(3600)
def test_nothing_is_lost_or_doubled_through_faults_anywhere(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reason = available()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    seed = int(os.environ.get("ADW_SYSTEM_SEED") or random.SystemRandom().randrange(1 << 32))
    minutes = float(os.environ.get("ADW_SYSTEM_MINUTES") or 4.0)
    lines: list[str] = []

    def say(line: str) -> None:
        lines.append(line)
        with capsys.disabled():
            print(line, flush=True)

    with capsys.disabled():
        print()
    report = run(Options(seed=seed, minutes=minutes), work=tmp_path, say=say)
    assert report.faults, "no fault was injected"
    assert report.audit.events_checked > 0, "no event was checked"
    assert report.ok, "\n".join(lines)

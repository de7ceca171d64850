"""What a process costs, read from /proc: CPU seconds, RSS, peak RSS, context switches."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Sample:
    """One reading of a live process."""

    cpu_s: float  # utime + stime of every thread, live or ended (tick resolution)
    cpu_ns: int  # on-CPU time summed over the live threads' schedstat (ns resolution)
    rss_mb: float
    hwm_mb: float
    voluntary_switches: int
    threads: int
    pss_mb: float  # RSS with shared pages (libraries) divided among the processes sharing them


def sample(pid: int) -> Sample:
    """Read /proc/<pid>; raises FileNotFoundError once the process is gone."""
    base = Path(f"/proc/{pid}")
    stat = (base / "stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    cpu_s = (int(fields[11]) + int(fields[12])) / _TICK
    status: dict[str, str] = {}
    for line in (base / "status").read_text().splitlines():
        key, _, value = line.partition(":")
        status[key] = value.strip()
    cpu_ns = 0
    switches = 0
    tasks = list((base / "task").iterdir())
    for task in tasks:
        try:
            cpu_ns += int((task / "schedstat").read_text().split()[0])
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    switches += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError):
            continue
    pss_kb = 0
    try:
        for line in (base / "smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss_kb = int(line.split()[1])
                break
    except OSError:
        pass
    return Sample(
        cpu_s=cpu_s,
        cpu_ns=cpu_ns,
        rss_mb=_kb(status.get("VmRSS", "0 kB")) / 1024,
        hwm_mb=_kb(status.get("VmHWM", "0 kB")) / 1024,
        voluntary_switches=switches,
        threads=len(tasks),
        pss_mb=pss_kb / 1024,
    )


def _kb(value: str) -> int:
    return int(value.split(maxsplit=1)[0])

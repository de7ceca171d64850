"""How early a signal can reach the agent: ``python -m bench.signals [--trials 5]``.

Spawns ``python -m agent run`` (a real process, on an empty run directory, with a backend
port nobody listens on) and sends it SIGHUP a fixed delay after the spawn returned, with and
without the ``env --block-signal=HUP,TERM,INT`` launcher the systemd unit and the image use.
Prints, per delay, how many agents survived the SIGHUP (still running once they logged "agent
started"), how many it killed, and the median and p99 time from spawn to "agent started". A
SIGHUP that arrives before the interpreter runs the agent's first line kills a process started
without the launcher; the figure shows how long that window is on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import percentile
from tests.harness import ROOT, write_config

DELAYS_MS = (0, 5, 10, 20, 50, 100, 200)
LAUNCHER = ["env", "--block-signal=HUP,TERM,INT"]


def _started(log: Path, proc: subprocess.Popen[bytes], timeout: float) -> float | None:
    """Seconds until the agent logged "agent started", or None if it died first."""
    begin = time.monotonic()
    while time.monotonic() - begin < timeout:
        if b'"agent started"' in log.read_bytes():
            return time.monotonic() - begin
        if proc.poll() is not None:
            return None
        time.sleep(0.005)
    return None


def trial(
    work: Path, launcher: bool, delay_ms: float, source: Path = ROOT
) -> tuple[bool, float | None, bool]:
    run_dir = work / "agents" / "55b761f6"
    run_dir.mkdir(parents=True, exist_ok=True)
    config = write_config(
        work / "agent.toml", run_dir, work / "storage", "http://127.0.0.1:9", log={"level": "info"}
    )
    log = work / "agent.log"
    log.write_bytes(b"")
    command = [sys.executable, "-m", "agent", "run", "--config", str(config)]
    with log.open("ab") as err:
        spawned = time.monotonic()
        proc = subprocess.Popen(
            [*LAUNCHER, *command] if launcher else command,
            cwd=source,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    time.sleep(max(0.0, spawned + delay_ms / 1000 - time.monotonic()))
    proc.send_signal(signal.SIGHUP)
    waited = _started(log, proc, 30.0)
    survived = waited is not None and proc.poll() is None
    startup = time.monotonic() - spawned if survived else None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    return survived, startup, code == -signal.SIGHUP


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--out", help="write the results as JSON to this file")
    parser.add_argument(
        "--source",
        type=Path,
        default=ROOT,
        help="run the agent package found in this directory (e.g. an export of another "
        "commit, for comparison)",
    )
    args = parser.parse_args()
    results: dict[str, dict[str, object]] = {}
    print(
        f"{'launcher':<9} {'delay ms':>8} {'survived':>9} {'killed':>7} "
        f"{'start median ms':>16} {'p99':>7}"
    )
    with tempfile.TemporaryDirectory(prefix="adw-bench-signals-") as tmp:
        for launcher in (False, True):
            for delay in DELAYS_MS:
                outcomes = [
                    trial(Path(tmp) / f"{launcher}-{delay}-{i}", launcher, delay, args.source)
                    for i in range(args.trials)
                ]
                alive = sum(1 for ok, _, _ in outcomes if ok)
                killed = sum(1 for _, _, hup in outcomes if hup)
                starts = sorted(s for _, s, _ in outcomes if s is not None)
                median = percentile(starts, 50) * 1000 if starts else float("nan")
                p99 = percentile(starts, 99) * 1000 if starts else float("nan")
                name = "env" if launcher else "none"
                print(
                    f"{name:<9} {delay:>8} {alive:>5}/{args.trials:<3} {killed:>7} "
                    f"{median:>16.0f} {p99:>7.0f}"
                )
                results[f"{name}/{delay}"] = {
                    "survived": alive,
                    "killed_by_sighup": killed,
                    "trials": args.trials,
                    "startup_median_ms": median,
                    "startup_p99_ms": p99,
                }
    print(f"cpus: {os.cpu_count()}, load: {os.getloadavg()[0]:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

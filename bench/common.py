"""Shared parts of the scenarios: run directories, synthetic transcripts, agents, statistics."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bench.procstat import Sample, sample
from bench.receiver import Record
from tests.harness import FIXTURES, ROOT, AgentProcess, write_config

STREAM = FIXTURES / "claude_stream"
REAL = FIXTURES / "real"

#: Real transcripts used to build synthetic ones (each ends with a result line).
BASES = [
    STREAM / "pricehawk_v2.0.55_builder_opus45_32turns.jsonl",
    STREAM / "pricehawk_v2.0.57_builder_sonnet45_13turns.jsonl",
    STREAM / "pricehawk_v2.0.55_planner_sonnet45_3models.jsonl",
    REAL / "tac7iso_raw_output_55b761f6_sdlc_planner_cli2022.jsonl",
]

#: What a finished-looking run directory holds: agent name -> real transcript.
RUN_DIR_TRANSCRIPTS = {
    "issue_classifier": REAL / "tac7iso_raw_output_55b761f6_issue_classifier.jsonl",
    "branch_generator": REAL / "tac6_raw_output_b5b9b7d5_branch_generator_no_result_line.jsonl",
    "sdlc_planner": REAL / "tac7iso_raw_output_55b761f6_sdlc_planner_cli2022.jsonl",
    "sdlc_implementor": STREAM / "pricehawk_v2.0.55_builder_opus45_32turns.jsonl",
    "pr_creator": REAL / "tac6_raw_output_af87dd64_pr_creator_cli2144.jsonl",
}
STATE_FIXTURE = REAL / "tac7iso_adw_state_55b761f6_after_plan_EXTRACTED_from_execution_log.json"


def base_state() -> dict[str, Any]:
    state: dict[str, Any] = json.loads(STATE_FIXTURE.read_text())
    return state


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Exactly what tac-webbuilder does: rewrite in place, no temporary file."""
    with path.open("w") as f:
        json.dump(state, f, indent=2)


def populate_run_dir(run_dir: Path) -> None:
    """A realistic run directory: state, phases and the transcripts of five agents."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_state(run_dir / "adw_state.json", base_state())
    with (run_dir / "completed_phases.json").open("w") as f:
        json.dump({"completed": ["plan"], "current": "build", "last_updated": "2026-01-01"}, f)
    for agent, source in RUN_DIR_TRANSCRIPTS.items():
        (run_dir / agent).mkdir(exist_ok=True)
        shutil.copyfile(source, run_dir / agent / "raw_output.jsonl")


def usage_tokens(usage: dict[str, Any]) -> int:
    """input + output + cache writes + cache reads, as the agent's token totals count them."""
    created = usage.get("cache_creation_input_tokens") or 0
    split = usage.get("cache_creation") or {}
    writes = max(
        created,
        (split.get("ephemeral_5m_input_tokens") or 0)
        + (split.get("ephemeral_1h_input_tokens") or 0),
    )
    return (
        (usage.get("input_tokens") or 0)
        + (usage.get("output_tokens") or 0)
        + writes
        + (usage.get("cache_read_input_tokens") or 0)
    )


def event_tokens(event: dict[str, Any]) -> int:
    tokens = event["data"]["tokens"]
    return int(tokens["input"] + tokens["output"] + tokens["cache_creation"] + tokens["cache_read"])


class _Base:
    """One real transcript split into its init line, its body and its result line."""

    def __init__(self, path: Path) -> None:
        lines = path.read_bytes().splitlines(keepends=True)
        self.init = lines[0]
        self.result = json.loads(lines[-1])
        assert self.result["type"] == "result", path
        self.body = lines[1:-1]
        ids: set[bytes] = set()
        for line in self.body:
            obj = json.loads(line)
            if obj.get("type") == "assistant" and obj["message"].get("id"):
                ids.add(obj["message"]["id"].encode())
        self.ids = sorted(ids)
        self.body_bytes = sum(len(x) for x in self.body)

    def copy(self, tag: str) -> bytes:
        """The body with every message id made unique by ``tag``."""
        out = b"".join(self.body)
        for msg_id in self.ids:
            out = out.replace(b'"' + msg_id + b'"', b'"' + msg_id + b"-" + tag.encode() + b'"')
        return out

    def result_line(self, copies: int) -> tuple[bytes, float]:
        result = dict(self.result)
        total = float(result["total_cost_usd"]) * copies
        result["total_cost_usd"] = total
        usage = {}
        for model, entry in (result.get("modelUsage") or {}).items():
            usage[model] = {**entry, "costUSD": float(entry["costUSD"]) * copies}
        result["modelUsage"] = usage
        return json.dumps(result, separators=(",", ":")).encode() + b"\n", total


def synth_transcript(path: Path, size: int, base_index: int = 0) -> float:
    """Write a transcript of about ``size`` bytes; returns its true cost.

    One attempt: the real init line, the real body repeated with unique message ids, and one
    result line whose ``total_cost_usd`` is the base's times the number of copies.
    """
    base = _Base(BASES[base_index % len(BASES)])
    copies = max(1, round(size / base.body_bytes))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.write(base.init)
        for c in range(copies):
            f.write(base.copy(f"{path.parent.name}{c}"))
        line, total = base.result_line(copies)
        f.write(line)
    return total


def live_lines(count: int, tag: str) -> Iterator[tuple[bytes, int]]:
    """``count`` real assistant lines with usage, each with a unique message id: (line, tokens)."""
    base = _Base(BASES[0])
    pool = []
    for raw in base.body:
        obj = json.loads(raw)
        if obj.get("type") == "assistant":
            tokens = usage_tokens(obj["message"].get("usage") or {})
            if tokens:
                pool.append(obj)
    for i in range(count):
        obj = pool[i % len(pool)]
        obj = {**obj, "message": {**obj["message"], "id": f"msg_bench_{tag}_{i}"}}
        yield (
            json.dumps(obj, separators=(",", ":")).encode() + b"\n",
            usage_tokens(obj["message"]["usage"]),
        )


def init_line() -> bytes:
    return _Base(BASES[0]).init


# -- agents --------------------------------------------------------------------------------


def _write_config(
    path: Path, run_dir: Path, storage: Path, url: str, sections: dict[str, dict[str, Any]]
) -> Path:
    """The harness's ``write_config``, which also takes a ``storage`` section to override."""
    extra = dict(sections)
    storage_keys = extra.pop("storage", {})
    write_config(path, run_dir, storage, url, **extra)
    if storage_keys:
        text = path.read_text()
        lines = [f"{key} = {json.dumps(value)}" for key, value in storage_keys.items()]
        path.write_text(text.replace("[storage]\n", "[storage]\n" + "\n".join(lines) + "\n", 1))
    return path


#: When set (``--profile DIR``), every agent is sampled by py-spy into this directory.
PROFILE_DIR: Path | None = None
#: Config overrides for every agent (``--set section.key=value``), e.g. to compare settings.
OVERRIDES: dict[str, dict[str, Any]] = {}


class Agent:
    """The agent as a real ``python -m agent run`` process, with its config and log."""

    def __init__(
        self, work: Path, run_dir: Path, url: str, name: str = "agent", **sections: Any
    ) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.run_dir = run_dir
        self.storage = work / f"{name}-storage"
        sections.setdefault("log", {"level": "info"})
        for section, values in OVERRIDES.items():
            sections[section] = {**sections.get(section, {}), **values}
        self.config = _write_config(work / f"{name}.toml", run_dir, self.storage, url, sections)
        self.log = work / f"{name}.log"
        self.proc = AgentProcess(self.config, self.log)
        self.adw_id = run_dir.name
        self.started_at = 0.0

    def start(self) -> Agent:
        self.started_at = time.time()
        self.proc.start()
        if PROFILE_DIR is not None:
            self._profile(PROFILE_DIR)
        return self

    def _profile(self, out: Path) -> None:
        """Sample the agent with py-spy (a dev tool, not a dependency) until it exits."""
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        out.mkdir(parents=True, exist_ok=True)
        target = out / f"{self.run_dir.name}-{int(self.started_at)}.txt"
        subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(self.pid),
                "--rate",
                "1000",
                "--format",
                "raw",
                "--output",
                str(target),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    @property
    def pid(self) -> int:
        assert self.proc.proc is not None
        return self.proc.proc.pid

    def sample(self) -> Sample:
        return sample(self.pid)

    def stop(self) -> int:
        try:
            return self.proc.stop(30)
        except subprocess.TimeoutExpired:
            assert self.proc.proc is not None
            self.proc.proc.kill()
            return self.proc.proc.wait(10)


class Child:
    """Any other bench child process (the poller)."""

    def __init__(self, args: Sequence[str]) -> None:
        self.proc = subprocess.Popen([sys.executable, *args], cwd=ROOT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def sample(self) -> Sample:
        return sample(self.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_poller(run_dir: Path, interval: float, url: str, name: str) -> Child:
    return Child(
        [
            "-m",
            "bench.poller",
            "--dir",
            str(run_dir),
            "--interval",
            str(interval),
            "--url",
            url,
            "--name",
            name,
        ]
    )


def events(records: Sequence[Record], kind: str, adw_id: str | None = None) -> list[Record]:
    """Agent events of one type (optionally of one ADW), in arrival order."""
    suffix = f"/event/{kind}"
    return [
        r
        for r in records
        if r.path.endswith(suffix)
        and isinstance(r.body, dict)
        and (adw_id is None or r.body.get("adw_id") == adw_id)
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- statistics ----------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summary_ms(latencies_s: Sequence[float], expected: int) -> dict[str, Any]:
    """median/p95/p99/max in milliseconds, and how many changes were never observed."""
    values = sorted(x * 1000 for x in latencies_s)
    return {
        "n": len(values),
        "missed": expected - len(values),
        "median_ms": round(percentile(values, 50), 2),
        "p95_ms": round(percentile(values, 95), 2),
        "p99_ms": round(percentile(values, 99), 2),
        "max_ms": round(values[-1], 2) if values else math.nan,
    }


def first_at_least(
    arrivals: Sequence[tuple[float, float]], targets: Sequence[tuple[float, float]]
) -> list[float]:
    """For each (write time, value), the delay to the first arrival whose value >= it.

    ``arrivals`` are (arrival time, observed value) in arrival order. Writes never observed are
    left out (the caller reports them as missed).
    """
    running: list[tuple[float, float]] = []
    best = -math.inf
    for at, value in arrivals:
        if value > best:
            best = value
            running.append((at, value))
    out = []
    j = 0
    for written_at, value in sorted(targets, key=lambda t: t[1]):
        while j < len(running) and running[j][1] < value:
            j += 1
        if j == len(running):
            break
        out.append(running[j][0] - written_at)
    return out


def sleep_until(deadline: float) -> None:
    delay = deadline - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def machine() -> dict[str, Any]:
    """Where the numbers come from."""
    info: dict[str, Any] = {"python": sys.version.split()[0], "cpus": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
        info["ram_gb"] = round(int(mem) / 1024 / 1024, 1)
        info["kernel"] = os.uname().release
    except OSError:
        pass
    return info

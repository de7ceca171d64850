"""``adw-agent demo``: the whole pipeline on an embedded default, in about fifteen seconds.

The backend (``adw-agent serve`` on a temporary SQLite file) listens on a free port and its
live page's URL is printed first. A small simulator writes a temporary ADW run the way
tac-webbuilder does (state rewritten in place, sometimes in two halves; phases; an agent
transcript appended line by line, including a retry that truncates it; finally a failed Build:
the orchestrator's execution.log, then ``end_time`` while Build is still current), and the
agent watches it and delivers every change. Each event prints as the backend's WebSocket
announces it; ``--linger`` keeps the page up afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import re
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import orjson

from agent.app import Agent
from agent.config import Config
from agent.receiver import describe

ADW_ID = "demo1234"
MODEL = "claude-sonnet-4-5-20250929"


def _write_in_place(path: Path, data: dict[str, Any], halves: bool = False) -> None:
    """What ``open(path, "w"); json.dump(data, f, indent=2)`` looks like to a reader."""
    text = json.dumps(data, indent=2)
    with path.open("w") as f:
        if halves:
            f.write(text[: len(text) // 2])
            f.flush()
            time.sleep(0.05)
            f.write(text[len(text) // 2 :])
        else:
            f.write(text)


def _assistant(msg_id: str, text: str, tokens: tuple[int, int, int, int]) -> dict[str, Any]:
    inp, out, write, read = tokens
    return {
        "type": "assistant",
        "message": {
            "id": msg_id,
            "model": MODEL,
            "role": "assistant",
            "content": [{"type": "text", "text": text}],
            "usage": {
                "input_tokens": inp,
                "output_tokens": out,
                "cache_creation_input_tokens": write,
                "cache_read_input_tokens": read,
            },
        },
        "session_id": "demo-session",
    }


def _line(f: Any, obj: dict[str, Any]) -> None:
    f.write(orjson.dumps(obj) + b"\n")
    f.flush()


async def simulate(run_dir: Path, pause: float = 0.4) -> None:
    """Write a short, realistic ADW run into ``run_dir``."""
    state: dict[str, Any] = {
        "adw_id": ADW_ID,
        "issue_number": "42",
        "branch_name": None,
        "plan_file": None,
        "issue_class": None,
    }
    _write_in_place(run_dir / "adw_state.json", state)
    await asyncio.sleep(pause)
    state.update(issue_class="/feature", branch_name="feature-issue-42-adw-demo1234-dark-mode")
    _write_in_place(run_dir / "adw_state.json", state, halves=True)
    await asyncio.sleep(pause)
    phases: dict[str, Any] = {"completed": [], "current": "Plan", "last_updated": None}
    _write_in_place(run_dir / "completed_phases.json", phases)
    planner = run_dir / "sdlc_planner"
    planner.mkdir()
    transcript = planner / "raw_output.jsonl"
    init = {"type": "system", "subtype": "init", "session_id": "demo-session", "model": MODEL}
    with transcript.open("wb") as f:
        _line(f, init)
        for i in range(3):
            await asyncio.sleep(pause)
            _line(f, _assistant(f"msg_{i}", "thinking", (3, 8, 2000, 12000 * (i + 1))))
    await asyncio.sleep(pause)
    # The orchestrator retries the agent: the transcript is reopened with "w" and starts over.
    with transcript.open("wb") as f:
        _line(f, init)
        _line(f, _assistant("msg_a", "planning", (5, 400, 3000, 15000)))
        await asyncio.sleep(pause)
        _line(
            f,
            {
                "type": "result",
                "subtype": "success",
                "is_error": False,
                "total_cost_usd": 0.0312,
                "usage": {"input_tokens": 5, "output_tokens": 900},
                "modelUsage": {MODEL: {"costUSD": 0.0312}},
            },
        )
    await asyncio.sleep(pause)
    state["plan_file"] = "specs/issue-42-adw-demo1234-dark-mode.md"
    _write_in_place(run_dir / "adw_state.json", state)
    phases = {"completed": ["Plan"], "current": None, "last_updated": None}
    _write_in_place(run_dir / "completed_phases.json", phases)
    await asyncio.sleep(pause)
    phases["current"] = "Build"
    _write_in_place(run_dir / "completed_phases.json", phases)
    await asyncio.sleep(pause)
    # How tac-webbuilder fails a run today: the orchestrator logs the error in its script folder,
    # then the clean-up writes end_time while the failing phase is still current.
    orchestrator = run_dir / "adw_sdlc_complete_iso"
    orchestrator.mkdir()
    (orchestrator / "execution.log").write_text(
        "2026-11-30 12:00:00 - ERROR - RuntimeError: build failed: tests red\n"
        "2026-11-30 12:00:00 - ERROR - Build phase failed after all retries\n"
    )
    state["end_time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    _write_in_place(run_dir / "adw_state.json", state)


#: The backend's packages; without them the demo says how to install them instead of failing.
BACKEND_MODULES = ("fastapi", "uvicorn", "sqlalchemy", "websockets")
_URL = re.compile(r"https?://[^\s]+")


class DemoError(Exception):
    """Something the demo needs is missing or did not start: one line for the user."""


class Backend:
    """``adw-agent serve`` on a temporary SQLite file, as a child process."""

    def __init__(self, workdir: Path) -> None:
        self.database = f"sqlite:///{workdir / 'backend.db'}"
        self.log_path = workdir / "backend.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""
        self._log: IO[bytes] | None = None
        self._drain: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 30.0) -> str:
        self._log = self.log_path.open("wb")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agent",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--database",
            self.database,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=self._log,
        )
        assert self.proc.stdout is not None
        try:
            first = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except TimeoutError:
            first = b""
        found = _URL.search(first.decode(errors="replace"))
        if found is None:
            await self.stop()
            raise DemoError(f"the backend did not start: {self._last_log_line()}")
        self.url = found.group(0).rstrip("/")
        # Whatever else the service prints must not fill the pipe and stall it.
        self._drain = asyncio.create_task(self._discard(self.proc.stdout))
        return self.url

    @staticmethod
    async def _discard(stream: asyncio.StreamReader) -> None:
        while await stream.read(65536):
            pass

    def _last_log_line(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no output"
        return lines[-1] if lines else "no output"

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10.0)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._drain is not None:
            self._drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain
        if self._log is not None:
            self._log.close()


class Watcher:
    """A client of the backend's WebSocket that prints every applied event."""

    def __init__(self, url: str) -> None:
        self.ws_url = "ws" + url.removeprefix("http") + "/ws/workflows"
        self.counts: dict[str, int] = {}
        self.workflow: dict[str, Any] | None = None
        self.connected = asyncio.Event()
        self.last_message = time.monotonic()

    async def run(self) -> None:
        from websockets.asyncio.client import connect  # noqa: PLC0415

        async with connect(self.ws_url, max_size=None) as ws:
            async for raw in ws:
                self.last_message = time.monotonic()
                self._show(orjson.loads(raw))

    def _show(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        data = message.get("data") or {}
        if kind == "workflows_snapshot":
            self.connected.set()
            return
        if kind == "workflow_deleted" or not isinstance(kind, str):
            return
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if isinstance(data.get("workflow"), dict):
            self.workflow = data["workflow"]
        event = {
            "type": kind,
            "seq": data.get("seq"),
            "source": message.get("source"),
            "data": data,
        }
        print(describe(event), flush=True)

    async def quiet(self, for_s: float = 0.3, at_most: float = 3.0) -> None:
        """Wait until the stream has been quiet a moment: the last events are on their way."""
        deadline = time.monotonic() + at_most
        while time.monotonic() < deadline and time.monotonic() - self.last_message < for_s:
            await asyncio.sleep(0.05)


def _summary(watcher: Watcher) -> str:
    total = sum(watcher.counts.values())
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(watcher.counts.items()))
    line = f"demo finished: {total} events applied ({kinds})"
    w = watcher.workflow
    if w is not None:
        cost = (w.get("cost") or {}).get("current_cost")
        figure = f"${cost:.4f}" if isinstance(cost, int | float) else "no cost yet"
        line += f"; {w.get('adw_id')} is {w.get('status')}, {figure}"
    return line


async def _demo(duration: float, linger: float) -> int:
    missing = [name for name in BACKEND_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise DemoError(
            f"the demo runs the backend, which needs {', '.join(missing)}: "
            "pip install 'adw-agent[backend]'"
        )
    with tempfile.TemporaryDirectory(prefix="adw-agent-demo-") as tmp:
        backend = Backend(Path(tmp))
        url = await backend.start()
        watcher = Watcher(url)
        watching = asyncio.create_task(watcher.run())
        try:
            print(f"backend listening on {url}", flush=True)
            print(f"live page: {url}/", flush=True)
            done, _ = await asyncio.wait(
                [watching, asyncio.create_task(watcher.connected.wait())],
                timeout=10.0,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if watching in done or not watcher.connected.is_set():
                raise DemoError(f"cannot follow the backend's WebSocket at {watcher.ws_url}")
            code = await _simulate_and_watch(Path(tmp), url, duration)
            await watcher.quiet()
            print(_summary(watcher), flush=True)
            if linger > 0:
                print(
                    f"the live page stays up for {linger:g} s: {url}/ (Ctrl-C ends it)", flush=True
                )
                await _linger(linger)
        finally:
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watching
            await backend.stop()
    return code


async def _linger(seconds: float) -> None:
    """Serve until the time is up or SIGINT/SIGTERM arrives (the agent's own handlers are
    gone with the agent, so the demo installs its own for this last stretch)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _simulate_and_watch(tmp: Path, url: str, duration: float) -> int:
    run_dir = tmp / "agents" / ADW_ID
    run_dir.mkdir(parents=True)
    config = Config.model_validate(
        {
            "adw": {"dir": run_dir},
            "backend": {"url": url},
            "storage": {"dir": tmp / "storage"},
            "intervals": {"heartbeat": 5.0},
            "delivery": {"drain_timeout": 3.0},
        }
    )
    agent = Agent(config)
    task = asyncio.create_task(agent.run())
    print(f"agent watching {run_dir}", flush=True)
    started = time.monotonic()
    await asyncio.sleep(0.3)
    await simulate(run_dir)
    # The run's last write needs a moment to be read and delivered, however short the demo.
    await asyncio.sleep(max(1.5, min(duration, 55.0) - (time.monotonic() - started)))
    agent.should_exit.set()
    return await task


def run(duration: float = 8.0, linger: float = 0.0) -> int:
    """Run the demo; returns the exit code."""
    try:
        return asyncio.run(_demo(duration, linger))
    except DemoError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo interrupted", file=sys.stderr)
        return 130

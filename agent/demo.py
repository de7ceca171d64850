"""``adw-agent demo``: the whole pipeline on an embedded default, in about fifteen seconds.

A receiver listens on a free port, a small simulator writes a temporary ADW run the way
tac-webbuilder does (state rewritten in place, sometimes in two halves; phases; an agent
transcript appended line by line, including a retry that truncates it; finally a failure in
error.log), and the agent watches it and delivers every change. Events print as they arrive.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from agent.app import Agent
from agent.config import Config
from agent.receiver import Receiver

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
    (run_dir / "error.log").write_text(
        "Traceback (most recent call last):\n  ...\nRuntimeError: build failed: tests red\n"
    )
    state["status"] = "failed"
    _write_in_place(run_dir / "adw_state.json", state)


async def _demo(duration: float) -> int:
    receiver = Receiver().start()
    print(f"receiver listening on {receiver.url}", flush=True)
    with tempfile.TemporaryDirectory(prefix="adw-agent-demo-") as tmp:
        run_dir = Path(tmp) / "agents" / ADW_ID
        run_dir.mkdir(parents=True)
        config = Config.model_validate(
            {
                "adw": {"dir": run_dir},
                "backend": {"url": receiver.url},
                "storage": {"dir": Path(tmp) / "storage"},
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
        await asyncio.sleep(max(0.0, min(duration, 55.0) - (time.monotonic() - started)))
        agent.should_exit.set()
        code = await task
    receiver.stop()
    kinds: dict[str, int] = {}
    for event in receiver.events:
        kinds[event["type"]] = kinds.get(event["type"], 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    print(f"demo finished: {len(receiver.events)} events received ({summary})", flush=True)
    return code


def run(duration: float = 8.0) -> int:
    """Run the demo; returns the exit code."""
    try:
        return asyncio.run(_demo(duration))
    except KeyboardInterrupt:
        print("demo interrupted", file=sys.stderr)
        return 130

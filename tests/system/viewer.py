"""A reconnecting client of ``adw-agent serve``'s ``/ws/workflows``, run as its own process.

    python -m tests.system.viewer --url WS_URL [--url WS_URL ...] --token-file F --out FILE

It keeps a view ``{adw_id: projection}``: a ``workflows_snapshot`` replaces it, an event
message sets its workflow's projection (unless both carry an integer ``revision`` and the new
one is lower: a message older than what is held), ``workflow_deleted`` removes it. On a close
or an error it connects at once to the next URL (round robin), and retries every 0.2 s while
none answers. Each successful connection prints ``connected URL`` on stdout.

SIGUSR1 writes FILE atomically as JSON (``dump``, ``workflows``, ``connections``,
``messages``, ``connected``, ``url``); SIGTERM and SIGINT write it once more and exit 0.
Bad arguments exit 78 with one line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypedDict

import orjson
import websockets
from websockets.asyncio.client import ClientConnection

EX_CONFIG = 78
#: Pause after a whole round of URLs failed to answer.
RETRY = 0.2
OPEN_TIMEOUT = 2.0
#: Pings notice a peer that vanished without closing (a partition, kill -9 behind a proxy)
#: within seconds rather than the library's default of 40.
PING_INTERVAL = 1.0
PING_TIMEOUT = 3.0
#: A snapshot holds up to 1000 projections (a few MiB): room for it, and a bound on one
#: message.
MAX_MESSAGE = 16 * 1024 * 1024

Projection = dict[str, Any]


class Dump(TypedDict):
    dump: int
    workflows: dict[str, Projection]
    connections: int
    messages: int
    connected: bool
    url: str | None


def config_error(message: str) -> NoReturn:
    print(f"viewer: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EX_CONFIG)


def log(message: str) -> None:
    print(f"viewer: {message}", file=sys.stderr, flush=True)


def _revision(projection: Projection | None) -> int | None:
    value = None if projection is None else projection.get("revision")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def apply(view: dict[str, Projection], message: object) -> str | None:
    """Apply one message to ``view``; the reason it was not applied, or None."""
    if not isinstance(message, dict):
        return "not a JSON object"
    kind = message.get("type")
    data = message.get("data")
    if not isinstance(kind, str) or not isinstance(data, dict):
        return "no type or data"
    if kind == "workflows_snapshot":
        workflows = data.get("workflows")
        if not isinstance(workflows, list):
            return "a snapshot without a workflows list"
        view.clear()
        for projection in workflows:
            if isinstance(projection, dict) and isinstance(projection.get("adw_id"), str):
                view[projection["adw_id"]] = projection
        return None
    adw_id = data.get("adw_id")
    if not isinstance(adw_id, str):
        return f"a {kind} message without adw_id"
    if kind == "workflow_deleted":
        view.pop(adw_id, None)
        return None
    new = data.get("workflow")
    if not isinstance(new, dict):
        return f"a {kind} message without a workflow"
    held, incoming = _revision(view.get(adw_id)), _revision(new)
    if held is not None and incoming is not None and incoming < held:
        return None  # older than what is held: ignored by design, not an error
    view[adw_id] = new
    return None


@dataclass
class Viewer:
    urls: list[str]
    token: str
    out: Path
    view: dict[str, Projection] = field(default_factory=dict)
    dumps: int = 0
    connections: int = 0
    messages: int = 0
    url: str | None = None

    def dump(self) -> None:
        """Write the out file atomically: a reader sees the previous dump or this one."""
        self.dumps += 1
        content: Dump = {
            "dump": self.dumps,
            "workflows": self.view,
            "connections": self.connections,
            "messages": self.messages,
            "connected": self.url is not None,
            "url": self.url,
        }
        tmp = self.out.with_name(f".{self.out.name}.tmp")
        try:
            tmp.write_bytes(orjson.dumps(content))
            os.replace(tmp, self.out)
        except OSError as exc:
            log(f"cannot write {self.out}: {exc.strerror or exc}")

    async def run(self) -> None:
        failures = 0
        index = 0
        while True:
            url = self.urls[index % len(self.urls)]
            index += 1
            before = self.messages
            try:
                async with websockets.connect(
                    url,
                    additional_headers={"Authorization": f"Bearer {self.token}"},
                    open_timeout=OPEN_TIMEOUT,
                    ping_interval=PING_INTERVAL,
                    ping_timeout=PING_TIMEOUT,
                    max_size=MAX_MESSAGE,
                    close_timeout=1.0,
                ) as ws:
                    self.connections += 1
                    self.url = url
                    print(f"connected {url}", flush=True)
                    await self.follow(ws)
                log(f"{url} closed the connection")
                # A server that accepts and closes at once (its database down) counts as not
                # answering, so the retries keep their pace instead of spinning.
                failures = 0 if self.messages > before else failures + 1
            except (OSError, TimeoutError, websockets.WebSocketException) as exc:
                if self.url is not None:
                    log(f"lost {url}: {describe(exc)}")
                    failures = 0 if self.messages > before else failures + 1
                else:
                    failures += 1
                    # Once per outage, not once per retry: a long outage stays quiet.
                    if failures == len(self.urls):
                        log(f"no URL answers (last: {url}: {describe(exc)}); retrying")
            finally:
                self.url = None
            if failures and failures % len(self.urls) == 0:
                await asyncio.sleep(RETRY)

    async def follow(self, ws: ClientConnection) -> None:
        async for raw in ws:
            self.messages += 1
            try:
                message = orjson.loads(raw)
            except orjson.JSONDecodeError:
                log("ignored a message that is not JSON")
                continue
            problem = apply(self.view, message)
            if problem is not None:
                log(f"ignored {problem}")


def describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


async def serve(viewer: Viewer) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, viewer.dump)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    task = asyncio.create_task(viewer.run())
    await stop.wait()
    # Dumped before the connection closes, so the last dump shows the state at the signal.
    viewer.dump()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return 0


def read_token(path: Path) -> str:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "unreadable"
        config_error(f"--token-file {path}: {reason}")
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    config_error(f"--token-file {path}: no token in the file")


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        config_error(message)


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m tests.system.viewer", description="A reconnecting viewer")
    parser.add_argument("--url", action="append", required=True, help="ws:// URL, repeated")
    parser.add_argument("--token-file", required=True, type=Path, help="first line: the token")
    parser.add_argument("--out", required=True, type=Path, help="where SIGUSR1 dumps the view")
    args = parser.parse_args(argv)
    for url in args.url:
        if not url.startswith(("ws://", "wss://")):
            config_error(f"--url {url!r}: expected a ws:// or wss:// URL")
    if not args.out.parent.is_dir():
        config_error(f"--out {args.out}: no such directory {args.out.parent}")
    viewer = Viewer(args.url, read_token(args.token_file), args.out)
    return asyncio.run(serve(viewer))


if __name__ == "__main__":
    sys.exit(main())

"""The live page in a real browser: headless Chromium against a real ``serve`` and real agents.

The agents watch run directories written the way tac-webbuilder writes them; the page must show
what they report (the new branch, the cost as it moves, a failure in red) without a reload, and
find its way back after the backend restarts. Every wait is on the page's DOM.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request
from websockets.http11 import Response as WsResponse

import adw_backend
from adw_backend.broadcast import snapshot_message
from adw_backend.projection import Projection, apply, new_marks, new_projection
from tests.adw_backend import factory
from tests.adw_backend.browser import browser  # noqa: F401  (the fixture)
from tests.adw_backend.conftest import ServeProcess
from tests.adw_backend.factory import view
from tests.adw_backend.loop import LoopServer
from tests.harness import AdwWriter, AgentProcess, fixture_lines, write_config

WAIT = 30.0
RUNNING = "55b761f6"
FAILING = "a1b2c3d4"
BRANCH = "feature-issue-1-adw-55b761f6-nextjs-tailwind-setup"
NOTHING = "\u2013"  # the page's placeholder for a missing value (an en dash)
TRANSCRIPT = "tac7iso_raw_output_55b761f6_sdlc_planner_cli2022.jsonl"


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[Callable[[Path, str], AgentProcess]]:
    started: list[AgentProcess] = []

    def start(run_dir: Path, url: str) -> AgentProcess:
        name = run_dir.name
        config = write_config(
            tmp_path / f"{name}.toml",
            run_dir,
            tmp_path / f"{name}-storage",
            url,
            log={"level": "info"},
        )
        agent = AgentProcess(config, tmp_path / f"{name}.log").start().wait_started()
        started.append(agent)
        return agent

    yield start
    for agent in started:
        if agent.running():
            agent.kill9()


def _state(adw_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "adw_id": adw_id,
        "issue_number": "1",
        "branch_name": None,
        "plan_file": None,
        "issue_class": "/feature",
        "model_set": "base",
        "all_adws": ["adw_plan_iso"],
        **fields,
    }


def _row(adw_id: str) -> str:
    return f'tr[data-adw-id="{adw_id}"]'


def _text(driver: WebDriver, css: str) -> str | None:
    """The element's text, read in one script call: rows are re-rendered as events arrive, so
    an element found in one call may be gone by the next."""
    text: str | None = driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;", css
    )
    return text


def _class(driver: WebDriver, css: str) -> str:
    found: str | None = driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.className : null;", css
    )
    return found or ""


def _wait(driver: WebDriver, what: str, condition: Callable[[WebDriver], object]) -> Any:
    try:
        return WebDriverWait(driver, WAIT, poll_frequency=0.05).until(condition)
    except Exception as exc:
        rows = [r.text for r in driver.find_elements(By.CSS_SELECTOR, "#rows tr")]
        raise AssertionError(f"the page never showed {what}; rows: {rows}") from exc


def _live(driver: WebDriver) -> bool:
    return driver.find_element(By.TAG_NAME, "body").get_attribute("data-connection") == "live"


def _money(driver: WebDriver, value: float) -> str:
    """The cost as the page formats it, computed by the page's own JavaScript number."""
    text: str = driver.execute_script("return '$' + arguments[0].toFixed(4);", value)
    return text


def _workflow(serve: ServeProcess, adw_id: str) -> dict[str, Any]:
    with serve.client() as client:
        answer = client.get(f"/api/v1/workflows/{adw_id}")
        answer.raise_for_status()
        found: dict[str, Any] = answer.json()
        return found


def test_page_shows_branch_cost_and_failure_live(
    tmp_path: Path,
    start_serve: Callable[..., ServeProcess],
    agents: Callable[[Path, str], AgentProcess],
    browser: WebDriver,  # noqa: F811
) -> None:
    serve = start_serve(f"sqlite:///{tmp_path / 'backend.db'}")
    running = AdwWriter(tmp_path / "agents" / RUNNING)
    running.state(_state(RUNNING))
    running.phases([], "Plan")
    failing = AdwWriter(tmp_path / "agents" / FAILING)
    failing.state(_state(FAILING, issue_number="7", branch_name="bug-issue-7-adw-a1b2c3d4-fix"))
    failing.phases(["Plan"], "Build")
    agents(running.run_dir, serve.url)
    agents(failing.run_dir, serve.url)

    browser.get(serve.url + "/")
    _wait(
        browser,
        "a live connection",
        _live,
    )
    _wait(browser, "both rows", lambda d: len(d.find_elements(By.CSS_SELECTOR, "#rows tr")) == 2)
    assert _text(browser, f'{_row(RUNNING)} [data-field="branch"]') == NOTHING

    # The branch arrives the way the orchestrator writes it: in place, in two halves.
    running.state(_state(RUNNING, branch_name=BRANCH), halves=True)
    _wait(
        browser,
        "the new branch",
        lambda d: _text(d, f'{_row(RUNNING)} [data-field="branch"]') == BRANCH,
    )

    # The planner's transcript grows line by line: the cost moves, then settles on the result.
    lines = fixture_lines(TRANSCRIPT)
    running.start_attempt("sdlc_planner")
    running.append("sdlc_planner", *lines[:8])
    _wait(
        browser,
        "a first cost",
        lambda d: (
            (_text(d, f'{_row(RUNNING)} [data-field="cost"]') or NOTHING)
            not in (NOTHING, "$0.0000")
        ),
    )
    first = _text(browser, f'{_row(RUNNING)} [data-field="cost"]')
    running.append("sdlc_planner", *lines[8:])
    final = _wait(
        browser,
        "the final cost",
        lambda d: (w := _workflow(serve, RUNNING))["cost"]["final"] and w,
    )
    assert final["cost"]["current_cost"] == pytest.approx(0.2192615)
    expected = _money(browser, final["cost"]["current_cost"])
    _wait(
        browser,
        f"the cost {expected}",
        lambda d: _text(d, f'{_row(RUNNING)} [data-field="cost"]') == expected,
    )
    assert first != expected
    assert browser.find_elements(By.CSS_SELECTOR, f"{_row(RUNNING)} svg.chart path.line")

    # A failure turns the row red and keeps it, with the error's last line.
    failing.error_log("Traceback (most recent call last):\nRuntimeError: build failed: tests red\n")
    _wait(
        browser,
        "the failed row",
        lambda d: "failed" in _class(d, _row(FAILING)),
    )
    assert _text(browser, f'{_row(FAILING)} [data-field="status"]') == "failed"
    assert (
        _text(browser, f'{_row(FAILING)} [data-field="error"]')
        == "RuntimeError: build failed: tests red"
    )
    assert _text(browser, f'{_row(RUNNING)} [data-field="status"]') == "running"
    assert "stale" not in (_text(browser, f'{_row(RUNNING)} [data-field="agent"]') or "")

    shot = tmp_path / "live-page.png"
    assert browser.save_screenshot(str(shot))
    print(f"screenshot: {shot}")


def test_page_reconnects_after_the_backend_restarts(
    tmp_path: Path,
    start_serve: Callable[..., ServeProcess],
    browser: WebDriver,  # noqa: F811
) -> None:
    database = f"sqlite:///{tmp_path / 'backend.db'}"
    first = start_serve(database)
    port = first.url.rsplit(":", 1)[1]
    browser.get(first.url + "/")
    _wait(
        browser,
        "a live connection",
        _live,
    )

    first.stop()
    _wait(
        browser,
        "the lost connection",
        lambda d: not _live(d),
    )

    second = start_serve(database, args=["--port", port])
    with second.client() as client:
        event = {
            "type": "workflow_update",
            "event_id": "page-reconnect-1",
            "adw_id": RUNNING,
            "seq": 1,
            "timestamp": "2026-11-30T12:00:00.000Z",
            "source": "event",
            "data": {"changed": ["branch_name"], **_state(RUNNING, branch_name=BRANCH)},
        }
        assert client.post("/api/v1/event/workflow_update", json=event).status_code == 200
    _wait(
        browser,
        "the connection again",
        _live,
    )
    _wait(
        browser,
        "the workflow posted after the restart",
        lambda d: _text(d, f'{_row(RUNNING)} [data-field="branch"]') == BRANCH,
    )


def test_page_passes_its_read_token_to_the_websocket(
    tmp_path: Path,
    start_serve: Callable[..., ServeProcess],
    browser: WebDriver,  # noqa: F811
) -> None:
    tokens = tmp_path / "read-tokens"
    tokens.write_text("page-read-token\n")
    serve = start_serve(
        f"sqlite:///{tmp_path / 'backend.db'}", args=["--read-token-file", str(tokens)]
    )
    with httpx.Client(base_url=serve.url) as client:
        assert client.get("/api/v1/workflows").status_code == 401

    browser.get(serve.url + "/")
    _wait(browser, "a refused connection", lambda d: "disconnected" in (_text(d, "#conn") or ""))
    assert not _live(browser)

    browser.get(serve.url + "/?token=page-read-token")
    _wait(
        browser,
        "a live connection",
        _live,
    )


def test_page_shows_hostile_text_as_text(
    tmp_path: Path,
    start_serve: Callable[..., ServeProcess],
    browser: WebDriver,  # noqa: F811
) -> None:
    serve = start_serve(f"sqlite:///{tmp_path / 'backend.db'}")
    hostile = '<img src=x onerror="window.__owned = 1">'
    browser.get(serve.url + "/")
    _wait(browser, "a live connection", _live)
    with serve.client() as client:
        event = {
            "type": "workflow_update",
            "event_id": "page-hostile-1",
            "adw_id": "evil0001",
            "seq": 1,
            "timestamp": "2026-11-30T12:00:00.000Z",
            "source": "event",
            "data": {
                "changed": ["branch_name", "issue_number"],
                **_state("evil0001", branch_name=hostile, issue_number="<b>9</b>"),
            },
        }
        assert client.post("/api/v1/event/workflow_update", json=event).status_code == 200
    _wait(
        browser,
        "the hostile branch as text",
        lambda d: _text(d, f'{_row("evil0001")} [data-field="branch"]') == hostile,
    )
    assert _text(browser, f'{_row("evil0001")} [data-field="issue"]') == "#<b>9</b>/feature"
    assert not browser.find_elements(By.CSS_SELECTOR, "#rows img, #rows b")
    assert browser.execute_script("return window.__owned === undefined;")


def test_page_marks_a_stale_heartbeat(
    tmp_path: Path,
    start_serve: Callable[..., ServeProcess],
    browser: WebDriver,  # noqa: F811
) -> None:
    serve = start_serve(f"sqlite:///{tmp_path / 'backend.db'}")
    now = datetime.now(UTC)
    with serve.client() as client:
        for adw, age in (("fresh001", timedelta(seconds=5)), ("stale001", timedelta(minutes=10))):
            event = {
                "type": "agent_status",
                "event_id": f"page-heartbeat-{adw}",
                "adw_id": adw,
                "seq": 1,
                "timestamp": (now - age).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "source": "event",
                "data": {
                    "state": "running",
                    "version": "0.1.0",
                    "adw_id": adw,
                    "outbox_depth": 3,
                    "oldest_undelivered_age": 12.0,
                    "last_delivery_error": None,
                },
            }
            assert client.post("/api/v1/event/agent_status", json=event).status_code == 200
    browser.get(serve.url + "/")
    _wait(browser, "both rows", lambda d: _text(d, f'{_row("stale001")} [data-field="agent"]'))
    stale = _text(browser, f'{_row("stale001")} [data-field="agent"]') or ""
    fresh = _text(browser, f'{_row("fresh001")} [data-field="agent"]') or ""
    assert stale.startswith("stale")
    assert "heartbeat 10 min ago" in stale
    assert not fresh.startswith("stale")
    assert "3 queued" in fresh


class _ScriptedBackend(LoopServer):
    """The page's own file and a WebSocket that sends ``messages`` in the order given (the
    order a client of one replica may receive them in), on a real socket."""

    def __init__(self, messages: list[dict[str, Any]]) -> None:
        super().__init__()
        self.messages = [orjson.dumps(m).decode() for m in messages]
        self.url = ""

    async def _run(self) -> None:
        page = (Path(adw_backend.__file__).parent / "static" / "index.html").read_text()

        def process_request(connection: ServerConnection, request: Request) -> WsResponse | None:
            if request.path == "/ws/workflows":
                return None
            answer = connection.respond(HTTPStatus.OK, page)
            del answer.headers["Content-Type"]
            answer.headers["Content-Type"] = "text/html; charset=utf-8"
            return answer

        async def handler(connection: ServerConnection) -> None:
            for text in self.messages:
                await connection.send(text)
            await connection.wait_closed()

        async with serve(handler, "127.0.0.1", 0, process_request=process_request) as server:
            port = next(iter(server.sockets)).getsockname()[1]
            self.url = f"http://127.0.0.1:{port}"
            self._started.set()
            await self._stopped()


def _event_message(projection: Projection, seq: int) -> dict[str, Any]:
    return {
        "type": "workflow_update",
        "data": {"adw_id": projection["adw_id"], "seq": seq, "epoch": 0, "workflow": projection},
        "timestamp": projection["updated_at"],
        "source": "event",
    }


def test_page_keeps_the_newest_revision_when_an_older_one_arrives_after_it(
    browser: WebDriver,  # noqa: F811
) -> None:
    folded = [new_projection(RUNNING)]
    marks = new_marks()
    for seq, branch in enumerate(["feat-first", "feat-older", "feat-newest"], start=1):
        ev = factory.workflow_update(RUNNING, seq, **_state(RUNNING, branch_name=branch))
        projection, marks = apply(folded[-1], marks, view(ev))
        folded.append(projection)
    first, older, newest = folded[1:]
    assert (first["revision"], older["revision"], newest["revision"]) == (1, 2, 3)
    other, _ = apply(
        new_projection(FAILING), new_marks(), view(factory.workflow_update(FAILING, 1))
    )
    messages = [
        snapshot_message([first], "2026-11-30T12:00:00.000Z"),
        _event_message(newest, 3),
        _event_message(older, 2),
        # Messages are applied in order: once this one shows, the older one has been seen.
        _event_message(other, 1),
    ]
    with _ScriptedBackend(messages) as backend:
        browser.get(backend.url + "/")
        _wait(browser, "the last message's row", lambda d: _text(d, _row(FAILING)) is not None)
        assert _text(browser, f'{_row(RUNNING)} [data-field="branch"]') == "feat-newest"

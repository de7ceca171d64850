"""Shared fixtures: a real backend, a run directory, and a way to start the agent on them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import AdwWriter, AgentProcess, Backend, write_config


@pytest.fixture
def backend() -> Iterator[Backend]:
    server = Backend()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    path = tmp_path / "repo" / "agents" / "55b761f6"
    path.mkdir(parents=True)
    return path


@pytest.fixture
def writer(run_dir: Path) -> AdwWriter:
    return AdwWriter(run_dir)


@pytest.fixture
def start_agent(
    tmp_path: Path, run_dir: Path, backend: Backend
) -> Iterator[Callable[..., AgentProcess]]:
    """Start the agent as a process; every agent started is killed at the end of the test."""
    started: list[AgentProcess] = []

    def start(
        url: str | None = None, env: dict[str, str] | None = None, **sections: Any
    ) -> AgentProcess:
        config = write_config(
            tmp_path / "agent.toml", run_dir, tmp_path / "storage", url or backend.url, **sections
        )
        agent = AgentProcess(config, tmp_path / "agent.log", env).start()
        started.append(agent)
        return agent

    yield start
    for agent in started:
        if agent.running():
            assert agent.proc is not None
            agent.proc.kill()
            agent.proc.wait(10)

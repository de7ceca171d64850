"""A stop or reload request sent 10 ms after the agent is spawned, started the way the shipped
systemd unit and image start it (``env --block-signal=HUP,TERM,INT``): SIGHUP must not kill
it, and SIGTERM must end it cleanly (exit 0), never by the signal's default action."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from tests.harness import AgentProcess, Backend

StartAgent = Callable[..., AgentProcess]
LAUNCHER = ["env", "--block-signal=HUP,TERM,INT"]

pytestmark = pytest.mark.skipif(shutil.which("env") is None, reason="needs coreutils env")


def spawn_and_signal(start_agent: StartAgent, sig: int) -> AgentProcess:
    agent = start_agent()
    # start_agent has already spawned the process; restart it under the launcher.
    assert agent.proc is not None
    agent.proc.kill()
    agent.proc.wait(10)
    agent.prefix = LAUNCHER
    agent.start()
    time.sleep(0.01)  # the delay under test, not a wait for a condition
    agent.signal(sig)
    return agent


def test_sighup_10ms_after_spawn_does_not_kill_the_agent(
    backend: Backend, start_agent: StartAgent
) -> None:
    agent = spawn_and_signal(start_agent, signal.SIGHUP)
    agent.wait_started()
    # Taken as a reload request, since the config may have changed after it was read.
    agent.wait_log(lambda entry: entry.get("message") == "configuration reloaded")
    backend.wait_for(lambda events: any(e["type"] == "agent_status" for e in events))
    assert agent.running()
    assert agent.stop() == 0


def test_sigterm_10ms_after_spawn_is_a_clean_stop(start_agent: StartAgent) -> None:
    agent = spawn_and_signal(start_agent, signal.SIGTERM)
    assert agent.proc is not None
    assert agent.proc.wait(30) == 0


def test_sighup_during_a_short_command_keeps_its_default_action(
    start_agent: StartAgent,
) -> None:
    """Only ``run`` takes the signals over: other commands behave as before."""
    agent = start_agent()
    assert agent.proc is not None
    agent.proc.kill()
    agent.proc.wait(10)
    proc = subprocess.Popen(
        [*LAUNCHER, sys.executable, "-m", "agent", "receive", "--port", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == -signal.SIGTERM

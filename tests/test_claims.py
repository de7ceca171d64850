"""Tests for agent.claims: one agent per run directory on a host, and the recorded epoch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.claims import claim
from agent.errors import ConfigError


def test_a_directory_is_claimed_once_until_released(tmp_path: Path) -> None:
    run_dir = tmp_path / "agents" / "55b761f6"
    run_dir.mkdir(parents=True)
    locks = tmp_path / "locks"
    first = claim(locks, run_dir, key="adw.dir")
    with pytest.raises(ConfigError) as caught:
        claim(locks, run_dir, key="adw.dir")
    message = str(caught.value)
    assert message.startswith(f"adw.dir: {run_dir} is already watched by another agent")
    assert f"(pid {os.getpid()})" in message
    assert "\n" not in message
    first.release()
    claim(locks, run_dir, key="adw.dir").release()


def test_the_claim_follows_the_directory_not_its_name(tmp_path: Path) -> None:
    run_dir = tmp_path / "agents" / "55b761f6"
    run_dir.mkdir(parents=True)
    locks = tmp_path / "locks"
    held = claim(locks, run_dir, key="adw.dir")
    link = tmp_path / "same"
    link.symlink_to(run_dir)
    with pytest.raises(ConfigError, match="already watched"):
        claim(locks, link, key="adw.dir")
    # Nothing is ever written into the run directory.
    assert list(run_dir.iterdir()) == []
    held.release()


def test_the_epoch_of_a_stream_outlives_the_claim(tmp_path: Path) -> None:
    run_dir = tmp_path / "55b761f6"
    run_dir.mkdir()
    locks = tmp_path / "locks"
    held = claim(locks, run_dir, key="adw.dir")
    assert held.recorded_epoch("55b761f6") is None
    held.record_epoch("55b761f6", 1234)
    held.release()
    again = claim(locks, run_dir, key="adw.dir")
    assert again.recorded_epoch("55b761f6") == 1234
    again.release()


def test_an_unusable_lock_directory_is_a_configuration_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"^storage\.lock_dir: cannot use"):
        claim(tmp_path / "file" / "locks", tmp_path, key="adw.dir")

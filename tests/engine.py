"""A real Docker engine for the deployment tests: the ``docker`` command, whether an engine
answers, and the image built from the repository's Dockerfile.

The engine is the one ``DOCKER_HOST`` (or the default socket) names. Without one the tests that
need it are skipped, except under ``CI=true``, where a missing engine is a failure: CI starts
its own (``.ci/dockerd``) and makes the base image (``.ci/base-image``).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness import ROOT

#: The local stand-in for python:3.11-slim that the Dockerfile is built on.
BASE_IMAGE = os.environ.get("ADW_TEST_PYTHON_IMAGE", "adw-agent-base:bookworm")


def docker(
    *args: str,
    check: bool = True,
    timeout: float = 120,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """``docker ARGS``; with ``check``, a non-zero exit fails the test with docker's message."""
    done = subprocess.run(
        ["docker", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        input=stdin,
        env={**os.environ, **(env or {})},
    )
    if check and done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)}: {done.returncode}\n{done.stderr}")
    return done


def engine_problem() -> str | None:
    """Why no engine can be used, or None."""
    if shutil.which("docker") is None:
        return "the docker command is not installed"
    try:
        done = docker("version", "--format", "{{.Server.Version}}", check=False, timeout=20)
    except subprocess.TimeoutExpired:
        return "the Docker engine does not answer"
    if done.returncode != 0:
        return f"no Docker engine is reachable: {done.stderr.strip()[:200]}"
    return None


def require_engine() -> None:
    """Skip without an engine; under CI=true, fail instead."""
    problem = engine_problem()
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the engine tests: {problem}")
        pytest.skip(problem)


def ensure_base_image() -> None:
    """Make the base image with .ci/base-image if the engine does not have it."""
    if docker("image", "inspect", BASE_IMAGE, check=False).returncode == 0:
        return
    made = subprocess.run(
        [str(ROOT / ".ci" / "base-image"), BASE_IMAGE],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert made.returncode == 0, made.stderr


def build(context: Path, tag: str, **build_args: str) -> None:
    """``docker build`` with the classic builder (BuildKit fetches its parts from a registry)
    and the host's network (the build installs packages)."""
    args = ["build", "--network=host", "--tag", tag]
    for name, value in build_args.items():
        args += ["--build-arg", f"{name}={value}"]
    docker(*args, str(context), timeout=900, env={"DOCKER_BUILDKIT": "0"})


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def wait_until(
    what: str, check: Callable[[], bool], describe: Callable[[], str], timeout: float
) -> None:
    """Poll ``check`` until it holds; fail with ``describe()`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; {describe()}")
        time.sleep(0.2)

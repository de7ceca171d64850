"""The agent's image, built once per session for the tests that run it on a Docker engine."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.engine import BASE_IMAGE, build, docker, ensure_base_image, require_engine, unique
from tests.harness import ROOT


@pytest.fixture(scope="session")
def agent_image() -> Iterator[str]:
    """The repository's Dockerfile, unchanged, built on the local base (``PYTHON_IMAGE``)."""
    require_engine()
    ensure_base_image()
    tag = unique("adw-agent:test")
    args = {"PYTHON_IMAGE": BASE_IMAGE}
    if os.environ.get("PIP_INDEX_URL"):
        args["PIP_INDEX_URL"] = os.environ["PIP_INDEX_URL"]
    build(ROOT, tag, **args)
    try:
        yield tag
    finally:
        docker("image", "rm", "--force", tag, check=False)

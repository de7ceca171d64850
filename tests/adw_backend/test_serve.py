"""``adw-agent serve`` as a command: the first line, and a clear error without the extra."""

from __future__ import annotations

import subprocess
import sys

from tests.harness import ROOT

BLOCK_FASTAPI = (
    "import sys; sys.modules['fastapi'] = None; "
    "from agent.cli import main; sys.exit(main(['serve', '--port', '0']))"
)


def test_without_the_backend_extra_one_line_says_how_to_install_it() -> None:
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_FASTAPI],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "adw-agent serve: the backend is not installed (fastapi is missing); "
        "install it with: pip install 'adw-agent[backend]'"
    ]
    assert result.stdout == ""

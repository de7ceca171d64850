"""Host-wide claims: one agent per run directory, and what its stream was.

Two agents reporting one run directory would send every event twice under different ids, with
clashing seqs. So an agent claims each directory it watches with an exclusive ``flock`` on a
file in the lock directory (``storage.lock_dir``), named by the directory's device and inode:
the agent never writes into a run directory, and a renamed or bind-mounted directory is still
the same claim. The kernel releases a claim when its process ends, however it ends. Claims are
per host: agents on two hosts that share a run directory over a network filesystem do not see
each other's claims.

The claim file also keeps, per ADW, the epoch of the stream last reported for that directory.
A store that was lost, reset or replaced starts a new stream: the agent sees the recorded epoch
differ, says so loudly, and gives the new stream a larger epoch than the recorded one. The lock
directory is normally on a tmpfs (``/run``): the record lasts until the host restarts.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
from pathlib import Path

import orjson

from agent.errors import ConfigError, StorageError

DEFAULT_LOCK_DIR = Path("/run/adw-agent")


def lock_dir(configured: Path | None) -> Path | None:
    """The lock directory: as configured; else /run/adw-agent; else systemd's
    ``$RUNTIME_DIRECTORY``; else ``adw-agent-<uid>`` in the temporary directory (claims that
    only this user's agents see are still claims). None when none of them can be written (a
    sandbox that allows neither): the agent then runs without claims, and says so."""
    if configured is not None:
        return configured
    with contextlib.suppress(OSError):
        DEFAULT_LOCK_DIR.mkdir(mode=0o755, exist_ok=True)
    if _writable(DEFAULT_LOCK_DIR):
        return DEFAULT_LOCK_DIR
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime and _writable(Path(runtime)):
        return Path(runtime)
    try:
        fallback = Path(tempfile.gettempdir()) / f"adw-agent-{os.getuid()}"
    except OSError:  # no usable temporary directory
        return None
    return fallback


def _writable(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


class Claim:
    """An exclusive claim on one directory; the descriptor holds it until :meth:`release`."""

    def __init__(self, fd: int, path: Path, directory: Path) -> None:
        self._fd = fd
        self.path = path
        self.directory = directory

    def recorded_epoch(self, adw_id: str) -> int | None:
        """The epoch last recorded for this directory's ADW, or None."""
        return _epochs(self._fd).get(adw_id)

    def record_epoch(self, adw_id: str, epoch: int) -> None:
        """Remember the stream's epoch."""
        self.write({adw_id: epoch})

    def write(self, epochs: dict[str, int]) -> None:
        """Best effort: a claim that cannot be written only loses the detection of a replaced
        store, and the holder's pid in the message a second agent gets."""
        body = orjson.dumps({"pid": os.getpid(), "dir": str(self.directory), "epochs": epochs})
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, body, 0)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def claim(lock_root: Path, directory: Path, *, key: str) -> Claim:
    """Claim ``directory`` for this process.

    Raises :class:`~agent.errors.ConfigError` naming ``key`` when another agent holds it (exit
    78: a second agent on one run directory is a deployment mistake), and
    :class:`~agent.errors.ConfigError` too when the lock directory cannot be used, and
    :class:`~agent.errors.StorageError` when locking fails otherwise.
    """
    try:
        st = os.stat(directory)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot stat {directory}: {exc.strerror}") from None
    path = lock_root / f"{st.st_dev}-{st.st_ino}.lock"
    try:
        lock_root.mkdir(parents=True, exist_ok=True, mode=0o755)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise ConfigError(
            f"storage.lock_dir: cannot use {lock_root}: {exc.strerror}; set storage.lock_dir "
            "to a directory the agent can write"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _holder(fd)
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise ConfigError(
                f"{key}: {directory} is already watched by another agent{holder} (claim "
                f"{path}); one agent per run directory"
            ) from None
        raise StorageError(f"cannot lock {path}: {exc.strerror}") from None
    held = Claim(fd, path, directory)
    held.write(_epochs(fd))  # says who holds it, keeping what was recorded
    return held


def _holder(fd: int) -> str:
    try:
        data = orjson.loads(os.pread(fd, 1 << 16, 0) or b"{}")
    except (OSError, orjson.JSONDecodeError):
        return ""
    pid = data.get("pid") if isinstance(data, dict) else None
    return f" (pid {pid})" if isinstance(pid, int) else ""


def _epochs(fd: int) -> dict[str, int]:
    try:
        data = orjson.loads(os.pread(fd, 1 << 16, 0) or b"{}")
    except (OSError, orjson.JSONDecodeError):
        return {}
    epochs = data.get("epochs") if isinstance(data, dict) else None
    if not isinstance(epochs, dict):
        return {}
    return {str(k): v for k, v in epochs.items() if isinstance(v, int)}

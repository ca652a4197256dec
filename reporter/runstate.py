"""Which `reporter run` owns a var/ folder: var/run.lock (flock'ed, holding its PID) and var/broker.url.

The lock is held for the whole life of a `reporter run`, and the kernel drops it when that process
ends however it ends (SIGKILL included). So a var/broker.url is trusted only while its run.lock is
held: one left behind by a dead run is recognised as stale, and a lock file left behind never
blocks the next run. Where flock does not exist (not POSIX), nothing is locked and the marker is
trusted as before.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from reporter.errors import ReporterError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = "run.lock"
"""File in var/ that a running `reporter run` holds locked; it contains that run's PID."""

MARKER_NAME = "broker.url"
"""File in var/ with the URL of the Redis a running `reporter run` started."""

ACQUIRE_PATIENCE = 2.0
"""Seconds a starting run retries the lock: other commands hold it shared for an instant to test it."""


class AlreadyRunning(ReporterError):
    """Another `reporter run` holds this var/ folder."""

    def __init__(self, var_dir: Path, pid: int | None) -> None:
        self.pid = pid
        who = f"pid {pid}" if pid else "its pid is not recorded yet"
        super().__init__(
            f"another `reporter run` is already running in this folder ({who}; it holds {var_dir / LOCK_NAME}); "
            "stop it first (Ctrl-C in its terminal, or kill it), or start this one in another folder"
        )


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class RunLock:
    """The exclusive lock of one `reporter run` on its var/ folder; released when the process ends."""

    def __init__(self, var_dir: Path) -> None:
        self.path = var_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock and write our PID into it; raise AlreadyRunning naming the holder's PID."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise ReporterError(
                f"cannot create {self.path}: {exc.strerror or exc}; {self.path.parent} must be a folder you can write to"
            ) from None
        if fcntl is not None:
            deadline = time.monotonic() + ACQUIRE_PATIENCE
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        os.close(fd)
                        raise AlreadyRunning(self.path.parent, _read_pid(self.path)) from None
                    time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        """Empty the PID and drop the lock (the file stays: removing it would race with a new run)."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None


def holder(var_dir: Path) -> int | None:
    """PID of the `reporter run` holding VAR_DIR (0 if its PID is not written yet); None if none does."""
    path = var_dir / LOCK_NAME
    if fcntl is None:
        return _read_pid(path) or 0
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        # Shared and non-blocking: it fails only while a run holds it exclusively, and it is dropped
        # at once (a starting run retries for ACQUIRE_PATIENCE seconds).
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_pid(path) or 0
    finally:
        os.close(fd)
    return None


@dataclass(frozen=True)
class Marker:
    """What var/broker.url says, and whether the run that wrote it is alive."""

    url: str
    pid: int | None
    """The live run's PID (0 if not yet written); None when the marker is stale."""
    last_pid: int | None = None
    """For a stale marker: the PID the dead run had written, if it is still in run.lock."""

    @property
    def live(self) -> bool:
        return self.pid is not None


def read_marker(var_dir: Path) -> Marker | None:
    """var/broker.url with its liveness; None if there is none."""
    try:
        url = (var_dir / MARKER_NAME).read_text().strip()
    except OSError:
        return None
    if not url:
        return None
    pid = holder(var_dir)
    return Marker(url, pid, None if pid is not None else _read_pid(var_dir / LOCK_NAME))


def write_marker(var_dir: Path, url: str) -> None:
    """Record the broker URL of this (locked) run for other commands in the folder."""
    (var_dir / MARKER_NAME).write_text(url + "\n")


def remove_marker(var_dir: Path) -> None:
    (var_dir / MARKER_NAME).unlink(missing_ok=True)

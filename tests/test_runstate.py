"""var/run.lock and var/broker.url: one `reporter run` per folder, and a marker trusted only while its run lives."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from reporter import runstate

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")


def test_the_lock_is_exclusive_names_its_holder_and_is_free_again_when_released(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runstate, "ACQUIRE_PATIENCE", 0.3)
    var = tmp_path / "var"
    assert runstate.holder(var) is None  # no folder, no lock file: nobody
    first = runstate.RunLock(var)
    first.acquire()
    assert runstate.holder(var) == os.getpid()
    # flock belongs to the open file, so a second open in this very process conflicts as another process would.
    with pytest.raises(runstate.AlreadyRunning) as caught:
        runstate.RunLock(var).acquire()
    assert caught.value.pid == os.getpid()
    assert f"(pid {os.getpid()}; it holds {var / 'run.lock'})" in str(caught.value)
    assert runstate.holder(var) == os.getpid()  # the refused attempt changed nothing
    first.release()
    assert runstate.holder(var) is None
    assert (var / "run.lock").read_text() == ""  # a clean stop leaves no PID to blame
    second = runstate.RunLock(var)
    second.acquire()
    assert runstate.holder(var) == os.getpid()
    second.release()


def test_a_lock_file_left_by_a_killed_run_blocks_nothing_and_names_it_as_stale(tmp_path: Path) -> None:
    var = tmp_path / "var"
    var.mkdir()
    (var / "run.lock").write_text("31337\n")  # a SIGKILLed run: its PID written, its lock gone with it
    runstate.write_marker(var, "redis://127.0.0.1:40001/0")
    assert runstate.holder(var) is None
    assert runstate.read_marker(var) == runstate.Marker("redis://127.0.0.1:40001/0", None, 31337)
    lock = runstate.RunLock(var)
    lock.acquire()
    try:
        marker = runstate.read_marker(var)
        assert marker == runstate.Marker("redis://127.0.0.1:40001/0", os.getpid())
        assert marker.live
    finally:
        lock.release()
    runstate.remove_marker(var)
    assert runstate.read_marker(var) is None


def test_a_holding_run_whose_pid_is_not_written_yet_still_counts_as_live(tmp_path: Path) -> None:
    import fcntl

    var = tmp_path / "var"
    var.mkdir()
    fd = os.open(var / "run.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a starting run holds before it writes its PID
        runstate.write_marker(var, "redis://127.0.0.1:40002/0")
        marker = runstate.read_marker(var)
        assert marker is not None and marker.live and marker.pid == 0
    finally:
        os.close(fd)


def test_a_var_that_cannot_hold_the_lock_is_a_clear_error(tmp_path: Path) -> None:
    from reporter.errors import ReporterError

    (tmp_path / "var").write_text("not a folder")
    with pytest.raises(ReporterError) as caught:
        runstate.RunLock(tmp_path / "var").acquire()
    assert (
        str(caught.value)
        == f"cannot create {tmp_path / 'var' / 'run.lock'}: File exists; {tmp_path / 'var'} must be a folder you can write to"
    )
    assert runstate.holder(tmp_path / "var") is None and runstate.read_marker(tmp_path / "var") is None

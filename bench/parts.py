"""The real parts a benchmark runs against: a private Redis, an SMTP sink, a private PostgreSQL
database, generated projects (schedules.yaml with N reports) and worker subprocesses.

Nothing here imports reporter: it only starts processes and writes files, so it survives refactors.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any

from reporter.runner import free_port, stop

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get("REPORTER_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """SIGTERM the process group, wait, then SIGKILL what is left (pool children included)."""
    stop(proc, "a bench process", timeout)


# ----------------------------------------------------------------------------- Redis


@contextmanager
def private_redis(folder: Path) -> Iterator[str]:
    """A redis-server on a random free port, keeping nothing on disk; yields its URL."""
    port = free_port()
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not on PATH")
    log = open(folder / "redis.log", "wb")  # the child writes to it as long as it runs; closed after it stops
    proc = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(folder)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"redis-server did not start; see {folder / 'redis.log'}") from None
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop_process(proc, 5)
        log.close()


def flush_redis(url: str) -> None:
    """Empty the private Redis between figures, so one figure's queued tasks never reach another's worker."""
    import redis

    client = redis.Redis.from_url(url)
    client.flushall()
    client.close()


# ----------------------------------------------------------------------------- SMTP


@dataclass
class Sink:
    """An aiosmtpd server that accepts everything and notes when each message arrived and its subject."""

    host: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    arrivals: list[tuple[float, str]] = field(default_factory=list)
    """(time.time() at acceptance, Subject) per message"""
    raw: list[bytes] = field(default_factory=list)
    keep_raw: int = 1
    """How many messages to keep whole (a baseline resends the same bytes)."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"smtp://{self.host}:{self.port}"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        content: bytes = envelope.content
        subject = str(BytesHeaderParser().parsebytes(content).get("Subject", ""))
        with self.lock:
            self.arrivals.append((time.time(), subject))
            if len(self.raw) < self.keep_raw:
                self.raw.append(content)
        return "250 accepted"

    def count(self) -> int:
        with self.lock:
            return len(self.arrivals)

    def clear(self) -> None:
        with self.lock:
            self.arrivals.clear()
            self.raw.clear()

    def wait_for(self, count: int, timeout: float) -> float:
        """Block until COUNT messages arrived; return time.time() of the COUNT-th. TimeoutError after TIMEOUT s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.arrivals) >= count:
                    return self.arrivals[count - 1][0]
            time.sleep(0.01)
        raise TimeoutError(f"{self.count()} of {count} messages arrived in {timeout:.0f} s")


@contextmanager
def smtp_sink() -> Iterator[Sink]:
    """A local SMTP server in a thread, counting what it accepts."""
    from aiosmtpd.controller import Controller

    sink = Sink()
    controller = Controller(sink, hostname=sink.host, port=sink.port)
    controller.start()
    try:
        yield sink
    finally:
        controller.stop()


# ----------------------------------------------------------------------------- PostgreSQL


@contextmanager
def pg_database() -> Iterator[str]:
    """A private PostgreSQL database for one figure (from REPORTER_TEST_PG_URL's server), dropped afterwards."""
    import sqlalchemy as sa

    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"reporter_bench_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield sa.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(
                sa.text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}' AND pid <> pg_backend_pid()")
            )
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


def pg_available() -> str | None:
    """None if the PostgreSQL server answers, else why not."""
    import sqlalchemy as sa

    try:
        engine = sa.create_engine(PG_ADMIN_URL)
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
        engine.dispose()
    except Exception as exc:  # noqa: BLE001 - any failure means "not available"
        return f"{type(exc).__name__}: {exc}"
    return None


# ----------------------------------------------------------------------------- projects

SMALL_TEMPLATE = """<!doctype html><html><body><h1>{{ report.name }}</h1>
<table>{% for row in rows %}<tr><td>{{ row.region }}</td><td>{{ row.amount }}</td></tr>{% endfor %}</table>
</body></html>
"""

SMALL_SEED = """CREATE TABLE small (region TEXT, amount REAL);
INSERT INTO small VALUES ('North', 1.5), ('South', 2.25), ('East', 3.0);
"""


@dataclass(frozen=True)
class Spec:
    """One generated report: name, cron, kind (sales: the shipped PDF report; small: a tiny HTML one), recipients."""

    name: str
    cron: str = "0 * * * *"
    kind: str = "small"
    recipients: tuple[str, ...] = ("r0@example.com",)


@dataclass
class Project:
    """A folder with a schedules.yaml, templates and a SQLite warehouse, ledger and outbox."""

    root: Path
    ledger_url: str

    @property
    def config(self) -> Path:
        return self.root / "schedules.yaml"

    def env(self, broker_url: str, smtp_url: str | None, **extra: str) -> dict[str, str]:
        """The environment a reporter process runs this project with."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("REPORTER_")}
        env.update(
            REPORTER_CONFIG=str(self.config),
            REPORTER_DATABASE_URL=self.ledger_url,
            REPORTER_BROKER_URL=broker_url,
            REPORTER_OUTBOX=str(self.root / "outbox"),
            WAREHOUSE_URL=f"sqlite:///{self.root / 'warehouse.db'}",
        )
        if smtp_url:
            env["REPORTER_SMTP_URL"] = smtp_url
        env.update(extra)
        return env


def recipients(count: int, prefix: str = "r") -> tuple[str, ...]:
    """COUNT distinct addresses."""
    return tuple(f"{prefix}{i}@example.com" for i in range(count))


def make_project(folder: Path, specs: Sequence[Spec], dispatch_cron: str = "1 * * * *", ledger_url: str | None = None) -> Project:
    """Write schedules.yaml with SPECS, the shipped templates and sample warehouse, into a new folder under FOLDER.

    The rate limit is lifted (a million a second): the figures measure the work, not the limiter.
    """
    root = folder / f"project-{uuid.uuid4().hex[:6]}"
    (root / "examples").mkdir(parents=True)
    shutil.copytree(ROOT / "templates", root / "templates")
    (root / "templates" / "small.html").write_text(SMALL_TEMPLATE)
    shutil.copy(ROOT / "examples" / "warehouse.sql", root / "examples" / "warehouse.sql")
    (root / "small.sql").write_text(SMALL_SEED)
    lines = [
        "timezone: UTC",
        "defaults:",
        '  sender: "Reports <reports@example.com>"',
        '  rate_limit: "1000000/s"',
        "  soft_time_limit: 300",
        "  time_limit: 360",
        "  max_retries: 1",
        "datasources:",
        "  warehouse:",
        '    url: "${WAREHOUSE_URL}"',
        "    seed: examples/warehouse.sql",
        "  small:",
        f'    url: "sqlite:///{root / "small.db"}"',
        "    seed: small.sql",
        "beat:",
        "  email_reports.schedule_hourly:",
        "    task: email_reports.schedule_hourly",
        f'    cron: "{dispatch_cron}"',
        "reports:",
    ]
    for spec in specs:
        lines += [f"  {spec.name}:", f'    schedule: "{spec.cron}"', f"    recipients: [{', '.join(spec.recipients)}]"]
        if spec.kind == "sales":
            # The shipped sales-daily report: a query, a chart, HTML + PDF + CSV.
            lines += [
                "    subject: \"Sales {{ slot.isoformat() }}: {{ rows | sum(attribute='amount') | number(2) }} EUR\"",
                "    template: sales_daily.html",
                "    text_template: sales_daily.txt",
                "    query:",
                "      datasource: warehouse",
                '      sql: "select id, region, product, quantity, amount from orders where day = :day order by id"',
                '      params: {day: "{{ slot.date().isoformat() }}"}',
                "    formats: [html, pdf, csv]",
                "    charts:",
                "      revenue: {type: bar, title: Revenue by region, x: region, y: amount}",
            ]
        else:
            lines += [
                '    subject: "Small {{ slot.isoformat() }}"',
                "    template: small.html",
                "    query:",
                "      datasource: small",
                '      sql: "select region, amount from small"',
                "    formats: [html]",
            ]
    (root / "schedules.yaml").write_text("\n".join(lines) + "\n")
    return Project(root, ledger_url or f"sqlite:///{root / 'ledger.db'}")


# ----------------------------------------------------------------------------- processes


@dataclass
class Proc:
    """A reporter (or celery) subprocess in its own session, with its output in a log file."""

    proc: subprocess.Popen[bytes]
    log: Path
    started: float

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float, marker: str = " ready.") -> float:
        """Seconds from start until the log shows MARKER (a Celery worker's ready line)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if marker in self.output():
                return time.monotonic() - self.started
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.log.name} exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"{self.log.name} not ready in {timeout:.0f} s:\n{self.output()[-3000:]}")

    def stop(self) -> None:
        stop_process(self.proc)

    def pool_children(self) -> list[int]:
        """PIDs of the leaf processes under this one (a prefork worker's pool processes)."""
        leaves: list[int] = []
        todo = [self.proc.pid]
        while todo:
            pid = todo.pop()
            kids = _children(pid)
            if kids:
                todo.extend(kids)
            elif pid != self.proc.pid:
                leaves.append(pid)
        return sorted(leaves)


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def rss_mib(pid: int) -> float:
    """Resident memory of PID in MiB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def start(args: Sequence[str], env: dict[str, str], log: Path, cwd: Path = ROOT) -> Proc:
    """Start `python ARGS…` (e.g. -m reporter worker) in its own session."""
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, *args], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True)
    return Proc(proc, log, time.monotonic())


@contextmanager
def running(args: Sequence[str], env: dict[str, str], log: Path, cwd: Path = ROOT) -> Iterator[Proc]:
    """`start`, stopped when the block ends."""
    proc = start(args, env, log, cwd)
    try:
        yield proc
    finally:
        proc.stop()


def worker_args(concurrency: int, *extra: str) -> list[str]:
    """`reporter worker` as a user starts it, quiet about gossip it does not need here."""
    return [
        "-m",
        "reporter",
        "worker",
        "-c",
        str(concurrency),
        *extra,
        "--without-mingle",
        "--without-gossip",
        "-n",
        f"bench-{uuid.uuid4().hex[:6]}@%h",
    ]

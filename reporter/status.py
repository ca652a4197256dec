"""Health checks and `reporter status`: which workers answer, which beat leads and when it last
ticked, what waits in the queues, and the latest failed deliveries.

The checks read the broker: worker nodes answer Celery's control `ping`, and beat leaves its lock and a
heartbeat in Redis (see beat.py). Each check is one line and an exit code, for container health checks.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from reporter import defaults
from reporter.errors import BrokerUnavailable, ReporterError
from reporter.settings import is_redis_url, mask_url, redis_client_url

BEAT_MAX_AGE = 60.0
"""Seconds since beat's last tick after which `reporter health beat` fails (it ticks every few seconds)."""

PING_TIMEOUT = 2.0
"""Seconds to wait for workers' answers to a control ping."""

FLOWER_PORT = defaults.FLOWER_PORT
"""Flower's port when FLOWER_PORT is unset (Flower's own default)."""

# kombu's Redis transport keeps a queue's messages of priority P > 0 in the list "<queue>\x06\x16<P>".
PRIORITY_SEPARATOR = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)
UNACKED_KEY = "unacked"
"""kombu's Redis hash of messages delivered to a worker and not yet acknowledged (running, or waiting for their eta)."""


@dataclass(frozen=True)
class Check:
    """The outcome of one health check: passed or not, and why, in one line."""

    ok: bool
    reason: str
    broker_down: bool = False
    """The check failed because the broker did not answer (the caller can say what to do)."""


def parse_stamp(raw: bytes | str | None) -> dict[str, Any] | None:
    """A JSON object stored by beat, or None if missing or unreadable."""
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def tick_age(tick: dict[str, Any], now: datetime) -> float | None:
    """Seconds since the tick's `at`, or None if it has no readable time."""
    try:
        at = datetime.fromisoformat(str(tick["at"]))
    except (KeyError, ValueError):
        return None
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return max((now - at).total_seconds(), 0.0)  # a clock a little ahead of beat's is not a problem


def judge_tick(raw: bytes | str | None, now: datetime, max_age: float = BEAT_MAX_AGE) -> Check:
    """Is beat alive, judged by the heartbeat RAW (the tick key's value) at NOW?"""
    if raw is None:
        return Check(False, f"no beat heartbeat in the broker (key {defaults.BEAT_TICK_KEY}): no beat is leading")
    tick = parse_stamp(raw)
    age = tick_age(tick, now) if tick is not None else None
    if tick is None or age is None:
        return Check(False, f"unreadable beat heartbeat in {defaults.BEAT_TICK_KEY}: {raw!r}")
    who = tick.get("id", "?")
    if age > max_age:
        return Check(False, f"beat {who} last ticked {age:.0f}s ago (more than {max_age:.0f}s)")
    return Check(True, f"beat {who} ticked {age:.1f}s ago")


def redis_client(broker_url: str) -> Any:
    """A Redis client on the broker, which holds beat's lock and heartbeat and the queues."""
    import redis

    if not is_redis_url(broker_url):
        raise ReporterError(f"beat's lock and heartbeat live in a Redis broker; the broker is {mask_url(broker_url)}")
    return redis.Redis.from_url(redis_client_url(broker_url), socket_timeout=5, socket_connect_timeout=5)


def beat_health(broker_url: str, max_age: float = BEAT_MAX_AGE, now: datetime | None = None) -> Check:
    """Has the leading beat ticked within MAX_AGE seconds?"""
    import redis

    client = redis_client(broker_url)
    try:
        raw = client.get(defaults.BEAT_TICK_KEY)
    except redis.RedisError as exc:
        return Check(False, f"broker {mask_url(broker_url)} unreachable: {exc}", broker_down=True)
    finally:
        client.close()
    return judge_tick(raw, now or datetime.now(UTC), max_age)


def ping(broker_url: str, nodes: list[str] | None = None, timeout: float = PING_TIMEOUT) -> list[str]:
    """Names of the worker nodes that answer a control ping (NODES only, if given), sorted.

    Raises ReporterError when the broker cannot be reached.
    """
    from celery import Celery

    app = Celery("reporter-status", broker=broker_url, set_as_current=False)
    try:
        with app.connection_for_write() as conn:
            try:
                conn.ensure_connection(max_retries=1, interval_start=0, timeout=timeout)
            except Exception as exc:  # noqa: BLE001 - kombu raises many kinds when the broker is down
                raise BrokerUnavailable(f"broker {mask_url(broker_url)} unreachable: {exc}") from None
            replies = app.control.ping(destination=nodes or None, timeout=timeout, connection=conn, limit=len(nodes) if nodes else None)
    finally:
        app.close()
    return sorted(name for reply in replies or [] for name in reply)


def worker_health(broker_url: str, nodes: list[str] | None = None, hostname: str | None = None, timeout: float = PING_TIMEOUT) -> Check:
    """Does a worker on this host (or each of NODES) answer a ping?"""
    try:
        answered = ping(broker_url, nodes, timeout)
    except ReporterError as exc:
        return Check(False, str(exc), broker_down=isinstance(exc, BrokerUnavailable))
    if nodes:
        missing = sorted(set(nodes) - set(answered))
        if missing:
            return Check(False, f"no answer within {timeout:g}s from {', '.join(missing)}")
        return Check(True, f"{', '.join(answered)} answered")
    host = hostname or socket.gethostname()
    mine = [name for name in answered if name.partition("@")[2] == host]
    if not mine:
        others = f" (others answered: {', '.join(answered)})" if answered else ""
        return Check(False, f"no worker on {host} answered within {timeout:g}s{others}")
    return Check(True, f"{', '.join(mine)} answered")


def flower_health(port: int = FLOWER_PORT, host: str = "127.0.0.1", timeout: float = 5.0) -> Check:
    """Does Flower answer its /healthcheck?"""
    url = f"http://{host}:{port}/healthcheck"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = response.read(64).decode(errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        return Check(False, f"Flower at {url} did not answer: {exc}")
    return Check(body.strip() == "OK", f"Flower at {url} answered {body.strip()!r}")


def queue_depth(client: Any, queue: str) -> int:
    """Messages waiting in QUEUE's Redis lists (every priority)."""
    names = [queue if p == 0 else f"{queue}{PRIORITY_SEPARATOR}{p}" for p in PRIORITY_STEPS]
    return sum(int(client.llen(name)) for name in names)


@dataclass
class Status:
    """What `reporter status` shows."""

    broker: str
    workers: list[str] = field(default_factory=list)
    leader: dict[str, Any] | None = None
    leader_ttl: int | None = None
    tick: dict[str, Any] | None = None
    tick_age: float | None = None
    beat: Check | None = None
    queues: dict[str, int] = field(default_factory=dict)
    unacked: int = 0
    failures: list[Any] = field(default_factory=list)
    disk_version: str | None = None
    """The version of schedules.yaml and templates on disk, if they pass every check."""
    disk_problems: list[str] = field(default_factory=list)
    """What is wrong with them otherwise (file:line field: message)."""

    @property
    def config_running(self) -> str | None:
        """The configuration version the leading beat runs (from its heartbeat)."""
        return None if self.tick is None else self.tick.get("config")

    def as_dict(self) -> dict[str, Any]:
        return {
            "broker": self.broker,
            "workers": self.workers,
            "beat": {
                "ok": self.beat.ok if self.beat else False,
                "reason": self.beat.reason if self.beat else None,
                "leader": self.leader,
                "leader_ttl": self.leader_ttl,
                "tick": self.tick,
                "tick_age": self.tick_age,
            },
            "config": {
                "running": self.config_running,
                "since": (self.tick or {}).get("config_since"),
                "disk_version": self.disk_version,
                "disk_problems": self.disk_problems,
            },
            "queues": self.queues,
            "unacked": self.unacked,
            "failures": [
                {"report": r.report, "slot": r.slot.isoformat(), "recipient": r.recipient, "attempts": r.attempts, "error": r.error}
                for r in self.failures
            ],
        }


def collect(broker_url: str, database_url: str, failures: int = 5, max_age: float = BEAT_MAX_AGE, timeout: float = PING_TIMEOUT) -> Status:
    """Ask the broker and the ledger; raises ReporterError if the broker cannot be reached."""
    import redis

    from reporter.ledger import Ledger

    status = Status(broker=mask_url(broker_url))
    status.workers = ping(broker_url, timeout=timeout)
    client = redis_client(broker_url)
    try:
        status.leader = parse_stamp(client.get(defaults.BEAT_LEADER_KEY))
        ttl = int(client.ttl(defaults.BEAT_LEADER_KEY))
        status.leader_ttl = ttl if ttl >= 0 else None
        raw_tick = client.get(defaults.BEAT_TICK_KEY)
        status.queues = {q: queue_depth(client, q) for q in (defaults.QUEUE_URGENT, defaults.QUEUE_SCHEDULED)}
        status.unacked = int(client.hlen(UNACKED_KEY))
    except redis.RedisError as exc:
        raise BrokerUnavailable(f"broker {mask_url(broker_url)} unreachable: {exc}") from None
    finally:
        client.close()
    now = datetime.now(UTC)
    status.tick = parse_stamp(raw_tick)
    status.tick_age = tick_age(status.tick, now) if status.tick else None
    status.beat = judge_tick(raw_tick, now, max_age)
    ledger = Ledger.from_url(database_url)
    try:
        status.failures = ledger.rows(status="failed", limit=failures)
    finally:
        ledger.dispose()
    return status


def render(status: Status) -> str:
    """The text `reporter status` prints."""
    lines = [f"broker:   {status.broker}"]
    lines.append(f"workers:  {len(status.workers)} answered" + (f": {', '.join(status.workers)}" if status.workers else " (none running?)"))
    if status.leader:
        ttl = f", lock expires in {status.leader_ttl}s" if status.leader_ttl is not None else ""
        lines.append(
            f"beat:     leader {status.leader.get('id', '?')} on {status.leader.get('host', '?')} "
            f"pid {status.leader.get('pid', '?')} since {status.leader.get('since', '?')}{ttl}"
        )
    else:
        lines.append("beat:     no leader holds the lock")
    if status.beat is not None:
        lines.append(f"          {'ok' if status.beat.ok else 'NOT OK'}: {status.beat.reason}")
    lines.extend(config_lines(status))
    lines.append("queues:   " + ", ".join(f"{q} {n} waiting" for q, n in status.queues.items()))
    lines.append(f"          {status.unacked} held by workers (running, or waiting for their slot)")
    if status.failures:
        lines.append(f"latest failures ({len(status.failures)}):")
        for r in status.failures:
            error = (r.error or "").replace("\n", " ")[:100]
            lines.append(f"  {r.slot.strftime('%Y-%m-%d %H:%M')}  {r.report}  {r.recipient}  tries={r.attempts}  {error}")
    else:
        lines.append("latest failures: none")
    return "\n".join(lines)


def config_lines(status: Status) -> list[str]:
    """'configuration: running <version> from <time>; the file on disk …', and the file's problems."""
    running, since = status.config_running, (status.tick or {}).get("config_since", "?")
    head = f"configuration: running {running} from {since}" if running else "configuration: no leading beat says which version it runs"
    if status.disk_problems:
        lines = [f"{head}; the file on disk has {len(status.disk_problems)} problem(s), so it is not applied:"]
        return lines + [f"  {p}" for p in status.disk_problems]
    if status.disk_version == running or running is None:
        return [f"{head}; the file on disk is version {status.disk_version}" if running is None else f"{head}, as on disk"]
    return [f"{head}; the file on disk is version {status.disk_version}, valid: processes apply it within a minute"]

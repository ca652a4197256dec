"""Exactly once under failure, with real processes killed for real.

Each test runs a private Redis, `celery worker` (prefork) and `celery beat` subprocesses, and an aiosmtpd
inbox that records when each message arrives. Nothing is mocked.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from reporter import defaults
from reporter.ledger import Ledger, Row
from reporter.runner import free_port, redis_server_binary, start_redis, stop
from reporter.schedule import isoformat
from tests.conftest import Inbox, Project, Worker, serving, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


# ----------------------------------------------------------------------------- helpers


@dataclass
class TimedInbox(Inbox):
    """An inbox that notes when each message arrived, and can be slow to answer DATA."""

    arrivals: list[float] = field(default_factory=list)
    delay: float = 0.0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.delay:
            await asyncio.sleep(self.delay)
        reply = await super().handle_DATA(server, session, envelope)
        if reply.startswith("250"):
            with self.lock:
                self.arrivals.append(time.monotonic())
        return reply


@pytest.fixture
def timed_inbox() -> Iterator[TimedInbox]:
    with serving(TimedInbox("127.0.0.1", free_port())) as box:
        yield box


def delivered(inbox: Inbox) -> Counter[tuple[str, str]]:
    """(slot, recipient) -> number of emails received."""
    with inbox.lock:
        return Counter(
            (m["X-Reporter-Slot"], rcpt) for m, (_, rcpts) in zip(inbox.messages, inbox.envelopes, strict=True) for rcpt in rcpts
        )


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def project_yaml(root: Path, reports: str, dispatch_cron: str = "1 * * * *", **defaults_: Any) -> str:
    settings = {"rate_limit": "50/s", "soft_time_limit": 10, "time_limit": 15, "max_retries": 5, "beat_lock_timeout": 30} | defaults_
    lines = "\n".join(f"  {k}: {json.dumps(v)}" for k, v in settings.items())
    return f"""\
timezone: UTC
defaults:
  sender: "Reports <reports@example.com>"
{lines}
datasources:
  warehouse:
    url: "sqlite:///{root}/warehouse.db"
    seed: orders.sql
beat:
  email_reports.schedule_hourly:
    task: email_reports.schedule_hourly
    cron: "{dispatch_cron}"
reports:
{reports}
"""


def dispatch_past_days(broker: str, days: int) -> tuple[datetime, datetime]:
    """Run the dispatcher over the DAYS up to now: a daily report's past slots in it are due at once.

    The window ends now, so the dispatch watermark is now too and beat's start-up catch-up finds
    nothing missed."""
    end = datetime.now(UTC).replace(microsecond=0)
    start = end - timedelta(days=days)
    app = Celery("test-publisher", broker=broker, set_as_current=False)
    app.send_task(
        "email_reports.schedule_hourly",
        kwargs={"scheduled_for": isoformat(start), "window_end": isoformat(end)},
        queue="reporter.scheduled",
    )
    return start, end


SLOW_DATA = """
import random, time

def rows(slot, report):
    time.sleep(random.uniform(0.2, 1.2))  # a warehouse query that takes a while
    return [{"region": "Atlantis", "amount": 1234.5}, {"region": "Mu", "amount": slot.day}]
"""


# ----------------------------------------------------------------------------- crashes


def kill_one(workers: list[Worker], rng: random.Random, kills: dict[str, int], restart: Callable[[], Worker]) -> list[Worker]:
    """SIGKILL, at random, a pool process of a live worker (7 in 10) or a whole worker, which RESTART replaces;
    count it in KILLS ('child' or 'worker'); return the workers now running."""
    victim = rng.choice([w for w in workers if w.proc.poll() is None])
    if rng.random() < 0.7 and (kids := children(victim.proc.pid)):
        os.kill(rng.choice(kids), signal.SIGKILL)
        kills["child"] += 1
        return workers
    os.killpg(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait()
    kills["worker"] += 1
    return [w for w in workers if w is not victim] + [restart()]


@pytest.mark.slow(minutes=2)
def test_sigkill_children_and_whole_workers_every_recipient_gets_exactly_one(
    make_project: Callable[..., Project],
    fresh_redis: str,
    timed_inbox: TimedInbox,
    start_worker: Callable[..., Worker],
    start_beat: Callable[..., Any],
) -> None:
    recipients = [f"r{i}@example.com" for i in range(4)]
    days = 8  # 8 slots x 4 recipients = 32 deliveries
    project = make_project(yaml_text="placeholder")
    (project.root / "slow.py").write_text(SLOW_DATA)
    report = f"""\
  chaos:
    schedule: "0 7 * * *"
    subject: "Chaos {{{{ slot.strftime('%d') }}}}"
    template: simple.html
    function: slow:rows
    formats: [html, pdf]
    recipients: {json.dumps(recipients)}
"""
    project.config.write_text(project_yaml(project.root, report, rate_limit="20/s"))
    timed_inbox.delay = 0.15  # a slow server widens the window in which a kill lands mid-send
    env = project.env(REPORTER_BROKER_URL=fresh_redis, REPORTER_SMTP_URL=timed_inbox.url)
    workers = [start_worker(env, concurrency=2), start_worker(env, concurrency=2)]
    start_beat(env)  # for the sweep that finds deliveries of a worker killed outright
    started = time.monotonic()
    _, until = dispatch_past_days(fresh_redis, days)
    ledger = Ledger.from_url(project.db_url)

    def chaos_rows(status: str | None = None) -> list[Row]:
        # The past days only: between 06:00 and 07:00 UTC beat's start-up dispatch also records today's coming 07:00.
        return ledger.rows(report="chaos", status=status, until=until)

    wait_until(lambda: len(chaos_rows()) == days * len(recipients), 60, "the dispatcher to record 32 rows")

    rng = random.Random(20261121)
    kills = {"child": 0, "worker": 0}
    in_flight_at_kill: set[tuple[str, str]] = set()
    while time.monotonic() - started < 40 and not all(r.status == "sent" for r in chaos_rows()):
        time.sleep(rng.uniform(0.5, 1.5))
        in_flight_at_kill |= {(isoformat(r.slot), r.recipient) for r in chaos_rows("sending")}
        workers = kill_one(workers, rng, kills, lambda: start_worker(env, concurrency=2))
    assert kills["child"] + kills["worker"] >= 3, kills

    try:
        wait_until(lambda: all(r.status == "sent" for r in chaos_rows()), 300 - (time.monotonic() - started), "every delivery")
    except AssertionError:
        stuck = [(isoformat(r.slot), r.recipient, r.status, r.attempts, r.error) for r in chaos_rows() if r.status != "sent"]
        logs = "\n".join(w.output()[-2500:] for w in workers)
        raise AssertionError(f"not sent after {time.monotonic() - started:.0f}s (kills: {kills}): {stuck}\n{logs}") from None
    took = time.monotonic() - started
    got = delivered(timed_inbox)
    expected = {(isoformat(r.slot), r.recipient) for r in chaos_rows()}
    missing = expected - set(got)
    duplicates = {key: n for key, n in got.items() if n > 1}
    after_data = {key: n for key, n in duplicates.items() if key in in_flight_at_kill}
    print(
        f"\nchaos: {kills} kills, {len(expected)} deliveries in {took:.0f}s, "
        f"{sum(n - 1 for n in after_data.values())} duplicate(s) from the SMTP after-data window"
    )
    assert took <= 300, "all deliveries within 5 minutes"
    assert missing == set(), f"never delivered: {sorted(missing)}"
    assert set(duplicates) == set(after_data), f"duplicates not explained by the after-data window: {duplicates}"
    ledger.dispose()


# ----------------------------------------------------------------------------- two beats


def leader_pid(broker: str) -> int | None:
    client = redis.Redis.from_url(broker)
    raw = client.get(defaults.BEAT_LEADER_KEY)
    client.close()
    return None if raw is None else int(json.loads(raw)["pid"])


@pytest.mark.slow(minutes=3)
def test_two_beats_send_once_and_the_standby_takes_over_after_sigkill(
    make_project: Callable[..., Project],
    fresh_redis: str,
    inbox: Inbox,
    start_worker: Callable[..., Worker],
    start_beat: Callable[..., Any],
) -> None:
    lock_timeout = 10
    project = make_project(yaml_text="placeholder")
    report = """\
  minutely:
    schedule: "* * * * *"
    subject: "Minutely {{ slot.strftime('%H:%M') }}"
    template: simple.html
    query: {datasource: warehouse, sql: "select region, amount from orders"}
    recipients: [ann@example.com, ben@example.com]
"""
    project.config.write_text(project_yaml(project.root, report, dispatch_cron="* * * * *", beat_lock_timeout=lock_timeout))
    env = project.env(REPORTER_BROKER_URL=fresh_redis, REPORTER_SMTP_URL=inbox.url)
    worker = start_worker(env, concurrency=2)
    first = start_beat(env, "beat-a")
    wait_until(lambda: leader_pid(fresh_redis) == first.pid, 30, "the first beat to lead")
    second = start_beat(env, "beat-b")
    # Two beats, two minutes: each slot reaches each recipient once.
    wait_until(lambda: len({slot for slot, _ in delivered(inbox)}) >= 2, 150, "two slots delivered")
    assert leader_pid(fresh_redis) == first.pid, "the standby must not take the lock from a live leader"

    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    killed_at = time.monotonic()
    took_over = wait_until(lambda: leader_pid(fresh_redis) == second.pid, lock_timeout + 20, "the standby to take over")
    print(f"\nstandby took over {took_over:.1f}s after SIGKILL (lease {lock_timeout}s)")
    assert took_over <= lock_timeout + 10  # the lease, plus at most one standby tick (lease / 3)
    slots_before = {slot for slot, _ in delivered(inbox)}
    wait_until(lambda: len({slot for slot, _ in delivered(inbox)} - slots_before) >= 1, 120, "a slot delivered after the handover")
    # Let in-flight slots settle, then check the whole run: no (slot, recipient) twice, no slot skipped.
    time.sleep(2)
    got = delivered(inbox)
    assert max(got.values()) == 1, f"duplicates: {[k for k, n in got.items() if n > 1]}"
    slots = sorted({datetime.fromisoformat(slot.replace("Z", "+00:00")) for slot, _ in got})
    assert all(b - a == timedelta(minutes=1) for a, b in itertools.pairwise(slots)), f"a slot was lost: {slots}"
    assert all(got[(isoformat(s), r)] == 1 for s in slots for r in ("ann@example.com", "ben@example.com"))
    ledger = Ledger.from_url(project.db_url)
    assert not [r for r in ledger.rows(report="minutely", until=datetime.now(UTC) - timedelta(seconds=30)) if r.status != "sent"]
    ledger.dispose()
    assert time.monotonic() - killed_at < 180
    assert worker.proc.poll() is None


# ----------------------------------------------------------------------------- broker restart


@pytest.mark.slow(minutes=3)
def test_redis_restarted_mid_run_deliveries_resume_and_nothing_is_lost(
    make_project: Callable[..., Project], inbox: Inbox, start_worker: Callable[..., Worker], start_beat: Callable[..., Any], tmp_path: Path
) -> None:
    redis_proc, url = start_redis(tmp_path)
    port = url.rsplit(":", 1)[1].split("/")[0]
    try:
        project = make_project(yaml_text="placeholder")
        report = """\
  minutely:
    schedule: "* * * * *"
    subject: "Minutely {{ slot.strftime('%H:%M') }}"
    template: simple.html
    query: {datasource: warehouse, sql: "select region, amount from orders"}
    recipients: [ann@example.com]
"""
        project.config.write_text(project_yaml(project.root, report, dispatch_cron="* * * * *"))
        # The sweep every 5 s and a 30 s grace (defaults: every minute, 2 minutes): what Redis lost is
        # re-enqueued by the same sweep, a minute or two sooner.
        env = project.env(REPORTER_BROKER_URL=url, REPORTER_SMTP_URL=inbox.url, REPORTER_SWEEP_INTERVAL="5", REPORTER_SWEEP_GRACE="30")
        worker = start_worker(env, concurrency=2)
        start_beat(env)
        wait_until(lambda: len(delivered(inbox)) >= 1, 100, "a first delivery")

        stop(redis_proc, "redis", timeout=5)  # everything Redis held is gone: it keeps nothing on disk
        time.sleep(5)
        with open(tmp_path / "redis2.log", "wb") as log:
            redis_proc = subprocess.Popen(
                [redis_server_binary(), "--bind", "127.0.0.1", "--port", port, "--save", "", "--appendonly", "no"],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        restarted = datetime.now(UTC)
        # The next slots after the restart arrive, and every slot from the first to the last is there once.
        wait_until(
            lambda: any(datetime.fromisoformat(s.replace("Z", "+00:00")) > restarted + timedelta(minutes=1) for s, _ in delivered(inbox)),
            200,
            "deliveries after the restart",
        )
        ledger = Ledger.from_url(project.db_url)
        wait_until(
            lambda: all(r.status == "sent" for r in ledger.rows(report="minutely", until=restarted + timedelta(minutes=1))),
            200,
            "slots around the restart to be delivered (the sweep re-enqueues what Redis lost)",
        )
        got = delivered(inbox)
        assert max(got.values()) == 1, got
        slots = sorted(datetime.fromisoformat(s.replace("Z", "+00:00")) for s, _ in got)
        assert all(b - a == timedelta(minutes=1) for a, b in itertools.pairwise(slots)), f"a slot was lost: {slots}"
        assert worker.proc.poll() is None
        ledger.dispose()
    finally:
        stop(redis_proc, "redis", timeout=5)


# ----------------------------------------------------------------------------- rate limit


@pytest.mark.alone  # it measures arrival times: other tests' processes competing for the CPU bunch them
def test_global_rate_limit_holds_across_workers_and_is_nearly_reached(
    make_project: Callable[..., Project], fresh_redis: str, timed_inbox: TimedInbox, start_worker: Callable[..., Worker]
) -> None:
    rate = 5
    recipients = [f"r{i}@example.com" for i in range(5)]
    project = make_project(yaml_text="placeholder")
    report = f"""\
  burst:
    schedule: "0 7 * * *"
    subject: "Burst {{{{ slot.strftime('%d') }}}}"
    template: simple.html
    query: {{datasource: warehouse, sql: "select region, amount from orders"}}
    recipients: {json.dumps(recipients)}
"""
    project.config.write_text(project_yaml(project.root, report, rate_limit=f"{rate}/s"))
    env = project.env(REPORTER_BROKER_URL=fresh_redis, REPORTER_SMTP_URL=timed_inbox.url)
    start_worker(env, concurrency=2)
    start_worker(env, concurrency=2)
    dispatch_past_days(fresh_redis, 8)  # 8 slots x 5 recipients = a backlog of 40 emails, 4 processes
    wait_until(lambda: len(timed_inbox.arrivals) >= 40, 120, "40 emails")
    times = sorted(timed_inbox.arrivals)
    busiest = max(sum(1 for t in times if start <= t < start + 1.0) for start in times)
    achieved = (len(times) - 1) / (times[-1] - times[0])
    print(f"\nrate limit {rate}/s: busiest 1-second window {busiest}, achieved {achieved:.2f}/s ({achieved / rate:.0%})")
    assert busiest <= rate
    assert achieved >= 0.9 * rate


# ----------------------------------------------------------------------------- time limits


SENT_SLOT = datetime(2026, 1, 5, 7, tzinfo=UTC)
"""The slot the misbehaving-report tests send by hand."""

FINE_REPORT = """\
  fine:
    schedule: "0 7 * * *"
    subject: "Fine"
    template: simple.html
    query: {datasource: warehouse, sql: "select region, amount from orders"}
    recipients: [ben@example.com]
"""
"""A well-behaved report that must keep flowing while another one misbehaves."""


HANG_DATA = """
import time

def forever(slot, report):
    time.sleep(600)  # a query that never returns
    return []
"""


def test_a_hanging_render_is_stopped_by_the_soft_limit_and_others_keep_flowing(
    make_project: Callable[..., Project], fresh_redis: str, inbox: Inbox, start_worker: Callable[..., Worker]
) -> None:
    project = make_project(yaml_text="placeholder")
    (project.root / "hang.py").write_text(HANG_DATA)
    reports = (
        """\
  hangs:
    schedule: "0 7 * * *"
    subject: "Hangs"
    template: simple.html
    function: hang:forever
    recipients: [ann@example.com]
    max_retries: 0
"""
        + FINE_REPORT
    )
    project.config.write_text(project_yaml(project.root, reports, soft_time_limit=3, time_limit=6))
    env = project.env(REPORTER_BROKER_URL=fresh_redis, REPORTER_SMTP_URL=inbox.url)
    worker = start_worker(env, concurrency=2)
    app = Celery("t", broker=fresh_redis, set_as_current=False)
    app.send_task("email_reports.send", args=("hangs", "2026-01-05T07:00:00Z"), queue="reporter.scheduled")
    for day in (5, 6, 7):
        app.send_task("email_reports.send", args=("fine", f"2026-01-0{day}T07:00:00Z"), queue="reporter.scheduled")
    ledger = Ledger.from_url(project.db_url)
    wait_until(lambda: [r.status for r in ledger.rows(report="hangs")] == ["failed"], 60, "the hanging report to be failed", worker.output)
    [row] = ledger.rows(report="hangs")
    assert row.error and "soft time limit exceeded (3s)" in row.error, row.error
    wait_until(lambda: len(inbox.messages) == 3, 60, "the other report's three slots")
    assert "SoftTimeLimitExceeded" in worker.output() or "soft time limit" in worker.output()
    assert [m["Subject"] for m in inbox.messages] == ["Fine"] * 3
    ledger.dispose()


STUBBORN_DATA = """
import time

def ignores_soft_limit(slot, report):
    while True:
        try:
            time.sleep(600)
        except BaseException:  # swallows SoftTimeLimitExceeded: only the hard limit can stop this
            pass
"""


@pytest.mark.slow(minutes=1)
def test_a_render_that_ignores_the_soft_limit_is_killed_and_given_up_after_its_attempts(
    make_project: Callable[..., Project],
    fresh_redis: str,
    inbox: Inbox,
    start_worker: Callable[..., Worker],
    start_beat: Callable[..., Any],
) -> None:
    project = make_project(yaml_text="placeholder")
    (project.root / "stubborn.py").write_text(STUBBORN_DATA)
    reports = (
        """\
  stubborn:
    schedule: "0 7 * * *"
    subject: "Stubborn"
    template: simple.html
    function: stubborn:ignores_soft_limit
    recipients: [ann@example.com]
    owners: [owner@example.com]
    max_retries: 0
"""
        + FINE_REPORT
    )
    project.config.write_text(project_yaml(project.root, reports, soft_time_limit=2, time_limit=4))
    # A short claim margin and a sweep every 5 s (defaults: 30 s, every minute): the same give-up, sooner.
    env = project.env(REPORTER_BROKER_URL=fresh_redis, REPORTER_SMTP_URL=inbox.url, REPORTER_CLAIM_MARGIN="2", REPORTER_SWEEP_INTERVAL="5")
    worker = start_worker(env, concurrency=2)
    start_beat(env)  # the sweep finds the killed attempt
    app = Celery("t", broker=fresh_redis, set_as_current=False)
    app.send_task("email_reports.send", args=("stubborn", isoformat(SENT_SLOT)), queue="reporter.scheduled")
    app.send_task("email_reports.send", args=("fine", "2026-01-05T07:00:00Z"), queue="reporter.scheduled")
    wait_until(lambda: "Hard time limit (4" in worker.output(), 60, "the hard limit to kill the render")
    wait_until(lambda: any(m["Subject"] == "Fine" for m in inbox.messages), 60, "the other report")
    ledger = Ledger.from_url(project.db_url)
    # The killed attempt's claim goes stale after the hard limit + the claim margin; the next sweep gives up on it.
    # This slot's row (between 06:00 and 07:00 UTC beat's start-up dispatch also records today's coming 07:00).
    wait_until(lambda: [r.status for r in ledger.rows(report="stubborn", slot=SENT_SLOT)] == ["failed"], 150, "the sweep to give up")
    [row] = ledger.rows(report="stubborn", slot=SENT_SLOT)
    assert row.error and "attempts ended without a result" in row.error, row.error
    wait_until(lambda: any(rcpts == ["owner@example.com"] for _, rcpts in inbox.envelopes), 30, "the owners' notice")
    assert len([m for m in inbox.messages if m["Subject"] == "Fine" and ".20260105T070000Z." in m["Message-ID"]]) == 1
    ledger.dispose()

"""Real beat and real retries: `celery beat` firing the dispatcher from the YAML crontab, the dispatcher
called by hand with `celery call`, and SMTP replies that make a send retry or fail for good."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from reporter.ledger import Ledger
from tests.conftest import ROOT, Inbox, Project, Worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DISPATCHED = re.compile(r"dispatched (\d+) slot\(s\) for \[(\S+), (\S+)\)")


def wait_for_log(worker: Worker, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = pattern.search(worker.output())
        if found:
            return found
        time.sleep(0.3)
    raise AssertionError(f"no {pattern.pattern!r} in the worker log after {timeout}s:\n{worker.output()[-3000:]}")


def parse_z(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_beat_fires_the_dispatcher_for_its_minute_from_the_yaml_crontab(
    make_project: Callable[..., Project],
    fresh_redis: str,
    inbox: Inbox,
    start_worker: Callable[..., Worker],
    start_beat: Callable[..., object],
) -> None:
    project = make_project(cron="* * * * *", dispatch_cron="* * * * *", recipients=["ann@example.com"])
    env = project.env(REPORTER_BROKER_URL=fresh_redis, REPORTER_SMTP_URL=inbox.url)
    worker = start_worker(env)
    start_beat(env)
    # First the start-up dispatch (T = now), then beat's own firing, which names the exact minute.
    startup = wait_for_log(worker, DISPATCHED, 60)
    assert parse_z(startup.group(3)).second == 0
    fired = wait_for_log(worker, re.compile(DISPATCHED.pattern + r"(?s:.*?)" + DISPATCHED.pattern), 100)
    start, end = parse_z(fired.group(5)), parse_z(fired.group(6))
    assert start.second == 0 and end - start == timedelta(minutes=1), fired.group(0)
    # The slot at the start of beat's window was enqueued by the start-up dispatch's window already:
    # the ledger holds it once, and it is delivered once.
    messages = inbox.wait_for(1, timeout=90)
    assert messages, worker.output()[-3000:]
    ledger = Ledger.from_url(project.db_url)
    slots = [r.slot for r in ledger.rows(report="regional", until=datetime.now(UTC))]
    assert len(slots) == len(set(slots)), "a slot was recorded twice"
    ledger.dispose()


def test_dispatcher_called_by_hand_covers_now_to_its_next_fire(
    make_project: Callable[..., Project], fresh_redis: str, start_worker: Callable[..., Worker]
) -> None:
    project = make_project(cron="* * * * *", dispatch_cron="*/5 * * * *")
    env = project.env(REPORTER_BROKER_URL=fresh_redis)
    worker = start_worker(env)
    before = datetime.now(UTC)
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "reporter.celery_app", "call", "email_reports.schedule_hourly"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    found = wait_for_log(worker, DISPATCHED, 60)
    start, end = parse_z(found.group(2)), parse_z(found.group(3))
    # Called by hand, T is now; the window ends at the dispatcher's own next fire (a multiple of 5 min).
    assert before - timedelta(seconds=1) <= start <= datetime.now(UTC)
    assert end.second == 0 and end.minute % 5 == 0 and timedelta(0) < end - start <= timedelta(minutes=5)
    minute_marks = [end - timedelta(minutes=k) for k in range(1, 6) if end - timedelta(minutes=k) >= start]
    assert int(found.group(1)) == len(minute_marks)
    ledger = Ledger.from_url(project.db_url)
    assert sorted({r.slot for r in ledger.rows(report="regional")}) == sorted(minute_marks)
    ledger.dispose()


def test_smtp_451_is_retried_and_then_delivered(
    make_project: Callable[..., Project], fresh_redis: str, inbox: Inbox, start_worker: Callable[..., Worker]
) -> None:
    project = make_project(cron="0 7 * * *", recipients=["ann@example.com"])
    env = project.env(REPORTER_BROKER_URL=fresh_redis, REPORTER_SMTP_URL=inbox.url)
    worker = start_worker(env)
    inbox.script.append("451 4.3.0 Try again later")
    slot = "2026-01-05T07:00:00Z"
    from celery import Celery

    Celery("t", broker=fresh_redis, set_as_current=False).send_task(
        "email_reports.send", args=("regional", slot), queue="reporter.scheduled"
    )
    messages = inbox.wait_for(1, timeout=60)
    assert len(messages) == 1, worker.output()[-3000:]
    assert "Retry in" in worker.output()
    ledger = Ledger.from_url(project.db_url)
    [row] = ledger.rows(report="regional")
    assert (row.status, row.attempts) == ("sent", 2)
    ledger.dispose()


def test_smtp_550_fails_once_without_retry_and_owners_are_told_once(
    make_project: Callable[..., Project], fresh_redis: str, inbox: Inbox, start_worker: Callable[..., Worker]
) -> None:
    project = make_project(cron="0 7 * * *", recipients=["ann@example.com", "ben@example.com"])
    env = project.env(REPORTER_BROKER_URL=fresh_redis, REPORTER_SMTP_URL=inbox.url)
    worker = start_worker(env)
    # Both recipients refused for two slots: four failures in all, and still one notice.
    inbox.refuse.update(dict.fromkeys(["ann@example.com", "ben@example.com"], "550 5.1.1 No such user"))
    from celery import Celery

    app = Celery("t", broker=fresh_redis, set_as_current=False)
    for slot in ("2026-01-05T07:00:00Z", "2026-01-06T07:00:00Z"):
        app.send_task("email_reports.send", args=("regional", slot), queue="reporter.scheduled")
    wait_until_count = re.compile(r"(?s)email_reports\.send\[[^\]]+\] succeeded.*email_reports\.send\[[^\]]+\] succeeded")
    wait_for_log(worker, wait_until_count, 60)
    ledger = Ledger.from_url(project.db_url)
    rows = ledger.rows(report="regional")
    assert len(rows) == 4
    assert all((r.status, r.attempts) == ("failed", 1) and r.error and "550" in r.error for r in rows), rows
    assert "Retry in" not in worker.output()
    assert sorted(inbox.refused) == ["ann@example.com"] * 2 + ["ben@example.com"] * 2, "one attempt per recipient and slot"
    # The owners' notice is the only message accepted, and it came once.
    assert [rcpts for _, rcpts in inbox.envelopes] == [["owner@example.com"]]
    notice = inbox.messages[0]
    assert re.match(r"\[reporter\] regional: 2 delivery\(ies\) failed for 2026-01-0[56]T07:00:00Z", notice["Subject"]), notice["Subject"]
    assert "ann@example.com: SMTP 550" in notice.get_content()
    ledger.dispose()

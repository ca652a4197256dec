"""End to end with real processes: private Redis, `celery worker` (prefork) subprocesses, aiosmtpd inbox.

The dispatcher is published to the broker like beat would, the workers render and send, and the inbox
is read back: each recipient gets one email, with the PDF whose text holds the report's data.
"""

from __future__ import annotations

import io
import re
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from celery import Celery
from pypdf import PdfReader

from reporter.ledger import Ledger
from reporter.schedule import isoformat
from tests.conftest import Inbox, Project, Worker, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RECIPIENTS = ["ann@example.com", "ben@example.com", "cy@example.com"]


def publisher(broker: str) -> Celery:
    return Celery("test-publisher", broker=broker, set_as_current=False)


def succeeded_sends(workers: list[Worker]) -> int:
    return sum(len(re.findall(r"email_reports\.send\[[^\]]+\] succeeded", w.output())) for w in workers)


def current_minute_window() -> tuple[datetime, datetime]:
    """A dispatcher window whose one minutely slot is already due (so its eta is now)."""
    start = datetime.now(UTC).replace(second=0, microsecond=0)
    return start, start + timedelta(minutes=1)


def pdf_text(msg: object) -> str:
    pdfs = [part for part in msg.iter_attachments() if part.get_content_type() == "application/pdf"]  # type: ignore[attr-defined]
    assert len(pdfs) == 1, "expected exactly one PDF attachment"
    reader = PdfReader(io.BytesIO(pdfs[0].get_content()))
    return "\n".join(page.extract_text() for page in reader.pages)


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest, make_project: Callable[..., Project]) -> str:
    if request.param == "postgresql":
        return str(request.getfixturevalue("pg_url"))
    return ""  # the project's own SQLite file


def test_dispatched_slot_reaches_each_inbox_once_with_pdf(
    make_project: Callable[..., Project], fresh_redis: str, inbox: Inbox, start_worker: Callable[..., Worker], ledger_url: str
) -> None:
    project = make_project(cron="* * * * *", recipients=RECIPIENTS)
    env = project.env(REPORTER_BROKER_URL=fresh_redis, REPORTER_SMTP_URL=inbox.url)
    if ledger_url:
        env["REPORTER_DATABASE_URL"] = ledger_url
    worker = start_worker(env, concurrency=2)
    start, end = current_minute_window()

    app = publisher(fresh_redis)
    app.send_task(
        "email_reports.schedule_hourly",
        kwargs={"scheduled_for": isoformat(start), "window_end": isoformat(end)},
        queue="reporter.scheduled",
    )

    messages = inbox.wait_for(len(RECIPIENTS), timeout=90)
    assert len(messages) == len(RECIPIENTS), worker.output()[-3000:]
    assert sorted(rcpt for _, rcpts in inbox.envelopes for rcpt in rcpts) == sorted(RECIPIENTS)
    for msg in messages:
        assert msg["Subject"] == f"Regional {start.strftime('%H:%M')}"
        assert msg["X-Reporter-Slot"] == isoformat(start)
        text = pdf_text(msg)
        assert "Atlantis" in text and "1234.5" in text and "Lemuria" in text
        assert "Page 1 of 1" in text
        csv_parts = [p for p in msg.iter_attachments() if p.get_content_type() == "text/csv"]
        assert csv_parts and "Atlantis,1234.5" in csv_parts[0].get_content()
    # Message-IDs are distinct per recipient and recorded in the ledger.
    ledger = Ledger.from_url(env["REPORTER_DATABASE_URL"])
    rows = ledger.rows(report="regional", slot=start)
    assert {r.recipient: r.status for r in rows} == dict.fromkeys(RECIPIENTS, "sent")
    assert {r.message_id for r in rows} == {m["Message-ID"] for m in messages}
    ledger.dispose()


def test_dispatcher_twice_and_send_published_twice_still_one_email_each(
    make_project: Callable[..., Project], fresh_redis: str, inbox: Inbox, start_worker: Callable[..., Worker], ledger_url: str
) -> None:
    project = make_project(cron="* * * * *", recipients=RECIPIENTS)
    env = project.env(REPORTER_BROKER_URL=fresh_redis, REPORTER_SMTP_URL=inbox.url)
    if ledger_url:
        env["REPORTER_DATABASE_URL"] = ledger_url
    # Two workers of two processes each, so the duplicates really run at the same time.
    workers = [start_worker(env, concurrency=2), start_worker(env, concurrency=2)]
    start, end = current_minute_window()
    app = publisher(fresh_redis)
    window = {"scheduled_for": isoformat(start), "window_end": isoformat(end)}

    for _ in range(2):
        app.send_task("email_reports.schedule_hourly", kwargs=window, queue="reporter.scheduled")
    for _ in range(4):
        app.send_task("email_reports.send", args=("regional", isoformat(start)), queue="reporter.scheduled")

    # 2 dispatches enqueue 2 sends, plus the 4 published directly: wait until all 6 have run.
    wait_until(lambda: succeeded_sends(workers) >= 6, 120, "six send tasks to finish")
    counts = Counter(rcpt for _, rcpts in inbox.envelopes for rcpt in rcpts)
    assert counts == Counter(RECIPIENTS), f"expected one email per recipient, got {counts}"
    ledger = Ledger.from_url(env["REPORTER_DATABASE_URL"])
    rows = ledger.rows(report="regional")
    assert len(rows) == len(RECIPIENTS)
    assert all(r.status == "sent" and r.attempts == 1 for r in rows), rows
    ledger.dispose()


def test_send_now_goes_through_the_urgent_queue(
    make_project: Callable[..., Project], fresh_redis: str, inbox: Inbox, start_worker: Callable[..., Worker]
) -> None:
    from tests.conftest import run_cli

    project = make_project(cron="0 7 * * *", recipients=RECIPIENTS)
    env = project.env(REPORTER_BROKER_URL=fresh_redis, REPORTER_SMTP_URL=inbox.url)
    start_worker(env)
    done = run_cli("send", "regional", "--to", "dee@example.com", "--wait", "60", env=env)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^dee@example.com\tsent\t<regional\.", done.stdout, re.M), done.stdout
    assert "reporter.urgent" in done.stderr
    assert [rcpts for _, rcpts in inbox.envelopes] == [["dee@example.com"]]
    # A send-now of a slot still to come goes now, not at that slot.
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT07:00:00Z")
    later = run_cli("send", "regional", "--to", "eve@example.com", "--slot", tomorrow, "--wait", "60", env=env)
    assert later.returncode == 0, later.stderr
    assert re.search(r"^eve@example.com\tsent\t", later.stdout, re.M), later.stdout
    assert inbox.messages[-1]["X-Reporter-Slot"] == tomorrow


def test_send_now_while_smtp_is_down_says_the_workers_are_retrying_and_why(
    make_project: Callable[..., Project], fresh_redis: str, start_worker: Callable[..., Worker]
) -> None:
    from reporter.runner import free_port
    from tests.conftest import run_cli

    project = make_project(cron="0 7 * * *", recipients=["ann@example.com"])
    env = project.env(REPORTER_BROKER_URL=fresh_redis, REPORTER_SMTP_URL=f"smtp://127.0.0.1:{free_port()}")
    start_worker(env)
    done = run_cli("send", "regional", "--wait", "8", env=env)
    assert done.returncode == 2, done.stderr
    # Queued between tries, or in flight if the CLI looks while a retry runs: not final either way.
    assert re.search(r"^ann@example.com\t(queued|rendering|sending)\tSMTP 127\.0\.0\.1:\d+ unreachable", done.stdout, re.M), done.stdout
    assert "not finished after 8s: the workers keep retrying (SMTP 127.0.0.1:" in done.stderr
    assert "is one running" not in done.stderr

"""Alerts end to end with real processes: a private Redis, a `celery worker` subprocess, an aiosmtpd inbox.

The test owns the alert's data (a SQLite table it writes before each slot) and publishes
`email_reports.send` for consecutive hourly slots one after another, as beat would, waiting for each
slot's rows to be final before the next. What arrives is read at the SMTP server and the reasons in
`reporter history`.
"""

from __future__ import annotations

import io
import re
import sqlite3
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from functools import partial
from pathlib import Path

import pytest
from celery import Celery
from pypdf import PdfReader

from reporter import alert
from reporter.ledger import FINAL, Ledger
from reporter.schedule import isoformat
from tests.conftest import Inbox, Project, Worker, run_cli, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow(minutes=1)]

ANN, BEN, OWNER = "ann@example.com", "ben@example.com", "owner@example.com"
T0 = datetime(2026, 3, 2, 7, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)

ALERT_YAML = """\
timezone: UTC
defaults:
  sender: "Reports <reports@example.com>"
  rate_limit: "50/s"
  soft_time_limit: 20
  time_limit: 30
  max_retries: 3
datasources:
  shop:
    url: "sqlite:///{root}/shop.db"
reports:
  big-orders:
    schedule: "0 * * * *"
    subject: "Alert {{{{ slot.strftime('%H:%M') }}}}: {{{{ value | number(2) }}}} EUR"
    template: alert.html
    query:
      datasource: shop
      sql: "select hour, amount from orders where hour = :hour"
      params: {{hour: "{{{{ slot.strftime('%H:%M') }}}}"}}
    value: "rows | sum(attribute='amount')"
    when: "value > 1000"
    notify: change
    renotify_after: 2h
    recovered:
      subject: "Recovered {{{{ slot.strftime('%H:%M') }}}}"
    formats: [html, pdf, csv]
    recipients: [{ann}, {ben}]
    owners: [{owner}]
  every-format:
    schedule: "0 * * * *"
    subject: "Every format {{{{ value }}}}"
    template: alert.html
    query:
      datasource: shop
      sql: "select hour, amount from orders where hour = :hour"
      params: {{hour: "{{{{ slot.strftime('%H:%M') }}}}"}}
    value: "rows | length"
    when: "value > 0"
    formats: [html, pdf, csv, xlsx]
    charts:
      amounts: {{type: bar, x: hour, y: amount, title: Amounts}}
    recipients: [{ann}]
  broken:
    schedule: "0 * * * *"
    subject: "Broken {{{{ slot.strftime('%H:%M') }}}}"
    template: alert.html
    query:
      datasource: shop
      sql: "select hour, amount from orders where hour = :hour"
      params: {{hour: "{{{{ slot.strftime('%H:%M') }}}}"}}
    when: "rows[0].amount > 1000"
    recipients: [{ann}]
    owners: [{owner}]
"""

ALERT_TEMPLATE = """<!doctype html><html><body>
<h1>{% if alert.recovered %}Recovered{% else %}Big orders{% endif %}</h1>
<p>Total {{ value }} EUR; before: {{ alert.previous.value }}</p>
<p>Why: {{ alert.reason }}</p>
{% for row in rows %}<p>Order at {{ row.hour }}: {{ row.amount }}</p>{% endfor %}
</body></html>
"""


# An alert when an hour has no orders, whose value reads the first order: undefined exactly when it alerts.
FIRST_ORDER_YAML = """\
  first-order:
    schedule: "0 * * * *"
    subject: "No orders {{ slot.strftime('%H:%M') }}"
    template: alert.html
    query:
      datasource: shop
      sql: "select hour, amount from orders where hour = :hour"
      params: {hour: "{{ slot.strftime('%H:%M') }}"}
    value: "rows | first"
    when: "row_count == 0"
    recipients: [ann@example.com]
    owners: [owner@example.com]
"""


def publisher(broker: str) -> Celery:
    return Celery("test-publisher", broker=broker, set_as_current=False)


def alert_project(make_project: Callable[..., Project]) -> Project:
    project = make_project(yaml_text="reports: {}\n")
    project.config.write_text(ALERT_YAML.format(root=project.root, ann=ANN, ben=BEN, owner=OWNER))
    (project.root / "templates" / "alert.html").write_text(ALERT_TEMPLATE)
    with sqlite3.connect(project.root / "shop.db") as db:
        db.execute("create table orders (hour text, amount real)")
    return project


def set_orders(project: Project, slot: datetime, amount: float | None) -> None:
    """The orders of SLOT's hour: one of AMOUNT, or none."""
    hour = slot.strftime("%H:%M")
    with sqlite3.connect(project.root / "shop.db") as db:
        db.execute("delete from orders where hour = ?", (hour,))
        if amount is not None:
            db.execute("insert into orders values (?, ?)", (hour, amount))


def final(ledger: Ledger, report: str, slot: datetime, count: int) -> bool:
    rows = ledger.rows(report=report, slot=slot)
    return len(rows) == count and all(r.status in FINAL for r in rows)


def emails(inbox: Inbox) -> Counter[tuple[str, str]]:
    """(slot, address) -> emails received, for the report emails (not the owners' notices)."""
    with inbox.lock:
        return Counter(
            (str(m["X-Reporter-Slot"]), rcpt)
            for m, (_, rcpts) in zip(inbox.messages, inbox.envelopes, strict=True)
            if m["X-Reporter-Slot"]
            for rcpt in rcpts
        )


def pdf_text(msg: EmailMessage) -> str:
    pdfs = [p for p in msg.iter_attachments() if p.get_content_type() == "application/pdf"]
    assert len(pdfs) == 1
    return "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(pdfs[0].get_content())).pages)


def body(msg: EmailMessage) -> str:
    part = msg.get_body(("html",))
    assert part is not None
    return str(part.get_content())


def test_alert_holds_then_not_then_again_with_notify_change_renotify_and_recovered(
    make_project: Callable[..., Project], fresh_redis: str, inbox: Inbox, start_worker: Callable[..., Worker]
) -> None:
    project = alert_project(make_project)
    env = project.env(REPORTER_BROKER_URL=fresh_redis, REPORTER_SMTP_URL=inbox.url)
    worker = start_worker(env, concurrency=1)
    app = publisher(fresh_redis)
    ledger = Ledger.from_url(project.db_url)
    # (amount of the slot's orders, whether it arrives): notify change, renotify_after 2h, recovered.
    plan = [(1500.0, True), (1600.0, False), (1700.0, True), (10.0, True), (20.0, False), (1800.0, True)]
    slots = [T0 + i * HOUR for i in range(len(plan))]
    for slot, (amount, _) in zip(slots, plan, strict=True):
        set_orders(project, slot, amount)
        app.send_task("email_reports.send", args=("big-orders", isoformat(slot)), queue="reporter.scheduled")
        wait_until(partial(final, ledger, "big-orders", slot, 2), 90, f"slot {slot:%H:%M} to be final", worker.output)

    got = emails(inbox)
    expected = Counter({(isoformat(s), who): 1 for s, (_, arrives) in zip(slots, plan, strict=True) if arrives for who in (ANN, BEN)})
    assert got == expected, got
    by_slot = {(str(m["X-Reporter-Slot"]), str(m["To"])): m for m in inbox.messages}
    first = by_slot[(isoformat(slots[0]), ANN)]
    assert first["Subject"] == "Alert 07:00: 1,500.00 EUR"
    assert "Why: condition holds: value &gt; 1000 → 1500" in body(first)
    assert "Order at 07:00: 1500.0" in pdf_text(first)
    again = by_slot[(isoformat(slots[2]), BEN)]
    assert again["Subject"] == "Alert 09:00: 1,700.00 EUR"
    assert "(renotify_after 2h)" in body(again) and "before: 1600.0" in body(again)
    recovered = by_slot[(isoformat(slots[3]), ANN)]
    assert recovered["Subject"] == "Recovered 10:00"
    assert "<h1>Recovered</h1>" in body(recovered) and "Order at 10:00: 10.0" in pdf_text(recovered)
    assert by_slot[(isoformat(slots[5]), ANN)]["Subject"] == "Alert 12:00: 1,800.00 EUR"

    # `reporter history` answers "why didn't I get it?" for every recipient of the quiet slots.
    history = run_cli("history", "big-orders", "--limit", "50", env=env)
    assert history.returncode == 0, history.stderr
    lines = history.stdout.splitlines()
    held = re.escape(
        "condition holds but notify: change and it already held at 2026-03-02 07:00 UTC "
        "(last alert 2026-03-02 07:00 UTC; renotify_after 2h)"
    )
    for who in (ANN, BEN):
        assert any(re.match(rf"2026-03-02 08:00\s+big-orders\s+{who}\s+not-sent\s.*{held}", line) for line in lines), history.stdout
        assert any(
            re.match(rf"2026-03-02 11:00\s+big-orders\s+{who}\s+not-sent\s.*condition false: value > 1000 → 20", line) for line in lines
        ), history.stdout
    quiet = run_cli("history", "big-orders", "--status", "not-sent", env=env)
    assert len([line for line in quiet.stdout.splitlines() if "not-sent" in line]) == 4, quiet.stdout

    # A retried slot reads its recorded decision. The slot after 12:00 stops holding: its decision is
    # the recovered email. The first attempt is refused with a 4xx; the data then holds again, which
    # evaluated anew would send nothing (notify: change, it held at 12:00): the retry still sends.
    slot = T0 + len(plan) * HOUR
    set_orders(project, slot, 5.0)
    with inbox.lock:
        inbox.script.append("451 4.3.0 try again later")
    app.send_task("email_reports.send", args=("big-orders", isoformat(slot)), queue="reporter.scheduled")
    wait_until(lambda: ledger.evaluation("big-orders", slot) is not None and not inbox.script, 60, "the first attempt", worker.output)
    set_orders(project, slot, 2500.0)
    wait_until(lambda: final(ledger, "big-orders", slot, 2), 90, "the retry to send", worker.output)
    assert {(r.status, r.attempts) for r in ledger.rows(report="big-orders", slot=slot)} == {("sent", 2)}
    late = [m for m in inbox.messages if m["X-Reporter-Slot"] == isoformat(slot)]
    assert sorted(str(m["To"]) for m in late) == [ANN, BEN] and {str(m["Subject"]) for m in late} == {"Recovered 13:00"}
    assert "Order at 13:00: 2500.0" in pdf_text(late[0])  # rendered from the data of the retry, as decided before
    recorded = ledger.evaluation("big-orders", slot)
    assert recorded is not None and (recorded.value, recorded.decision) == (5.0, "recovered")
    ledger.dispose()


def test_a_condition_error_fails_the_slot_and_tells_the_owner_once_and_a_slot_sent_twice_evaluates_once(
    make_project: Callable[..., Project], fresh_redis: str, inbox: Inbox, start_worker: Callable[..., Worker], tmp_path: Path
) -> None:
    project = alert_project(make_project)
    env = project.env(REPORTER_BROKER_URL=fresh_redis, REPORTER_SMTP_URL=inbox.url)
    worker = start_worker(env, concurrency=2)
    app = publisher(fresh_redis)
    ledger = Ledger.from_url(project.db_url)

    # `rows[0]` of an hour without orders cannot be evaluated: failed, never a silent skip.
    for slot in (T0, T0 + HOUR):
        set_orders(project, slot, None)
        app.send_task("email_reports.send", args=("broken", isoformat(slot)), queue="reporter.scheduled")
        wait_until(partial(final, ledger, "broken", slot, 1), 90, "the broken slot to fail", worker.output)
    rows = ledger.rows(report="broken")
    assert [r.status for r in rows] == ["failed", "failed"]
    assert all((r.error or "").startswith("condition error: when: rows[0].amount > 1000:") for r in rows), rows
    wait_until(lambda: len(inbox.to(OWNER)) >= 1, 30, "the owners' notice", worker.output)
    notices = inbox.to(OWNER)
    assert len(notices) == 1 and "broken" in str(notices[0]["Subject"]), [m["Subject"] for m in notices]
    assert "condition error" in str(notices[0].get_content())
    assert ledger.evaluation("broken", T0) is None  # nothing recorded: an error is not an evaluation

    # The same slot published three times at once (a redelivery, a second beat): one evaluation, one email each.
    slot = T0 + 2 * HOUR
    set_orders(project, slot, 1200.0)
    for _ in range(3):
        app.send_task("email_reports.send", args=("big-orders", isoformat(slot)), queue="reporter.scheduled")
    wait_until(lambda: final(ledger, "big-orders", slot, 2), 90, "the slot to be sent", worker.output)
    wait_until(lambda: len(re.findall(r"email_reports\.send\[[^\]]+\] succeeded", worker.output())) >= 5, 90, "every copy to run")
    assert emails(inbox) == Counter({(isoformat(slot), ANN): 1, (isoformat(slot), BEN): 1})
    # Sent again by hand afterwards, with data that no longer holds: the slot is done, nothing is evaluated anew.
    set_orders(project, slot, 1.0)
    done = run_cli("send", "big-orders", "--sync", "--slot", isoformat(slot), env=env)
    assert done.returncode == 0, done.stderr
    assert re.search(rf"^{ANN}\talready-sent\t", done.stdout, re.M), done.stdout
    recorded = ledger.evaluation("big-orders", slot)
    assert recorded is not None and recorded.value == 1200.0
    assert emails(inbox) == Counter({(isoformat(slot), ANN): 1, (isoformat(slot), BEN): 1})
    ledger.dispose()


def test_send_sync_prints_not_sent_with_the_reason_and_exits_0(make_project: Callable[..., Project], inbox: Inbox) -> None:
    project = alert_project(make_project)
    env = project.env(REPORTER_SMTP_URL=inbox.url)
    set_orders(project, T0, 50.0)
    done = run_cli("send", "big-orders", "--sync", "--slot", isoformat(T0), env=env)
    assert done.returncode == 0, done.stderr
    assert f"{ANN}\tnot-sent\tcondition false: value > 1000 → 50" in done.stdout.splitlines(), done.stdout
    assert inbox.messages == []
    # A manual send records no evaluation (it would be the next scheduled slot's `previous`) ...
    ledger = Ledger.from_url(project.db_url)
    assert ledger.evaluation("big-orders", T0) is None
    preview = run_cli("preview", "big-orders", "--slot", isoformat(T0), "--out", str(project.root / "preview"), env=env)
    assert preview.returncode == 0, preview.stderr
    assert "when:    value > 1000 → False (would not send; notify change)" in preview.stdout, preview.stdout
    assert "already ran" not in preview.stdout
    # ... a scheduled one does, and preview shows what it decided.
    policy = alert.Policy("value > 1000", "rows | sum(attribute='amount')", "change")
    ledger.record_evaluation(alert.evaluation("big-orders", policy, T0, [{"hour": "07:00", "amount": 50.0}], ["hour", "amount"], None))
    ledger.dispose()
    preview = run_cli("preview", "big-orders", "--slot", isoformat(T0), "--out", str(project.root / "preview"), env=env)
    assert "this slot already ran and decided: condition false: value > 1000 → 50" in preview.stdout, preview.stdout
    set_orders(project, T0 + HOUR, 3000.0)
    ahead = run_cli("preview", "big-orders", "--slot", isoformat(T0 + HOUR), "--out", str(project.root / "preview"), env=env)
    assert "when:    value > 1000 → True (would send; notify change)" in ahead.stdout, ahead.stdout
    assert "value:   rows | sum(attribute='amount') → 3000" in ahead.stdout
    # Preview is read-only: it recorded no evaluation.
    ledger = Ledger.from_url(project.db_url)
    assert ledger.evaluation("big-orders", T0 + HOUR) is None
    ledger.dispose()


def test_preview_and_send_of_an_undefined_value_say_why_without_a_traceback(make_project: Callable[..., Project], inbox: Inbox) -> None:
    project = alert_project(make_project)
    project.config.write_text(project.config.read_text() + FIRST_ORDER_YAML)
    env = project.env(REPORTER_SMTP_URL=inbox.url)
    why = "condition error: value: rows | first: is undefined (no rows?)"
    preview = run_cli("preview", "first-order", "--slot", isoformat(T0), "--out", str(project.root / "preview"), env=env)
    assert preview.returncode == 1 and why in preview.stderr and "Traceback" not in preview.stderr, preview.stderr
    done = run_cli("send", "first-order", "--sync", "--slot", isoformat(T0), env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"{ANN}\tfailed\t{why}" in done.stdout.splitlines(), done.stdout
    # Nobody got the alert; the owner was told why.
    assert [(m["To"], why in m.get_content()) for m in inbox.messages] == [(OWNER, True)]

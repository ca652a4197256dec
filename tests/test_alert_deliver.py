"""send_slot with an alert report, in this process (no broker): what each decision writes and tells."""

from __future__ import annotations

import email
import email.policy
import io
import mailbox
import shutil
from collections.abc import Callable, Iterator

import pytest
from openpyxl import load_workbook
from pypdf import PdfReader

from reporter.deliver import send_slot
from reporter.ledger import Ledger
from reporter.live import load_checked
from reporter.mail import transport
from reporter.observers import Observers
from reporter.ratelimit import LocalLimiter
from reporter.runtime import Runtime
from reporter.settings import Settings
from reporter.sheets import XLSX_MIME
from tests.conftest import Project
from tests.test_alert_processes import ANN, BEN, FIRST_ORDER_YAML, HOUR, T0, alert_project, set_orders
from tests.test_deliver import Recorder


@pytest.fixture
def alert_runtime(make_project: Callable[..., Project]) -> Iterator[tuple[Runtime, Recorder, Project]]:
    project = alert_project(make_project)
    settings = Settings.from_env(project.env())
    observer = Recorder()
    ledger = Ledger.from_url(settings.database_url)
    rt = Runtime(settings, load_checked(settings), ledger, LocalLimiter(), lambda: transport(None, settings.outbox), Observers([observer]))
    yield rt, observer, project
    ledger.dispose()


def test_a_false_condition_records_not_sent_for_each_recipient_and_tells_the_observers(
    alert_runtime: tuple[Runtime, Recorder, Project],
) -> None:
    rt, observer, project = alert_runtime
    set_orders(project, T0, 50.0)
    result = send_slot(rt, "big-orders", T0)
    reason = "condition false: value > 1000 → 50"
    assert result.not_sent == {ANN: reason, BEN: reason} and not result.sent and not result.rendered
    assert result.as_dict()["not_sent"] == 2
    assert {(r.recipient, r.status, r.error) for r in rt.ledger.rows(report="big-orders")} == {
        (ANN, "not-sent", reason),
        (BEN, "not-sent", reason),
    }
    assert observer.told() == [(ANN, "not-sent", reason), (BEN, "not-sent", reason)]
    assert not (project.root / "outbox").exists() or len(mailbox.Maildir(project.root / "outbox", create=False)) == 0
    # A later run of the slot (--to someone new) reads the recorded decision, whatever the data says now.
    set_orders(project, T0, 5000.0)
    later = send_slot(rt, "big-orders", T0, only=["cy@example.com"])
    assert later.not_sent == {"cy@example.com": reason}


def test_a_datasource_that_is_down_is_retried_and_records_no_evaluation(alert_runtime: tuple[Runtime, Recorder, Project]) -> None:
    rt, _, project = alert_runtime
    (project.root / "shop.db").unlink()
    (project.root / "shop.db").mkdir()  # SQLite: "unable to open database file", the database being unavailable
    result = send_slot(rt, "big-orders", T0)
    assert sorted(result.retry) == [ANN, BEN] and "unable to open database file" in result.retry[ANN]
    assert rt.ledger.evaluation("big-orders", T0) is None
    assert {r.status for r in rt.ledger.rows(report="big-orders")} == {"queued"}
    shutil.rmtree(project.root / "shop.db")


def test_a_condition_error_fails_the_recipients_and_records_no_evaluation(alert_runtime: tuple[Runtime, Recorder, Project]) -> None:
    rt, observer, project = alert_runtime
    set_orders(project, T0 + HOUR, None)
    result = send_slot(rt, "broken", T0 + HOUR)
    assert list(result.failed) == [ANN] and result.failed[ANN].startswith("condition error: when: rows[0].amount > 1000: ")
    assert rt.ledger.evaluation("broken", T0 + HOUR) is None
    assert observer.told()[0][:2] == (ANN, "failed")


def test_an_alert_sends_every_format_and_its_charts(alert_runtime: tuple[Runtime, Recorder, Project]) -> None:
    rt, _, project = alert_runtime
    set_orders(project, T0, 1234.5)
    result = send_slot(rt, "every-format", T0)
    assert list(result.sent) == [ANN]
    (msg,) = [m for m in mailbox.Maildir(project.root / "outbox", create=False)]
    parsed = email.message_from_bytes(msg.as_bytes(), policy=email.policy.default)
    assert parsed["Subject"] == "Every format 1"
    attached = {part.get_content_type(): part.get_content() for part in parsed.iter_attachments()}
    assert set(attached) == {"application/pdf", "text/csv", XLSX_MIME}
    assert "07:00,1234.5" in attached["text/csv"]
    pdf = "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(attached["application/pdf"])).pages)
    assert "Order at 07:00: 1234.5" in pdf and "Why: condition holds: value > 0 → 1" in pdf
    sheet = load_workbook(io.BytesIO(attached[XLSX_MIME])).active
    assert sheet is not None and [c.value for c in sheet[2]] == ["07:00", 1234.5]
    images = [p for p in parsed.walk() if p.get_content_type() == "image/png"]
    assert len(images) == 1  # the chart, inline


def test_a_value_that_comes_out_undefined_fails_the_slot_with_the_reason(
    make_project: Callable[..., Project],
) -> None:
    # `rows | first` of no rows is a Jinja Undefined, not an error: it must fail the slot, not crash the send.
    project = alert_project(make_project)
    project.config.write_text(project.config.read_text() + FIRST_ORDER_YAML)
    settings = Settings.from_env(project.env())
    observer = Recorder()
    ledger = Ledger.from_url(settings.database_url)
    rt = Runtime(settings, load_checked(settings), ledger, LocalLimiter(), lambda: transport(None, settings.outbox), Observers([observer]))
    try:
        set_orders(project, T0, None)
        result = send_slot(rt, "first-order", T0)
        why = "condition error: value: rows | first: is undefined (no rows?)"
        assert result.failed == {ANN: why} and not result.sent and not result.retry
        assert [(r.recipient, r.status, r.error) for r in ledger.rows(report="first-order")] == [(ANN, "failed", why)]
        assert ledger.evaluation("first-order", T0) is None
        assert observer.told() == [(ANN, "failed", why)]
    finally:
        ledger.dispose()


def subjects(project: Project) -> list[tuple[str, str]]:
    """(To, Subject) of each email in the outbox."""
    out = []
    for msg in mailbox.Maildir(project.root / "outbox", create=False):
        parsed = email.message_from_bytes(msg.as_bytes(), policy=email.policy.default)
        out.append((str(parsed["To"]), str(parsed["Subject"])))
    return sorted(out)


def test_a_manual_send_neither_records_its_evaluation_nor_becomes_the_next_slots_previous(
    alert_runtime: tuple[Runtime, Recorder, Project],
) -> None:
    rt, _, project = alert_runtime
    cy, dan = "cy@example.com", "dan@example.com"
    set_orders(project, T0, 5000.0)
    assert sorted(send_slot(rt, "big-orders", T0).sent) == [ANN, BEN]  # 07:00: the alert
    # A test send at 07:30 (`send --now --to cy`): the orders have gone, so cy gets the recovered email ...
    test_slot = T0 + HOUR / 2
    set_orders(project, test_slot, 50.0)
    assert list(send_slot(rt, "big-orders", test_slot, only=[cy], trigger="manual").sent) == [cy]
    assert rt.ledger.evaluation("big-orders", test_slot) is None
    # ... and `send --slot 07:00 --to dan`, a slot recorded already, keeps its decision whatever the data says now.
    set_orders(project, T0, 50.0)
    assert list(send_slot(rt, "big-orders", T0, only=[dan], trigger="manual").sent) == [dan]
    # 08:00, scheduled: compared with 07:00 (held), not with the test send, so the recipients do get recovered.
    set_orders(project, T0 + HOUR, 50.0)
    later = send_slot(rt, "big-orders", T0 + HOUR)
    assert sorted(later.sent) == [ANN, BEN], later.not_sent
    recorded = rt.ledger.evaluation("big-orders", T0 + HOUR)
    assert recorded is not None and recorded.decision == "recovered"
    assert subjects(project) == [
        (ANN, "Alert 07:00: 5,000.00 EUR"),
        (ANN, "Recovered 08:00"),
        (BEN, "Alert 07:00: 5,000.00 EUR"),
        (BEN, "Recovered 08:00"),
        (cy, "Recovered 07:30"),
        (dan, "Alert 07:00: 5,000.00 EUR"),
    ]

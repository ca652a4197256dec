"""The claimed slot (deliver.ClaimedSlot) and send_slot, against real ledgers: a SQLite file and PostgreSQL.

Each outcome must change the ledger rows and tell the observers once per recipient; an interruption
must hand back exactly the rows never tried and leave the rows whose SMTP transaction was under way
`sending` (docs/reliability.md). Celery's soft time limit is the interruption: the real exception,
raised where Celery would raise it.
"""

from __future__ import annotations

import mailbox
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path

import pytest
from billiard.exceptions import SoftTimeLimitExceeded

from reporter import ledger as L
from reporter.deliver import ClaimedSlot, SendResult, fail_for_good, send_slot
from reporter.errors import TransientDeliveryError
from reporter.ledger import Ledger
from reporter.live import load_checked
from reporter.mail import Outcome, Transport, transport
from reporter.observers import Delivery, Observers
from reporter.ratelimit import LocalLimiter
from reporter.runtime import Runtime
from reporter.settings import Settings
from tests.conftest import Project

SLOT = datetime(2026, 3, 2, 7, 0, tzinfo=UTC)
RCPTS = ["ann@example.com", "ben@example.com", "cy@example.com", "dee@example.com"]
ANN, BEN, CY, DEE = RCPTS
INTERRUPTED = "interrupted before sending"


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    url = f"sqlite:///{tmp_path}/l.db" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    made = Ledger.from_url(url)
    yield made
    made.dispose()


@dataclass
class Recorder:
    """An observer that keeps what it is told."""

    deliveries: list[Delivery] = field(default_factory=list)
    renders: list[tuple[str, datetime, int]] = field(default_factory=list)

    def rendered(self, report: str, slot: datetime, seconds: float, rows: int) -> None:
        self.renders.append((report, slot, rows))

    def delivered(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)

    def configured(self, version: str, problems: int) -> None:
        pass

    def told(self) -> list[tuple[str, str, str | None]]:
        return [(d.recipient, d.status, d.error) for d in self.deliveries]


def rows(ledger: Ledger, report: str = "daily") -> dict[str, L.Row]:
    return {r.recipient: r for r in ledger.rows(report=report)}


def statuses(ledger: Ledger, report: str = "daily") -> dict[str, tuple[str, str | None]]:
    return {k: (r.status, r.error) for k, r in rows(ledger, report).items()}


def claimed(ledger: Ledger, observer: Recorder, recipients: list[str] = RCPTS) -> ClaimedSlot:
    ledger.ensure("daily", SLOT, recipients)
    claim = ledger.claim("daily", SLOT, recipients, stale_after=3600.0)
    assert sorted(claim.mine) == sorted(recipients)
    return ClaimedSlot(ledger, observer, SendResult("daily", SLOT), claim.token, claim.mine)


# ----------------------------------------------------------------------------- outcomes


def test_each_outcome_writes_its_rows_and_tells_the_observers_once_per_recipient(ledger: Ledger) -> None:
    observer = Recorder()
    held = claimed(ledger, observer)
    assert held.sending([ANN, BEN], "<m1@x>")
    assert {k: r.status for k, r in rows(ledger).items()} == {ANN: "sending", BEN: "sending", CY: "rendering", DEE: "rendering"}

    held.sent([ANN, BEN], "<m1@x>", seconds=0.25, size=1234, waited=0.5)  # a batch: one call for both
    held.failed([CY], "SMTP 550 no such user", seconds=0.1, msg_id="<m2@x>")
    held.retry([DEE], "SMTP 451 try later", seconds=0.1, msg_id="<m3@x>")

    found = rows(ledger)
    assert [(found[r].status, found[r].message_id, found[r].duration_ms, found[r].size_bytes, found[r].wait_ms) for r in (ANN, BEN)] == [
        ("sent", "<m1@x>", 250, 1234, 500)
    ] * 2
    assert (found[CY].status, found[CY].error) == ("failed", "SMTP 550 no such user")
    assert (found[DEE].status, found[DEE].error, found[DEE].claimed_at) == ("queued", "SMTP 451 try later", None)
    assert observer.told() == [
        (ANN, "sent", None),
        (BEN, "sent", None),
        (CY, "failed", "SMTP 550 no such user"),
        (DEE, "retry", "SMTP 451 try later"),
    ]
    assert [(d.message_id, d.size) for d in observer.deliveries] == [("<m1@x>", 1234), ("<m1@x>", 1234), ("<m2@x>", None), ("<m3@x>", None)]
    assert (held.result.sent, held.result.failed, held.result.retry) == (
        {ANN: "<m1@x>", BEN: "<m1@x>"},
        {CY: "SMTP 550 no such user"},
        {DEE: "SMTP 451 try later"},
    )
    assert held.pending == [] and held.in_flight == []

    held.release()  # nothing is left to hand back: no write, nobody told
    assert rows(ledger) == found and len(observer.deliveries) == 4


def test_a_final_row_is_not_reopened_by_a_later_outcome(ledger: Ledger) -> None:
    held = claimed(ledger, Recorder(), [ANN])
    held.sending([ANN], "<m@x>")
    held.sent([ANN], "<m@x>", 0.1, 10, 0.0)
    held.retry([ANN], "late")
    assert statuses(ledger) == {ANN: ("sent", None)}


# ----------------------------------------------------------------------------- interruptions


def interrupt_in_transaction(held: ClaimedSlot) -> None:
    held.sending([BEN], "<b@x>")
    with held.transaction([BEN]):
        raise SoftTimeLimitExceeded()


def interrupt_before_transaction(held: ClaimedSlot) -> None:
    held.sending([BEN], "<b@x>")  # committed; then the limit strikes while connecting or waiting for the rate limit
    raise SoftTimeLimitExceeded()


def interrupt_while_recording(held: ClaimedSlot) -> None:
    held.sending([BEN, CY], "<bc@x>")
    with held.transaction([BEN, CY]):
        pass  # the server accepted the message
    held.sent([BEN], "<bc@x>", 0.1, 10, 0.0)
    raise SoftTimeLimitExceeded()


def interrupt_after_a_refusal(held: ClaimedSlot) -> None:
    held.sending([BEN], "<b@x>")
    try:
        with held.transaction([BEN]):
            raise TransientDeliveryError("SMTP 421 closing")
    except TransientDeliveryError:
        raise SoftTimeLimitExceeded() from None  # before the refusal is recorded


@pytest.mark.parametrize(
    ("strike", "expected"),
    [
        # The server may have BEN's message: BEN stays 'sending' (the sweep resends it once stale).
        (interrupt_in_transaction, {BEN: ("sending", None), CY: ("queued", INTERRUPTED), DEE: ("queued", INTERRUPTED)}),
        # BEN's transaction never started: BEN is handed back with the rest.
        (interrupt_before_transaction, {BEN: ("queued", INTERRUPTED), CY: ("queued", INTERRUPTED), DEE: ("queued", INTERRUPTED)}),
        # The server accepted BEN and CY; CY was not recorded yet and stays 'sending'.
        (interrupt_while_recording, {BEN: ("sent", None), CY: ("sending", None), DEE: ("queued", INTERRUPTED)}),
        # The server refused the message, so it does not have it: BEN may go back.
        (interrupt_after_a_refusal, {BEN: ("queued", INTERRUPTED), CY: ("queued", INTERRUPTED), DEE: ("queued", INTERRUPTED)}),
    ],
    ids=["in-transaction", "before-transaction", "while-recording", "after-a-refusal"],
)
def test_an_interruption_hands_back_exactly_the_untried_rows(
    ledger: Ledger, strike: Callable[[ClaimedSlot], None], expected: dict[str, tuple[str, str | None]]
) -> None:
    observer = Recorder()
    held = claimed(ledger, observer)
    with pytest.raises(SoftTimeLimitExceeded), held:
        held.sending([ANN], "<a@x>")
        with held.transaction([ANN]):
            pass
        held.sent([ANN], "<a@x>", 0.1, 10, 0.0)
        strike(held)
    assert statuses(ledger) == {ANN: ("sent", None), **expected}
    # A hand-back is not a delivery outcome: the observers heard of the recorded ones only.
    assert [d.recipient for d in observer.deliveries] == [ANN, *(r for r, (status, _) in expected.items() if status == "sent")]


def test_a_claim_taken_over_sends_nothing_and_hands_nothing_back(ledger: Ledger) -> None:
    observer = Recorder()
    held = claimed(ledger, observer, [ANN, BEN])
    # Another execution takes the rows over, as if this one had outlived its claim.
    other = ledger.claim("daily", SLOT, [ANN, BEN], stale_after=-3600.0)
    assert sorted(other.mine) == [ANN, BEN]
    with held:
        assert not held.sending([ANN], "<a@x>")
        assert held.pending == [BEN]
    # BEN's hand-back named this execution's token, so the new holder keeps both rows.
    assert statuses(ledger) == {ANN: ("rendering", None), BEN: ("rendering", None)}
    assert observer.deliveries == []


# ----------------------------------------------------------------------------- send_slot, end to end


class StrikesOnSend:
    """The real Maildir transport, with ERROR raised in its SEND-th transaction."""

    def __init__(self, inner: Transport, send: int, error: BaseException) -> None:
        self.inner, self.strike_at, self.error, self.sends = inner, send, error, 0

    def connect(self) -> None:
        self.inner.connect()

    def send(self, msg: EmailMessage, sender: str, recipients: list[str], blind: list[str] | None = None) -> Outcome:
        self.sends += 1
        if self.sends == self.strike_at:
            raise self.error
        return self.inner.send(msg, sender, recipients, blind)

    def close(self) -> None:
        self.inner.close()

    def describe(self) -> str:
        return self.inner.describe()


@pytest.fixture
def runtime_for(
    ledger: Ledger, make_project: Callable[..., Project]
) -> Callable[[int, BaseException | None], tuple[Runtime, Recorder, Path]]:
    """A Runtime on the project's config and the LEDGER whose Maildir transport raises in a given send."""

    def make(strike_at: int = 0, error: BaseException | None = None) -> tuple[Runtime, Recorder, Path]:
        project = make_project(recipients=[ANN, BEN, CY])
        settings = Settings.from_env(project.env())
        observer = Recorder()

        def mailer() -> Transport:
            real = transport(None, settings.outbox)
            return real if error is None else StrikesOnSend(real, strike_at, error)

        rt = Runtime(settings, load_checked(settings), ledger, LocalLimiter(), mailer, Observers([observer]))
        return rt, observer, settings.outbox

    return make


def delivered_to(outbox: Path) -> list[str]:
    return sorted(str(m["To"]) for m in mailbox.Maildir(outbox, create=False))


def test_send_slot_sends_each_recipient_once_and_a_second_run_finds_them_sent(
    ledger: Ledger, runtime_for: Callable[..., tuple[Runtime, Recorder, Path]]
) -> None:
    rt, observer, outbox = runtime_for()
    first = send_slot(rt, "regional", SLOT)
    again = send_slot(rt, "regional", SLOT)
    assert first.as_dict() == {
        **{"report": "regional", "slot": "2026-03-02T07:00:00Z", "rendered": True},
        **{"sent": 3, "already": 0, "failed": 0, "retry": 0, "busy": 0, "not_sent": 0},
    }
    assert again.as_dict()["already"] == 3 and again.as_dict()["sent"] == 0 and not again.rendered
    assert delivered_to(outbox) == [ANN, BEN, CY]
    assert observer.told() == [(ANN, "sent", None), (BEN, "sent", None), (CY, "sent", None)]
    assert [(report, rows_) for report, _, rows_ in observer.renders] == [("regional", 3)]
    assert {r.status for r in rows(ledger, "regional").values()} == {"sent"}


def test_send_slot_interrupted_in_the_second_transaction_leaves_it_sending_and_hands_back_the_third(
    ledger: Ledger, runtime_for: Callable[..., tuple[Runtime, Recorder, Path]]
) -> None:
    rt, observer, outbox = runtime_for(2, SoftTimeLimitExceeded())
    with pytest.raises(SoftTimeLimitExceeded):
        send_slot(rt, "regional", SLOT)
    assert statuses(ledger, "regional") == {ANN: ("sent", None), BEN: ("sending", None), CY: ("queued", INTERRUPTED)}
    assert delivered_to(outbox) == [ANN]
    assert observer.told() == [(ANN, "sent", None)]


def test_send_slot_hands_back_the_refused_message_and_every_later_one_in_one_retry(
    ledger: Ledger, runtime_for: Callable[..., tuple[Runtime, Recorder, Path]]
) -> None:
    rt, observer, _ = runtime_for(2, TransientDeliveryError("SMTP 421 closing"))
    result = send_slot(rt, "regional", SLOT)
    assert (list(result.sent), result.retry) == ([ANN], {BEN: "SMTP 421 closing", CY: "SMTP 421 closing"})
    assert statuses(ledger, "regional") == {ANN: ("sent", None), BEN: ("queued", "SMTP 421 closing"), CY: ("queued", "SMTP 421 closing")}
    # Both are told with the refused message's id: the transaction that failed for them.
    retried = [d for d in observer.deliveries if d.status == "retry"]
    assert [d.recipient for d in retried] == [BEN, CY] and len({d.message_id for d in retried}) == 1


def test_fail_for_good_records_each_handed_back_recipient_failed_once(
    ledger: Ledger, runtime_for: Callable[..., tuple[Runtime, Recorder, Path]]
) -> None:
    rt, observer, _ = runtime_for(1, TransientDeliveryError("SMTP 421 closing"))
    result = send_slot(rt, "regional", SLOT)
    fail_for_good(rt, result, "gave up")
    failed = "SMTP 421 closing (gave up)"
    assert statuses(ledger, "regional") == {ANN: ("failed", failed), BEN: ("failed", failed), CY: ("failed", failed)}
    assert (result.retry, result.failed) == ({}, {ANN: failed, BEN: failed, CY: failed})
    told = [(r, s) for r, s, _ in observer.told()]
    assert told == [(ANN, "retry"), (BEN, "retry"), (CY, "retry"), (ANN, "failed"), (BEN, "failed"), (CY, "failed")]

"""Send one report slot: claim the recipients' ledger rows, render once, send each message, record each.

Plain functions over a Runtime, so tests and `reporter send --sync` call them without a broker; the
Celery task in tasks.py only adds retries and time limits around `send_slot`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import parseaddr
from types import TracebackType
from typing import Any

from reporter import alert
from reporter.audience import Audience, Envelope, audience, envelopes
from reporter.config import Report
from reporter.errors import PermanentDeliveryError, RenderError, TransientDeliveryError
from reporter.ledger import Ledger
from reporter.mail import MessageFactory, Transport, list_headers, message_id
from reporter.observers import Delivery, Observer
from reporter.render import Rendered
from reporter.runtime import Runtime
from reporter.schedule import isoformat


@dataclass
class SendResult:
    """What happened to each recipient of one (report, slot) in one execution."""

    report: str
    slot: datetime
    sent: dict[str, str] = field(default_factory=dict)
    """recipient -> Message-ID"""
    already: list[str] = field(default_factory=list)
    """recipients whose row was already final (sent, failed or skipped) before this execution"""
    failed: dict[str, str] = field(default_factory=dict)
    """recipient -> error, final"""
    retry: dict[str, str] = field(default_factory=dict)
    """recipient -> transient error; released to be tried again"""
    busy: list[str] = field(default_factory=list)
    """recipients another live execution holds"""
    not_sent: dict[str, str] = field(default_factory=dict)
    """recipient -> why this slot sends them nothing (an alert whose condition was false), final"""
    busy_until: datetime | None = None
    rendered: bool = False

    def as_dict(self) -> dict[str, Any]:
        """The task's small, JSON-able result."""
        return {
            "report": self.report,
            "slot": isoformat(self.slot),
            "sent": len(self.sent),
            "already": len(self.already),
            "failed": len(self.failed),
            "retry": len(self.retry),
            "busy": len(self.busy),
            "not_sent": len(self.not_sent),
            "rendered": self.rendered,
        }


class ClaimedSlot:
    """The ledger rows of one (report, slot) that one execution claimed, and what becomes of each.

    Bound to the ledger, the claim's token, the execution's result and the observers, so that each
    outcome is written, noted and told the same way: `sent`, `failed` and `retry` write the ledger
    (one statement for all the recipients given), then note each recipient in the result and tell the
    observers once per recipient. The exactly-once invariants of docs/reliability.md live here:

    - Only claimed rows change: every write names this claim's token and touches rows still in
      flight (`rendering`, `sending`) only, so `sent`, `failed` and `skipped` stay final, and a
      claim another execution took over (this one outlived it) changes nothing.
    - `sending` is committed before a message's SMTP transaction starts; when it changes no row,
      the claim was taken over and the message is not sent (its new holder sends it).
    - From the start of the SMTP transaction (`transaction`) until their outcome is recorded, the
      rows are in flight: the server may have the message, so nothing hands them back. Interrupted
      there (soft time limit, shutdown, a killed process) they stay `sending`, and the sweep sends
      them again once the claim is stale: at least once, with the same Message-ID.
    - A transaction that ends in an SMTP error or a failed connection left the server without the
      message: its rows are no longer in flight and may be handed back.
    - Leaving the `with` block, for whatever reason, `release` hands back (`queued`) exactly the
      claimed rows never tried, so another execution can send them at once; nobody is told, as
      nothing was delivered (the task retries or gives up on them).
    """

    def __init__(self, ledger: Ledger, observers: Observer, result: SendResult, token: str, rows: Sequence[str]) -> None:
        self.ledger = ledger
        self.observers = observers
        self.result = result
        self.token = token
        self.pending: list[str] = list(rows)
        """Claimed rows whose outcome is not recorded yet."""
        self.in_flight: list[str] = []
        """Rows of the SMTP transaction under way or answered and not yet recorded."""

    @property
    def report(self) -> str:
        return self.result.report

    @property
    def slot(self) -> datetime:
        return self.result.slot

    def sending(self, rows: Sequence[str], msg_id: str) -> bool:
        """Commit ROWS as `sending` message MSG_ID; False if the claim was taken over, so that they are
        no longer this execution's."""
        if self.ledger.mark_sending(self.token, self.report, self.slot, rows, msg_id):
            return True
        self._settled(rows)
        return False

    @contextmanager
    def transaction(self, rows: Sequence[str]) -> Iterator[None]:
        """Around the SMTP transaction of ROWS' message: in flight from its start, unless it fails."""
        self.in_flight = list(rows)
        try:
            yield
        except (TransientDeliveryError, PermanentDeliveryError):
            self.in_flight = []  # the server refused the message or never got it
            raise

    def sent(self, recipients: Sequence[str], msg_id: str, seconds: float, size: int, waited: float) -> None:
        """RECIPIENTS got message MSG_ID: SIZE bytes in an SMTP transaction of SECONDS, after WAITED
        seconds for the rate limit."""
        self.ledger.mark_sent(self.token, self.report, self.slot, recipients, msg_id, int(seconds * 1000), size, int(waited * 1000))
        self._tell(recipients, "sent", None, seconds, msg_id, size)

    def failed(self, recipients: Sequence[str], error: str, seconds: float = 0.0, msg_id: str | None = None) -> None:
        """RECIPIENTS' delivery failed for good with ERROR."""
        self.ledger.mark_failed(self.token, self.report, self.slot, recipients, error)
        self._tell(recipients, "failed", error, seconds, msg_id)

    def not_sent(self, recipients: Sequence[str], reason: str) -> None:
        """RECIPIENTS get nothing for this slot, on purpose, for REASON (final: an alert's decision)."""
        self.ledger.mark_not_sent(self.token, self.report, self.slot, recipients, reason)
        self._tell(recipients, "not-sent", reason, 0.0, None)

    def retry(self, recipients: Sequence[str], error: str, seconds: float = 0.0, msg_id: str | None = None) -> None:
        """RECIPIENTS' delivery failed with a transient ERROR: hand them back to be tried again."""
        self.ledger.release(self.token, self.report, self.slot, recipients, error)
        self._tell(recipients, "retry", error, seconds, msg_id)

    def release(self, why: str = "interrupted before sending") -> None:
        """Hand back the claimed rows never tried; those in flight stay `sending`."""
        untried = [r for r in self.pending if r not in self.in_flight]
        if untried:
            self.ledger.release(self.token, self.report, self.slot, untried, why)
            self._settled(untried)

    def hand_back(self, why: str) -> None:
        """Hand back the claimed rows never tried, as `release`, but not counting this claim as an attempt
        on them (a burst piece handing them to a fresh piece has not tried them)."""
        untried = [r for r in self.pending if r not in self.in_flight]
        if untried:
            self.ledger.hand_back(self.token, self.report, self.slot, untried, why)
            self._settled(untried)

    def __enter__(self) -> ClaimedSlot:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None) -> None:
        self.release()

    def _tell(
        self, recipients: Sequence[str], status: str, error: str | None, seconds: float, msg_id: str | None, size: int | None = None
    ) -> None:
        result = self.result
        for recipient in recipients:
            if status == "sent":
                result.sent[recipient] = msg_id or ""
            elif status == "failed":
                result.failed[recipient] = error or ""
            elif status == "not-sent":
                result.not_sent[recipient] = error or ""
            else:
                result.retry[recipient] = error or ""
            self.observers.delivered(Delivery(self.report, self.slot, recipient, status, seconds, msg_id, size, error))
        self._settled(recipients)

    def _settled(self, rows: Sequence[str]) -> None:
        done = set(rows)
        self.pending = [r for r in self.pending if r not in done]
        self.in_flight = [r for r in self.in_flight if r not in done]


@dataclass(frozen=True)
class Mailing:
    """One rendered slot's messages, and what they all share."""

    who: Audience
    messages: tuple[Envelope, ...]
    sender: str
    factory: MessageFactory
    """The body, encoded once for every message; each message adds only its own headers"""
    group: bool
    bucket: str
    """The rate limit's bucket: the report's own, or the shared default one"""
    rate: float

    @classmethod
    def of(cls, rt: Runtime, name: str, report: Report, rendered: Rendered, who: Audience, rows: Sequence[str]) -> Mailing:
        """The messages that deliver ROWS of report NAME once each."""
        sender = rt.config.sender_of(report)
        headers = list_headers(name, report.description, report.owners, sender, rt.config.unsubscribe_url_of(report))
        bucket = name if report.rate_limit else "default"
        messages = tuple(envelopes(who, rows, report.group))
        factory = MessageFactory(rendered, sender, "html" in report.formats, headers)
        return cls(who, messages, sender, factory, report.group, bucket, rt.config.rate_of(report))

    def rows_from(self, index: int) -> list[str]:
        """The rows of message INDEX and of every message after it."""
        return [r for m in self.messages[index:] for r in m.rows]


def send_slot(
    rt: Runtime, name: str, slot: datetime, only: Sequence[str] | None = None, trigger: str = "schedule", task_id: str | None = None
) -> SendResult:
    """Deliver report NAME for SLOT (aware UTC) to its recipients, or to ONLY, exactly once each."""
    report = rt.config.report(name)
    if report.burst is not None:
        from reporter import burst  # it builds on this module

        return burst.send_burst(rt, name, slot, only, trigger, task_id)
    result = SendResult(name, slot)
    if only:
        from reporter import burst

        # Rows a burst planning made, left by a configuration that had burst:, never get the whole report.
        only = burst.unplanned_rows(rt, name, slot, only, result, task_id)
        if not only:
            return result
    # Cc and Bcc readers are rows like any recipient: claimed, sent once and recorded (audience.py).
    who = audience(report, only or None)
    rt.ledger.ensure(name, slot, who.keys(), trigger)
    claim = rt.ledger.claim(name, slot, who.keys(), rt.stale_after, task_id, config_version=rt.config.version)
    result.already.extend(claim.done)
    result.busy.extend(claim.busy)
    result.busy_until = max((t for t in (result.busy_until, claim.busy_until) if t is not None), default=None)
    if not claim.mine:
        return result
    # However this block is left (soft time limit, shutdown), what was never tried is handed back.
    with ClaimedSlot(rt.ledger, rt.observers, result, claim.token, claim.mine) as held:
        rendered = render_once(rt, held, trigger=trigger)
        if rendered is None:
            return result
        mailing = Mailing.of(rt, name, report, rendered, who, held.pending)
        mailer = rt.transport()
        try:
            for index in range(len(mailing.messages)):
                if not send_message(rt, held, mailer, mailing, index):
                    break
        finally:
            mailer.close()
    return result


def render_once(rt: Runtime, held: ClaimedSlot, *, trigger: str = "schedule") -> Rendered | None:
    """HELD's slot rendered once for all its recipients; None if it cannot be (recorded for each).
    TRIGGER is what asked for the slot: an alert records its evaluation for scheduled slots only."""
    started = time.monotonic()
    try:
        if rt.config.reports[held.report].when is None:
            rendered = rt.renderer.render(held.report, held.slot)
        elif (found := render_alert(rt, held, trigger=trigger)) is not None:
            rendered = found
        else:
            return None
    except RenderError as exc:
        held.failed(held.pending, str(exc))
        return None
    except TransientDeliveryError as exc:
        held.retry(held.pending, str(exc))
        return None
    held.result.rendered = True
    rt.observers.rendered(held.report, held.slot, time.monotonic() - started, rendered.row_count)
    return rendered


def render_alert(rt: Runtime, held: ClaimedSlot, *, trigger: str = "schedule") -> Rendered | None:
    """HELD's slot of an alert report, rendered if its (recorded, else evaluated and, unless TRIGGER is
    "manual", recorded) decision sends; None when it sends nothing, recorded `not-sent` with the reason
    for each recipient. A condition that cannot be evaluated raises ConditionError (a RenderError:
    failed, owners told); a datasource that is down raises TransientDeliveryError before anything is
    evaluated or recorded."""
    name, slot = held.report, held.slot
    report = rt.config.reports[name]
    recorded = rt.ledger.evaluation(name, slot)
    if recorded is not None and recorded.decision == alert.NOT_SENT:
        held.not_sent(held.pending, recorded.reason)  # decided before: no need to fetch the data again
        return None
    table = rt.renderer.fetch(name, slot)
    zone = rt.config.zone(report)
    found, before = alert.judge(
        rt.ledger,
        name,
        alert.Policy.of(report),
        slot,
        table.dicts(),
        table.columns,
        at=lambda s: alert.slot_label(s, zone),
        record=trigger != "manual",  # a manual send's decision is not the next scheduled slot's `previous`
    )
    if found.decision == alert.NOT_SENT:
        held.not_sent(held.pending, found.reason)
        return None
    return rt.renderer.render_table(name, slot, table, extra=alert.template_context(found, before), spec=alert.email_spec(report, found))


def send_message(rt: Runtime, held: ClaimedSlot, mailer: Transport, mailing: Mailing, index: int) -> bool:
    """Send message INDEX of MAILING and record each of its rows. False if the server or the network is
    in trouble: then its rows and those of every later message are handed back for a retry."""
    message = mailing.messages[index]
    msg_id = message_id(held.report, held.slot, message.id_key(mailing.group), mailing.sender)
    to, cc = [mailing.who.to[r] for r in message.to], [mailing.who.cc[r] for r in message.cc]
    msg = mailing.factory.outgoing(to, cc, msg_id)
    if not held.sending(message.rows, msg_id):
        return True  # our claim was taken over (this run outlived it): its new holder sends
    started = time.monotonic()
    waited = 0.0
    try:
        # Connect first and reserve the send time last, so sends reach the server spaced as the limit says.
        mailer.connect()
        waiting = time.monotonic()
        rt.limiter.acquire(mailing.bucket, mailing.rate)
        waited = time.monotonic() - waiting
        with held.transaction(message.rows):
            outcome = mailer.send(msg, parseaddr(mailing.sender)[1], [*message.to, *message.cc], blind=list(message.bcc))
    except TransientDeliveryError as exc:
        # The server or the network is in trouble: give back this message and every later one.
        held.retry(mailing.rows_from(index), str(exc), time.monotonic() - started - waited, msg_id)
        return False
    except PermanentDeliveryError as exc:
        held.failed(message.rows, str(exc), time.monotonic() - started - waited, msg_id)
        return True
    seconds = time.monotonic() - started - waited  # the SMTP transaction, not the rate limit's wait
    size = msg.size
    for recipient in message.rows:  # in flight until recorded: an interruption leaves them 'sending'
        refused = outcome.refused.get(recipient)
        if refused is None:
            held.sent([recipient], msg_id, seconds, size, waited)
            continue
        error = f"SMTP {refused[0]} {refused[1]} for {recipient}"
        if 400 <= refused[0] < 500:
            held.retry([recipient], error, seconds, msg_id)
        else:
            held.failed([recipient], error, seconds, msg_id)
    return True


def fail_for_good(rt: Runtime, result: SendResult, why: str) -> None:
    """Retries are used up: record the released recipients as failed."""
    for recipient, error in list(result.retry.items()):
        claim = rt.ledger.claim(result.report, result.slot, [recipient], rt.stale_after, attempt=False)
        del result.retry[recipient]
        if claim.mine:
            ClaimedSlot(rt.ledger, rt.observers, result, claim.token, claim.mine).failed(claim.mine, f"{error} ({why})")

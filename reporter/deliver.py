"""Send one report slot: claim the recipients' ledger rows, render once, send each, record each.

Plain functions over a Runtime, so tests and `reporter send --sync` call them without a broker; the
Celery task in tasks.py only adds retries and time limits around `send_slot`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parseaddr
from functools import cached_property
from typing import TYPE_CHECKING, Any, Protocol

from reporter.audience import audience, envelopes
from reporter.config import Config
from reporter.errors import PermanentDeliveryError, RenderError, TransientDeliveryError
from reporter.ledger import Ledger
from reporter.mail import MessageFactory, Transport, list_headers, message_id, transport
from reporter.ratelimit import Limiter
from reporter.render import Renderer
from reporter.schedule import isoformat
from reporter.settings import Settings

if TYPE_CHECKING:
    from reporter.live import Live

log = logging.getLogger(__name__)

CLAIM_MARGIN = 30
"""Seconds past the hard time limit before a claim counts as abandoned by a killed process."""


@dataclass(frozen=True)
class Delivery:
    """What happened to one email: what observers (logs, metrics) are told."""

    report: str
    slot: datetime
    recipient: str
    status: str
    """sent, failed (for good) or retry (handed back for another attempt)"""
    seconds: float
    message_id: str | None
    size: int | None
    error: str | None

    def fields(self) -> dict[str, Any]:
        return {
            "report": self.report,
            "slot": isoformat(self.slot),
            "recipient": self.recipient,
            "status": self.status,
            "duration_ms": int(self.seconds * 1000),
            "message_id": self.message_id,
            "size": self.size,
            "error": self.error,
            "lag_s": round((datetime.now(UTC) - self.slot).total_seconds(), 3),
        }


class Observer(Protocol):
    """Told of each render and each delivery (metrics, structured logs)."""

    def rendered(self, report: str, slot: datetime, seconds: float, rows: int) -> None: ...

    def delivered(self, delivery: Delivery) -> None: ...

    def configured(self, version: str, problems: int) -> None: ...


class LogObserver:
    """One log line per delivery: key=value, or a JSON object with `as_json`."""

    def __init__(self, as_json: bool = False) -> None:
        self.as_json = as_json

    def rendered(self, report: str, slot: datetime, seconds: float, rows: int) -> None:
        log.debug("rendered report=%s slot=%s rows=%d ms=%d", report, isoformat(slot), rows, seconds * 1000)

    def delivered(self, delivery: Delivery) -> None:
        fields = delivery.fields()
        if self.as_json:
            log.info("%s", json.dumps({"event": "delivery", **fields}, sort_keys=False))
        else:
            log.info("delivery %s", " ".join(f"{k}={v}" for k, v in fields.items() if v is not None))

    def configured(self, version: str, problems: int) -> None:
        pass  # live.py logs configuration changes and problems itself


@dataclass
class Runtime:
    """What a process needs to send: settings, config, ledger, renderer, rate limiter, transport."""

    settings: Settings
    config: Config
    ledger: Ledger
    limiter: Limiter
    transport_factory: Callable[[], Transport] | None = None
    observers: list[Observer] = field(default_factory=list)
    live: Live | None = None
    """Follows edits of schedules.yaml (live.py); None: this runtime keeps the config it was built with."""

    def follow(self, version: str | None = None) -> Config:
        """Apply an edited configuration if the files hold a valid one; with VERSION (what a task was
        dispatched under), make sure the config is that version or a newer one. ConfigError if it cannot be had."""
        if self.live is not None:
            self.live.refresh()
            self.live.at_least(version)
        return self.config

    def use(self, config: Config) -> None:
        """Run CONFIG from now on; what was built from the previous one is built again on first use."""
        renderer = self.__dict__.pop("renderer", None)
        self.__dict__.pop("stale_after", None)
        self.config = config
        if renderer is not None:
            renderer.datasources.dispose()

    def tell(self, event: str, *args: Any) -> None:
        """Call every observer's EVENT; an observer's failure never stops a delivery."""
        for observer in self.observers:
            try:
                getattr(observer, event)(*args)
            except Exception:  # metrics and logs must never break sending
                log.exception("observer %r failed on %s", observer, event)

    @cached_property
    def renderer(self) -> Renderer:
        return Renderer(self.config)

    def transport(self) -> Transport:
        if self.transport_factory is not None:
            return self.transport_factory()
        return transport(self.settings.smtp_url, self.settings.outbox)

    def time_limits(self, name: str) -> tuple[float, float]:
        """(soft, hard) seconds for one send of report NAME: the config's, plus the time its
        recipients wait for the rate limit, so a report is not cut off by its own limit."""
        report = self.config.reports[name]
        # One message per To address (or one for all), and one more when Cc/Bcc must go on their own.
        messages = (1 if report.group else len(report.recipients)) + (1 if report.cc or report.bcc else 0)
        waiting = messages / self.config.rate_of(report)
        d = self.config.defaults
        return d.soft_time_limit + waiting, d.time_limit + waiting

    @cached_property
    def stale_after(self) -> float:
        """Seconds after which another execution's claim is taken to be dead: longer than any send
        task may live (its hard limit), so the claim of a task that is still running is never taken."""
        hard = max((self.time_limits(name)[1] for name in self.config.reports), default=self.config.defaults.time_limit)
        return hard + CLAIM_MARGIN


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
            "rendered": self.rendered,
        }


def send_slot(
    rt: Runtime, name: str, slot: datetime, only: Sequence[str] | None = None, trigger: str = "schedule", task_id: str | None = None
) -> SendResult:
    """Deliver report NAME for SLOT (aware UTC) to its recipients, or to ONLY, exactly once each."""
    report = rt.config.report(name)
    # Cc and Bcc readers are rows like any recipient: claimed, sent once and recorded (audience.py).
    who = audience(report, only or None)
    result = SendResult(name, slot)
    rt.ledger.ensure(name, slot, who.keys(), trigger)
    claim = rt.ledger.claim(name, slot, who.keys(), rt.stale_after, task_id, config_version=rt.config.version)
    result.already = list(claim.done)
    result.busy, result.busy_until = list(claim.busy), claim.busy_until
    if not claim.mine:
        return result

    pending = list(claim.mine)
    in_flight: list[str] = []
    try:
        render_started = time.monotonic()
        try:
            rendered = rt.renderer.render(name, slot)
            result.rendered = True
        except RenderError as exc:
            rt.ledger.mark_failed(claim.token, name, slot, pending, str(exc))
            record(rt, result, pending, "failed", str(exc))
            pending = []
            return result
        except TransientDeliveryError as exc:
            rt.ledger.release(claim.token, name, slot, pending, str(exc))
            record(rt, result, pending, "retry", str(exc))
            pending = []
            return result
        rt.tell("rendered", name, slot, time.monotonic() - render_started, rendered.row_count)

        sender = rt.config.sender_of(report)
        with_html = "html" in report.formats
        groups = envelopes(who, pending, report.group)
        headers = list_headers(name, report.description, report.owners, sender, rt.config.unsubscribe_url_of(report))
        messages = MessageFactory(rendered, sender, with_html, headers)  # the body encoded once for every message
        rate = rt.config.rate_of(report)
        bucket = name if report.rate_limit else "default"
        mailer = rt.transport()
        try:
            for message in groups:
                group = message.rows
                msg_id = message_id(name, slot, message.id_key(report.group), sender)
                to, cc = [who.to[r] for r in message.to], [who.cc[r] for r in message.cc]
                msg = messages.outgoing(to, cc, msg_id)
                if not rt.ledger.mark_sending(claim.token, name, slot, group, msg_id):
                    # Our claim was taken over (this run outlived it): its new holder sends.
                    pending = [r for r in pending if r not in group]
                    continue
                started = time.monotonic()
                waited = 0.0
                try:
                    # Connect first and reserve the send time last, so sends reach the server spaced
                    # as the limit says.
                    mailer.connect()
                    waiting = time.monotonic()
                    rt.limiter.acquire(bucket, rate)
                    waited = time.monotonic() - waiting
                    in_flight = group  # from here until the reply, the server may have the message
                    outcome = mailer.send(msg, parseaddr(sender)[1], [*message.to, *message.cc], blind=list(message.bcc))
                except TransientDeliveryError as exc:
                    # The server or the network is in trouble: give back this group and the rest.
                    in_flight = []
                    rest = [r for g in groups[groups.index(message) :] for r in g.rows]
                    rt.ledger.release(claim.token, name, slot, rest, str(exc))
                    record(rt, result, rest, "retry", str(exc), time.monotonic() - started - waited, msg_id)
                    pending = []
                    break
                except PermanentDeliveryError as exc:
                    in_flight = []
                    rt.ledger.mark_failed(claim.token, name, slot, group, str(exc))
                    record(rt, result, group, "failed", str(exc), time.monotonic() - started - waited, msg_id)
                    pending = [r for r in pending if r not in group]
                    continue
                seconds = time.monotonic() - started - waited  # the SMTP transaction, not the rate limit's wait
                size = msg.size
                # The server has the message: from here an interruption must not hand these rows
                # back (that would resend); unrecorded ones stay 'sending' (docs/reliability.md).
                pending = [r for r in pending if r not in group]
                for recipient in group:
                    refused = outcome.refused.get(recipient)
                    if refused is None:
                        rt.ledger.mark_sent(claim.token, name, slot, [recipient], msg_id, int(seconds * 1000), size, int(waited * 1000))
                        record(rt, result, [recipient], "sent", None, seconds, msg_id, size)
                        continue
                    error = f"SMTP {refused[0]} {refused[1]} for {recipient}"
                    if 400 <= refused[0] < 500:
                        rt.ledger.release(claim.token, name, slot, [recipient], error)
                        record(rt, result, [recipient], "retry", error, seconds, msg_id)
                    else:
                        rt.ledger.mark_failed(claim.token, name, slot, [recipient], error)
                        record(rt, result, [recipient], "failed", error, seconds, msg_id)
                in_flight = []
        finally:
            mailer.close()
    finally:
        # Interrupted (soft time limit, shutdown): hand back what was never tried. A message whose
        # SMTP transaction was under way stays 'sending' until its claim goes stale: whether the
        # server accepted it is unknown, and docs/reliability.md says how that case is resolved.
        untried = [r for r in pending if r not in in_flight]
        if untried:
            rt.ledger.release(claim.token, name, slot, untried, "interrupted before sending")
    return result


def record(
    rt: Runtime,
    result: SendResult,
    recipients: Sequence[str],
    status: str,
    error: str | None,
    seconds: float = 0.0,
    msg_id: str | None = None,
    size: int | None = None,
) -> None:
    """Note RECIPIENTS' outcome in the result and tell the observers."""
    for recipient in recipients:
        if status == "sent":
            result.sent[recipient] = msg_id or ""
        elif status == "failed":
            result.failed[recipient] = error or ""
        else:
            result.retry[recipient] = error or ""
        rt.tell("delivered", Delivery(result.report, result.slot, recipient, status, seconds, msg_id, size, error))


def fail_for_good(rt: Runtime, result: SendResult, why: str) -> None:
    """Retries are used up: record the released recipients as failed."""
    for recipient, error in list(result.retry.items()):
        claim = rt.ledger.claim(result.report, result.slot, [recipient], rt.stale_after, attempt=False)
        del result.retry[recipient]
        if claim.mine:
            rt.ledger.mark_failed(claim.token, result.report, result.slot, claim.mine, f"{error} ({why})")
            record(rt, result, [recipient], "failed", f"{error} ({why})")

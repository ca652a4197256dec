"""The Celery tasks. Thin: each calls plain functions that tests can call without a broker."""

from __future__ import annotations

import contextlib
import logging
import random
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded

from reporter import defaults
from reporter.audience import audience
from reporter.beat import dispatcher_cron
from reporter.celery_app import app
from reporter.deliver import Runtime, SendResult, fail_for_good, send_slot
from reporter.dispatch import Due, dispatch
from reporter.errors import ConfigError
from reporter.ledger import Stuck
from reporter.notice import notify_owners
from reporter.runtime import runtime
from reporter.schedule import isoformat, next_fire, parse_instant

log = logging.getLogger(__name__)

DISPATCH = "email_reports.schedule_hourly"
SEND = "email_reports.send"
PRUNE = "email_reports.prune_ledger"
SWEEP = "email_reports.sweep"

QUEUED_GRACE = timedelta(minutes=2)
"""A row still queued this long after its slot, and untouched as long, has lost its task."""


def backoff(
    retries: int, base: float = defaults.RETRY_BACKOFF, maximum: float = defaults.RETRY_BACKOFF_MAX, rand: random.Random | None = None
) -> float:
    """Exponential backoff with equal jitter: half the step fixed, half random, capped at MAXIMUM."""
    step: float = min(maximum, base * (2**retries))
    return step / 2 + (rand or random).uniform(0, step / 2)


def enqueue_send(
    rt: Runtime,
    due: Due,
    queue: str = defaults.QUEUE_SCHEDULED,
    only: list[str] | None = None,
    trigger: str = "schedule",
    countdown: float | None = None,
    producer: Any = None,
) -> Any:
    """Publish email_reports.send for DUE: scheduled sends wait for their slot (eta), others go now
    (or after COUNTDOWN seconds)."""
    soft, hard = rt.time_limits(due.report)
    timing: dict[str, Any] = {"countdown": countdown} if countdown is not None else {"eta": due.slot} if trigger == "schedule" else {}
    return send.apply_async(
        args=(due.report, isoformat(due.slot)),
        # The config version it is dispatched under: the worker renders it with that one or a newer one.
        kwargs={"only": only, "trigger": trigger, "config": rt.config.version},
        queue=queue,
        soft_time_limit=soft,
        time_limit=hard,
        producer=producer,
        **timing,
    )


@app.task(name=DISPATCH, acks_late=False)
def schedule_hourly(
    scheduled_for: str | None = None, window_end: str | None = None, reports: list[str] | None = None, config: str | None = None
) -> dict[str, Any]:
    """Enqueue every report slot due from SCHEDULED_FOR (default: now) to WINDOW_END (default: the next fire);
    only REPORTS' when given (beat's dispatch for reports added to the config)."""
    rt = runtime()
    rt.follow(config)
    now = datetime.now(UTC)
    start = parse_instant(scheduled_for, UTC) if scheduled_for else now
    if window_end:
        end = parse_instant(window_end, UTC)
    else:
        found = dispatcher_cron(rt.config)
        end = next_fire(found[0], found[1], start) if found else start + timedelta(seconds=defaults.DISPATCH_WINDOW)
    # One producer (one broker connection) for every publish of this dispatch, and on Redis one pipeline
    # per 1,000 messages instead of a round trip each (kombu >= 5.7; others publish one by one).
    # Every row is in the ledger before the first publish, so a batch lost to a broker error is found
    # queued past the watermark by the next dispatch and enqueued again.
    with app.producer_or_acquire() as producer, getattr(producer, "batch", contextlib.nullcontext)():
        done = dispatch(rt.config, rt.ledger, lambda due: enqueue_send(rt, due, producer=producer), start, end, now, only=reports)
    log.info("dispatched %d slot(s) for [%s, %s)", len(done), isoformat(start), isoformat(end))
    return {"window": [isoformat(start), isoformat(end)], "enqueued": len(done), "caught_up": sum(d.catch_up for d in done)}


@app.task(name=SEND, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def send(
    self: Task, report: str, slot: str, only: list[str] | None = None, trigger: str = "schedule", config: str | None = None
) -> dict[str, Any]:
    """Render REPORT for SLOT once and send it to each recipient not yet sent to, with configuration
    CONFIG (the version it was dispatched under) or a newer one."""
    rt = runtime()
    at = parse_instant(slot, UTC)
    try:
        rt.follow(config)
    except ConfigError as exc:
        # The version it was dispatched under exists but does not load here (e.g. another environment).
        log.error("send %s %s: configuration %s cannot be used here: %s; retrying", report, slot, config, exc)
        raise self.retry(countdown=backoff(self.request.retries), max_retries=None) from None
    if (why := not_to_send(rt, report, trigger)) is not None:
        skipped = rt.ledger.skip_slot(report, at, why)
        log.warning("send %s %s: %s; %d queued row(s) recorded as skipped", report, slot, why, skipped)
        return {"report": report, "slot": slot, "skipped": skipped, "reason": why}
    try:
        result = send_slot(rt, report, at, only=only, trigger=trigger, task_id=self.request.id)
    except SoftTimeLimitExceeded:
        limit = (self.request.timelimit or (None, None))[1] or self.soft_time_limit or app.conf.task_soft_time_limit
        error = f"soft time limit exceeded ({limit:g}s)"
        if self.request.retries < rt.config.retries_of(rt.config.reports[report]):
            log.error("send %s %s: %s; released for a retry", report, slot, error)
            raise self.retry(countdown=backoff(self.request.retries)) from None
        log.error("send %s %s: %s; no retries left", report, slot, error)
        stuck = SendResult(report, at, retry=dict.fromkeys(audience(rt.config.reports[report], only or None).keys(), error))
        fail_for_good(rt, stuck, f"after {self.request.retries} retries")
        notify_owners(rt, stuck)
        return stuck.as_dict()
    # First, before a retry below ends this run.
    if result.busy and result.busy_until is not None:
        # Another execution holds these rows (a redelivered copy of this task, or a process that
        # was killed). Look again once its claim would have gone stale; a fresh message, not a retry.
        wait = max((result.busy_until - datetime.now(UTC)).total_seconds(), 1.0)
        queue = (self.request.delivery_info or {}).get("routing_key") or defaults.QUEUE_SCHEDULED
        enqueue_send(rt, Due(report, at), queue=queue, only=result.busy, trigger=trigger, countdown=wait)
    max_retries = rt.config.retries_of(rt.config.reports[report])
    if result.retry and self.request.retries >= max_retries:
        fail_for_good(rt, result, f"gave up after {self.request.retries} retries")
    # Tell the owners of what failed for good in this run, including when others are retried below.
    notify_owners(rt, result)
    if result.retry:
        kwargs = {"only": list(result.retry), "trigger": trigger, "config": rt.config.version}
        raise self.retry(kwargs=kwargs, countdown=backoff(self.request.retries), max_retries=max_retries)
    return result.as_dict()


def not_to_send(rt: Runtime, report: str, trigger: str) -> str | None:
    """Why a send of REPORT must not go out under the current config (removed, or disabled for a
    scheduled send); None if it may."""
    spec = rt.config.reports.get(report)
    if spec is None:
        return f"the report is no longer in the configuration (version {rt.config.version})"
    if not spec.enabled and trigger == "schedule":
        return f"the report is disabled in the configuration (version {rt.config.version})"
    return None


@app.task(name=PRUNE)
def prune_ledger(days: int | None = None) -> dict[str, Any]:
    """Delete final ledger rows older than the retention."""
    rt = runtime()
    rt.follow()
    keep = days or rt.config.defaults.retention_days
    deleted = rt.ledger.prune(datetime.now(UTC) - timedelta(days=keep))
    return {"deleted": deleted, "retention_days": keep}


@app.task(name=SWEEP, acks_late=False)
def sweep() -> dict[str, Any]:
    """Re-enqueue deliveries whose task died with its worker or was lost with the broker.

    A worker killed outright holds unacknowledged messages that Redis would only redeliver after its
    visibility timeout (more than an hour); this finds their ledger rows within minutes instead.
    """
    rt = runtime()
    rt.follow()
    now = datetime.now(UTC)
    found = rt.ledger.stuck(
        stale_before=now - timedelta(seconds=rt.stale_after),
        queued_before=now - QUEUED_GRACE,
        retry_before=now - timedelta(seconds=defaults.RETRY_BACKOFF_MAX) - QUEUED_GRACE,
    )
    groups: dict[tuple[str, datetime], list[Stuck]] = {}
    for row in found:
        groups.setdefault((row.report, row.slot), []).append(row)
    counts = {"re_enqueued": 0, "gave_up": 0, "skipped": 0}
    for (report, slot), rows in groups.items():
        if report not in rt.config.reports:
            gone = "the report is no longer in the configuration"
            counts["skipped"] += rt.ledger.skip_stuck(report, slot, [r.recipient for r in rows], gone)
            continue
        # Each attempt that ended without a result (its process killed by the hard time limit or
        # with its worker) counts; past the retries allowed, the delivery is failed, not retried forever.
        limit = rt.config.retries_of(rt.config.reports[report]) + 1
        spent = [r for r in rows if r.dead and r.attempts >= limit]
        if spent:
            why = f"{max(r.attempts for r in spent)} attempts ended without a result (killed or timed out)"
            result = SendResult(report, slot, retry={r.recipient: why for r in spent})
            fail_for_good(rt, result, "gave up")
            notify_owners(rt, result)
            counts["gave_up"] += len(spent)
        again = [r.recipient for r in rows if r not in spent]
        if again:
            log.warning("sweep: re-enqueuing %s %s for %d recipient(s)", report, isoformat(slot), len(again))
            enqueue_send(rt, Due(report, slot), only=again)
            counts["re_enqueued"] += len(again)
    return counts

"""The dispatcher against a real SQLite ledger (SPEC §6): which slots are enqueued, when, and only once.

`enqueue` is the real seam: the Celery task passes a function that publishes; here it appends to a list,
and also records what the ledger held at that moment (the rows must exist before a worker can run).
"""

from __future__ import annotations

import textwrap
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from reporter import ledger as L
from reporter.config import Config, parse
from reporter.dispatch import LOST_AFTER, Due, dispatch, due_slots
from reporter.ledger import Ledger
from reporter.schedule import window

HOURLY = "1 * * * *"
T = datetime(2026, 1, 15, 17, 1, tzinfo=UTC)
"""An hourly dispatcher's fire time; its window is [17:01, 18:01)."""

QUARTER = """\
  quarter:
    schedule: "*/15 * * * *"
    subject: "Quarter"
    template: t.html
    recipients: [ann@example.com, "Ben <Ben@Example.com>"]
"""
OFF = """\
  off:
    schedule: "*/15 * * * *"
    subject: "Off"
    template: t.html
    recipients: [cy@example.com]
    enabled: false
"""
BERLIN = """\
  berlin:
    schedule: "0 7 * * *"
    timezone: Europe/Berlin
    subject: "Morning"
    template: t.html
    recipients: [dora@example.com]
"""
KEYS = {"ann@example.com", "ben@example.com"}


def at(hh: int, mm: int, day: int = 15) -> datetime:
    return datetime(2026, 1, day, hh, mm, tzinfo=UTC)


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Config]:
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "t.html").write_text("<p>{{ report.name }}</p>")

    def make(*reports: str, grace: float = 3600) -> Config:
        text = f"timezone: UTC\ndefaults:\n  catch_up_grace: {grace}\nreports:\n" + "".join(reports)
        return parse(textwrap.dedent(text), "t.yaml", {}, templates)

    return make


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    ledger = Ledger.from_url(f"sqlite:///{tmp_path}/l.db")
    yield ledger
    ledger.dispose()


class Queue:
    """An enqueue function that keeps what it was given and what the ledger held at that moment."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.items: list[Due] = []
        self.rows_at_enqueue: list[set[str]] = []

    def __call__(self, due: Due) -> None:
        self.items.append(due)
        self.rows_at_enqueue.append({r.status for r in self.ledger.rows(report=due.report, slot=due.slot)})

    def take(self) -> list[Due]:
        items, self.items = self.items, []
        return items


def run(config: Config, ledger: Ledger, fired: datetime, now: datetime | None = None, grace: float | None = None) -> list[Due]:
    """Fire the hourly dispatcher at FIRED, the way the task does: window up to its next fire time."""
    start, end = window(HOURLY, UTC, fired)
    queue = Queue(ledger)
    returned = dispatch(config, ledger, queue, start, end, fired if now is None else now, grace)
    assert returned == queue.items, "dispatch returns exactly what it enqueued"
    assert all(statuses for statuses in queue.rows_at_enqueue), "rows are recorded before the slot is enqueued"
    return queue.items


def keys(ledger: Ledger) -> Counter[tuple[str, datetime, str]]:
    return Counter((r.report, r.slot, r.recipient) for r in ledger.rows())


def status_of(ledger: Ledger, report: str, slot: datetime) -> set[str]:
    return {r.status for r in ledger.rows(report=report, slot=slot)}


WINDOW_SLOTS = [at(17, 15), at(17, 30), at(17, 45), at(18, 0)]


# ----------------------------------------------------------------------------- due_slots


def test_due_slots_are_the_report_slots_in_the_half_open_window(make_config: Callable[..., Config]) -> None:
    config = make_config(QUARTER, OFF, BERLIN)
    start, end = window(HOURLY, UTC, T)
    assert (start, end) == (T, at(18, 1))
    assert due_slots(config, start, end) == [Due("quarter", s) for s in WINDOW_SLOTS]
    # Half-open: a slot exactly at the start is in, one exactly at the end is out.
    assert due_slots(config, at(17, 0), at(18, 0)) == [Due("quarter", s) for s in [at(17, 0), at(17, 15), at(17, 30), at(17, 45)]]


def test_due_slots_skip_disabled_reports(make_config: Callable[..., Config]) -> None:
    config = make_config(QUARTER, OFF)
    assert {d.report for d in due_slots(config, at(0, 0), at(23, 59))} == {"quarter"}
    assert due_slots(make_config(OFF, BERLIN), at(17, 1), at(18, 1)) == []


@pytest.mark.parametrize(
    ("day", "utc_slot"),
    [
        (datetime(2026, 1, 15, tzinfo=UTC), datetime(2026, 1, 15, 6, 0, tzinfo=UTC)),  # CET, UTC+1
        (datetime(2026, 7, 15, tzinfo=UTC), datetime(2026, 7, 15, 5, 0, tzinfo=UTC)),  # CEST, UTC+2
    ],
)
def test_a_berlin_report_is_due_at_seven_berlin_time(make_config: Callable[..., Config], day: datetime, utc_slot: datetime) -> None:
    config = make_config(BERLIN)
    assert due_slots(config, day, day + timedelta(days=1)) == [Due("berlin", utc_slot)]
    assert due_slots(config, utc_slot, utc_slot + timedelta(seconds=1))[0].slot.utcoffset() == timedelta(0)


def test_due_slots_are_in_time_order_across_reports(make_config: Callable[..., Config]) -> None:
    config = make_config(QUARTER, BERLIN)
    due = due_slots(config, at(5, 40), at(6, 20))
    assert due == [Due("quarter", at(5, 45)), Due("berlin", at(6, 0)), Due("quarter", at(6, 0)), Due("quarter", at(6, 15))]


# ----------------------------------------------------------------------------- dispatch: the window


def test_dispatch_enqueues_exactly_the_window_slots_with_eta_the_slot(make_config: Callable[..., Config], ledger: Ledger) -> None:
    config = make_config(QUARTER, OFF)
    enqueued = run(config, ledger, T)
    assert enqueued == [Due("quarter", s, catch_up=False) for s in WINDOW_SLOTS]
    assert keys(ledger) == Counter({("quarter", s, r): 1 for s in WINDOW_SLOTS for r in KEYS})
    assert {r.status for r in ledger.rows()} == {L.QUEUED}
    # The dispatcher remembers how far it has covered every report; a disabled one has nothing due,
    # so its period of being disabled is never mistaken for downtime to catch up on.
    assert ledger.marks() == {"quarter": at(18, 1), "off": at(18, 1)}


def test_a_berlin_report_is_enqueued_at_six_utc_in_winter(make_config: Callable[..., Config], ledger: Ledger) -> None:
    config = make_config(BERLIN)
    enqueued = run(config, ledger, at(5, 1))
    assert enqueued == [Due("berlin", at(6, 0))]
    assert [(r.slot, r.recipient) for r in ledger.rows()] == [(at(6, 0), "dora@example.com")]
    assert run(config, ledger, at(6, 1)) == []


def test_dispatch_twice_for_the_same_window_records_each_row_once(make_config: Callable[..., Config], ledger: Ledger) -> None:
    config = make_config(QUARTER, BERLIN)
    first = run(config, ledger, T)
    second = run(config, ledger, T)
    assert first == second == [Due("quarter", s) for s in WINDOW_SLOTS]
    assert keys(ledger) == Counter({("quarter", s, r): 1 for s in WINDOW_SLOTS for r in KEYS})
    assert {(r.status, r.attempts) for r in ledger.rows()} == {(L.QUEUED, 0)}


def test_a_new_report_has_nothing_to_catch_up(make_config: Callable[..., Config], ledger: Ledger) -> None:
    """With no watermark the dispatcher cannot tell downtime from a report just added: only the window."""
    config = make_config(QUARTER)
    assert run(config, ledger, T) == [Due("quarter", s) for s in WINDOW_SLOTS]
    assert ledger.rows(slot=at(17, 0)) == []


# ----------------------------------------------------------------------------- dispatch: catching up


@pytest.mark.parametrize(
    ("grace", "caught_up", "skipped"),
    [
        (1800, [at(16, 45), at(17, 0)], [at(16, 15), at(16, 30)]),
        (1860, [at(16, 30), at(16, 45), at(17, 0)], [at(16, 15)]),  # a slot exactly T - grace is still caught up
        (3600, [at(16, 15), at(16, 30), at(16, 45), at(17, 0)], []),
    ],
)
def test_slots_missed_while_beat_was_down_are_caught_up_within_the_grace(
    make_config: Callable[..., Config], ledger: Ledger, grace: float, caught_up: list[datetime], skipped: list[datetime]
) -> None:
    config = make_config(QUARTER, OFF, grace=grace)
    # The 15:01 dispatch ran (covering up to 16:01); the 16:01 one did not: beat was down.
    assert run(config, ledger, at(15, 1)) == [Due("quarter", s) for s in [at(15, 15), at(15, 30), at(15, 45), at(16, 0)]]

    enqueued = run(config, ledger, T)
    assert enqueued == [Due("quarter", s, catch_up=True) for s in caught_up] + [Due("quarter", s) for s in WINDOW_SLOTS]
    for slot in caught_up:
        assert status_of(ledger, "quarter", slot) == {L.QUEUED}
    # Older than the grace: not sent, but recorded, so nothing is silently lost.
    for slot in skipped:
        rows = ledger.rows(report="quarter", slot=slot)
        assert {r.status for r in rows} == {L.SKIPPED} and {r.recipient for r in rows} == KEYS
        assert all(r.error and "missed" in r.error for r in rows)
    assert ledger.rows(report="off") == []
    assert ledger.marks() == {"quarter": at(18, 1), "off": at(18, 1)}
    assert max(keys(ledger).values()) == 1


def test_a_caught_up_slot_is_not_enqueued_again_by_the_next_dispatch(make_config: Callable[..., Config], ledger: Ledger) -> None:
    config = make_config(QUARTER, grace=3600)
    run(config, ledger, at(15, 1))
    caught = [d for d in run(config, ledger, T) if d.catch_up]
    assert [d.slot for d in caught] == [at(16, 15), at(16, 30), at(16, 45), at(17, 0)]
    # The workers send them; the next hourly dispatch has nothing to catch up.
    for due in caught + [Due("quarter", s) for s in WINDOW_SLOTS]:
        claim = ledger.claim("quarter", due.slot, sorted(KEYS), 3600)
        ledger.mark_sent(claim.token, "quarter", due.slot, list(claim.mine), "<m@x>", 1, 1)
    assert run(config, ledger, at(18, 1)) == [Due("quarter", s) for s in [at(18, 15), at(18, 30), at(18, 45), at(19, 0)]]


@pytest.mark.parametrize("final", [L.SENT, L.FAILED, L.SKIPPED])
def test_a_look_back_slot_that_already_has_rows_is_not_enqueued_again(
    make_config: Callable[..., Config], ledger: Ledger, final: str
) -> None:
    config = make_config(QUARTER, grace=3600)
    run(config, ledger, at(15, 1))  # covered up to 16:01; the 16:01 dispatch is missed
    # Someone sent 16:45 by hand meanwhile (`reporter send`), so it has rows already.
    ledger.ensure("quarter", at(16, 45), sorted(KEYS), trigger="manual")
    if final == L.SKIPPED:
        ledger.mark_skipped("quarter", at(16, 45), sorted(KEYS), "by hand")
    else:
        claim = ledger.claim("quarter", at(16, 45), sorted(KEYS), 3600)
        if final == L.SENT:
            ledger.mark_sent(claim.token, "quarter", at(16, 45), list(claim.mine), "<m@x>", 1, 1)
        else:
            ledger.mark_failed(claim.token, "quarter", at(16, 45), list(claim.mine), "550 no")

    caught = [d.slot for d in run(config, ledger, T) if d.catch_up]
    assert caught == [at(16, 15), at(16, 30), at(17, 0)]
    assert status_of(ledger, "quarter", at(16, 45)) == {final}


def test_a_slot_still_queued_long_after_it_is_re_enqueued_as_lost(make_config: Callable[..., Config], ledger: Ledger) -> None:
    config = make_config(QUARTER, grace=3600)
    # The 16:01 dispatch ran and recorded 16:15..17:00, but the broker lost every task: no worker ran.
    assert [d.slot for d in run(config, ledger, at(16, 1))] == [at(16, 15), at(16, 30), at(16, 45), at(17, 0)]
    before = keys(ledger)

    enqueued = run(config, ledger, T)
    # 16:15, 16:30, 16:45 are more than LOST_AFTER old; 17:00 is a minute old and may simply be running late.
    assert T - at(16, 45) > LOST_AFTER > T - at(17, 0)
    assert enqueued == [Due("quarter", s, catch_up=True) for s in [at(16, 15), at(16, 30), at(16, 45)]] + [
        Due("quarter", s) for s in WINDOW_SLOTS
    ]
    assert keys(ledger) == before + Counter({("quarter", s, r): 1 for s in WINDOW_SLOTS for r in KEYS})
    assert status_of(ledger, "quarter", at(17, 0)) == {L.QUEUED}


def test_a_queued_slot_younger_than_lost_after_is_not_re_enqueued(make_config: Callable[..., Config], ledger: Ledger) -> None:
    config = make_config(QUARTER, grace=3600)
    run(config, ledger, at(16, 1))
    # Same look-back, but the dispatch runs (late) when 16:45 is only ten minutes old.
    enqueued = run(config, ledger, T, now=at(16, 55))
    assert [d.slot for d in enqueued if d.catch_up] == [at(16, 15), at(16, 30)]


def test_a_slot_with_any_row_past_queued_is_not_lost(make_config: Callable[..., Config], ledger: Ledger) -> None:
    config = make_config(QUARTER, grace=3600)
    run(config, ledger, at(16, 1))
    # 16:15: one recipient sent, the other released for a retry; 16:30: a worker holds it right now.
    claim = ledger.claim("quarter", at(16, 15), sorted(KEYS), 3600)
    ledger.mark_sent(claim.token, "quarter", at(16, 15), ["ann@example.com"], "<m@x>", 1, 1)
    ledger.release(claim.token, "quarter", at(16, 15), ["ben@example.com"], "SMTP 451 later")
    ledger.claim("quarter", at(16, 30), sorted(KEYS), 3600)

    enqueued = run(config, ledger, T)
    assert [d.slot for d in enqueued if d.catch_up] == [at(16, 45)]


def send_everything(ledger: Ledger, slots: list[datetime]) -> None:
    """What the workers would do with the tasks they got: claim and send."""
    for slot in slots:
        claim = ledger.claim("quarter", slot, sorted(KEYS), 3600)
        assert ledger.mark_sent(claim.token, "quarter", slot, list(claim.mine), "<m@x>", 1, 1) == len(KEYS)


def test_a_failed_enqueue_does_not_move_the_watermark(make_config: Callable[..., Config], ledger: Ledger) -> None:
    config = make_config(QUARTER, grace=3600)
    send_everything(ledger, [d.slot for d in run(config, ledger, at(15, 1))])
    published: list[Due] = []

    def broker_down_after_two(due: Due) -> None:
        if len(published) == 2:
            raise ConnectionError("broker unreachable")
        published.append(due)

    start, end = window(HOURLY, UTC, at(16, 1))
    with pytest.raises(ConnectionError):
        dispatch(config, ledger, broker_down_after_two, start, end, at(16, 1))
    assert [d.slot for d in published] == [at(16, 15), at(16, 30)]
    assert ledger.marks() == {"quarter": at(16, 1)}
    send_everything(ledger, [d.slot for d in published])
    # The next dispatch still knows 16:01's window was not fully handed over: 16:45 got rows but no task
    # (re-enqueued as lost), 17:00 never got rows (caught up).
    caught = [d.slot for d in run(config, ledger, T) if d.catch_up]
    assert caught == [at(16, 45), at(17, 0)]


def test_slots_of_a_disabled_period_are_not_caught_up_when_re_enabled(make_config: Callable[..., Config], ledger: Ledger) -> None:
    """Disabling a report is not downtime: slots that fell due while it was disabled must not be sent later."""
    enabled = make_config(QUARTER, grace=3600)
    run(enabled, ledger, at(15, 1))  # covered up to 16:01
    disabled = make_config(QUARTER.replace("recipients:", "enabled: false\n    recipients:"), grace=3600)
    assert run(disabled, ledger, at(16, 1)) == []  # beat ran; the report was off from 16:01 to 17:01

    enqueued = run(enabled, ledger, T)
    assert [d for d in enqueued if d.catch_up] == []
    assert enqueued == [Due("quarter", s) for s in WINDOW_SLOTS]


def test_a_changed_cron_is_dispatched_by_its_new_schedule_at_once(make_config: Callable[..., Config], ledger: Ledger) -> None:
    """The dispatcher remembers when a cron fires next; an edited config asks about the new cron."""
    yearly = make_config(QUARTER.replace('"*/15 * * * *"', '"0 6 1 1 *"'))
    assert run(yearly, ledger, at(16, 1)) == []
    assert run(yearly, ledger, T) == []
    quarterly = make_config(QUARTER)
    assert run(quarterly, ledger, at(18, 1)) == [Due("quarter", s) for s in [at(18, 15), at(18, 30), at(18, 45), at(19, 0)]]
    assert run(yearly, ledger, at(19, 1)) == []


def test_one_dispatch_of_many_reports_records_each_row_once_and_a_second_none(make_config: Callable[..., Config], ledger: Ledger) -> None:
    many = "".join(QUARTER.replace("quarter:", f"q{i:03d}:") for i in range(L.BATCH + 20))
    config = make_config(many)
    first = run(config, ledger, T)
    assert len(first) == 4 * (L.BATCH + 20)
    counts = keys(ledger)
    assert len(counts) == 2 * len(first) and set(counts.values()) == {1}
    assert run(config, ledger, T) == first  # enqueued again (harmless: the claim), no row added
    assert keys(ledger) == counts
    assert set(ledger.marks().values()) == {at(18, 1)}
    # The next hour, with the rows only minutes old: nothing to catch up (their rows exist, their marks moved).
    assert [d for d in run(config, ledger, at(18, 1), now=at(17, 15) + LOST_AFTER) if d.catch_up] == []

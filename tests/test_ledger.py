"""The delivery ledger against real databases: a SQLite file and PostgreSQL (SPEC §7).

Every test runs on both backends. The PostgreSQL database is requested lazily, so the SQLite cases run
on a machine without PostgreSQL (and the PostgreSQL ones skip there, or fail in CI).
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa

from reporter import ledger as L
from reporter.ledger import Ledger, deliveries

SLOT = datetime(2026, 3, 2, 7, 0, tzinfo=UTC)
STALE = 3600.0
RCPTS = ["ann@example.com", "ben@example.com", "cy@example.com"]


@pytest.fixture
def ledger(open_ledger: Callable[[], Ledger]) -> Ledger:
    return open_ledger()


def one(ledger: Ledger, recipient: str, report: str = "daily", slot: datetime = SLOT) -> L.Row:
    (row,) = [r for r in ledger.rows(report=report, slot=slot) if r.recipient == recipient]
    return row


def set_column(ledger: Ledger, column: str, value: datetime, **where: object) -> None:
    """Backdate a timestamp column with SQL (through the table, so the UTC type applies)."""
    cond = sa.and_(*(deliveries.c[k] == v for k, v in where.items()))
    with ledger.engine.begin() as conn:
        assert conn.execute(deliveries.update().where(cond).values({column: value})).rowcount >= 1


# ----------------------------------------------------------------------------- ensure


def test_ensure_inserts_each_recipient_once_and_is_idempotent(ledger: Ledger) -> None:
    inserted = [
        ledger.ensure("daily", SLOT, ["ann@example.com", "ann@example.com", "ben@example.com"]),
        ledger.ensure("daily", SLOT, ["ann@example.com", "ben@example.com"]),
        ledger.ensure("daily", SLOT, ["ben@example.com", "cy@example.com"]),
    ]
    rows = ledger.rows()
    assert sorted(r.recipient for r in rows) == RCPTS
    assert {(r.status, r.attempts, r.trigger) for r in rows} == {(L.QUEUED, 0, "schedule")}
    # Another slot or another report is another key.
    inserted += [
        ledger.ensure("daily", SLOT + timedelta(days=1), ["ann@example.com"]),
        ledger.ensure("weekly", SLOT, ["ann@example.com"]),
        ledger.ensure("daily", SLOT, []),
    ]
    assert len(ledger.rows()) == 5
    # The documented return value: how many rows were new.
    assert inserted == [2, 0, 1, 1, 1, 0]


def test_unique_key_is_enforced_by_the_database(ledger: Ledger) -> None:
    ledger.ensure("daily", SLOT, ["ann@example.com"])
    stamp = L.now()
    with pytest.raises(sa.exc.IntegrityError), ledger.engine.begin() as conn:
        conn.execute(
            deliveries.insert().values(
                report="daily", slot=SLOT, recipient="ann@example.com", status=L.QUEUED, created_at=stamp, updated_at=stamp
            )
        )
    assert len(ledger.rows()) == 1


def test_ensure_does_not_reset_existing_rows(ledger: Ledger) -> None:
    ledger.ensure("daily", SLOT, RCPTS)
    claim = ledger.claim("daily", SLOT, RCPTS, STALE)
    assert ledger.mark_sent(claim.token, "daily", SLOT, ["ann@example.com"], "<m1@x>", 5, 100) == 1
    assert ledger.ensure("daily", SLOT, RCPTS, trigger="manual") == 0
    assert one(ledger, "ann@example.com").status == L.SENT
    assert one(ledger, "ben@example.com").status == L.RENDERING
    assert {r.trigger for r in ledger.rows()} == {"schedule"}


def test_ensure_many_inserts_exactly_the_missing_rows_in_batches(ledger: Ledger) -> None:
    # More keys than one IN (...) batch and one insert statement hold, some already there.
    reports = [f"r{i:04d}" for i in range(L.BATCH + 50)]
    ledger.ensure("r0007", SLOT, ["ann@example.com"])
    claim = ledger.claim("r0007", SLOT, ["ann@example.com"], STALE)
    ledger.mark_sent(claim.token, "r0007", SLOT, ["ann@example.com"], "<m@x>", 1, 1)
    wanted = [(name, SLOT, ["ann@example.com", "ben@example.com"]) for name in reports]
    assert ledger.ensure_many(wanted) == 2 * len(reports) - 1
    assert ledger.ensure_many(wanted) == 0  # a second dispatch creates none
    keys = Counter((r.report, r.slot, r.recipient) for r in ledger.rows())
    assert len(keys) == 2 * len(reports) and set(keys.values()) == {1}
    assert one(ledger, "ann@example.com", report="r0007").status == L.SENT  # not reset
    statuses = ledger.slot_statuses(reports, SLOT, SLOT + timedelta(minutes=1))
    assert len(statuses) == len(reports)
    assert statuses[("r0007", SLOT)] == {L.SENT, L.QUEUED}
    assert ledger.slot_statuses(reports, SLOT + timedelta(minutes=1), SLOT + timedelta(hours=1)) == {}


def test_advance_marks_moves_every_mark_forward_only(ledger: Ledger) -> None:
    names = [f"r{i:04d}" for i in range(L.BATCH + 50)]
    ledger.advance_mark("r0001", SLOT + timedelta(hours=2))
    ledger.advance_mark("r0002", SLOT - timedelta(hours=2))
    ledger.advance_marks(names, SLOT)
    marks = ledger.marks()
    assert set(marks) == set(names)
    assert marks["r0001"] == SLOT + timedelta(hours=2)  # never backwards
    assert {marks[n] for n in names if n != "r0001"} == {SLOT}
    ledger.advance_marks(names, SLOT)  # again: no error, nothing changes
    assert ledger.marks() == marks


# ----------------------------------------------------------------------------- claim


def test_claim_gives_the_rows_to_exactly_one_claimant(open_ledger: Callable[[], Ledger]) -> None:
    first, second = open_ledger(), open_ledger()
    first.ensure("daily", SLOT, RCPTS)
    a = first.claim("daily", SLOT, RCPTS, STALE, task_id="task-a")
    b = second.claim("daily", SLOT, RCPTS, STALE, task_id="task-b")
    assert sorted(a.mine) == RCPTS and a.busy == () and a.done == () and a.busy_until is None
    assert b.mine == () and sorted(b.busy) == RCPTS and b.done == ()
    assert a.token != b.token
    for row in first.rows():
        assert (row.status, row.attempts) == (L.RENDERING, 1)
        assert row.claimed_at is not None


def test_claim_takes_only_the_recipients_asked_for(ledger: Ledger) -> None:
    ledger.ensure("daily", SLOT, RCPTS)
    claim = ledger.claim("daily", SLOT, ["ben@example.com"], STALE)
    assert claim.mine == ("ben@example.com",)
    assert one(ledger, "ann@example.com").status == L.QUEUED
    assert one(ledger, "cy@example.com").status == L.QUEUED
    # Rows never ensured are not invented by a claim.
    assert ledger.claim("daily", SLOT, ["zed@example.com"], STALE).mine == ()
    assert len(ledger.rows()) == 3


@pytest.mark.slow
def test_concurrent_claims_from_eight_engines_give_each_recipient_to_one(open_ledger: Callable[[], Ledger]) -> None:
    threads_n, rounds, tries = 8, 6, 3
    recipients = [f"r{i}@example.com" for i in range(5)]
    slots = [SLOT + timedelta(minutes=i) for i in range(rounds)]
    setup = open_ledger()
    for slot in slots:
        setup.ensure("daily", slot, recipients)
    ledgers = [open_ledger() for _ in range(threads_n)]
    barrier = threading.Barrier(threads_n)
    got: list[list[tuple[datetime, str]]] = [[] for _ in range(threads_n)]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for slot in slots:
                barrier.wait(timeout=120)
                for _ in range(tries):
                    claim = ledgers[i].claim("daily", slot, recipients, STALE, task_id=f"t{i}")
                    got[i].extend((slot, r) for r in claim.mine)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    counts = Counter(pair for claims in got for pair in claims)
    assert counts == Counter({(slot, r): 1 for slot in slots for r in recipients})
    rows = setup.rows(report="daily")
    assert len(rows) == rounds * len(recipients)
    assert {(r.status, r.attempts) for r in rows} == {(L.RENDERING, 1)}


# ----------------------------------------------------------------------------- final and released rows


def test_sent_is_final_for_later_claims(open_ledger: Callable[[], Ledger]) -> None:
    ledger, other = open_ledger(), open_ledger()
    ledger.ensure("daily", SLOT, RCPTS)
    claim = ledger.claim("daily", SLOT, RCPTS, STALE)
    assert ledger.mark_sending(claim.token, "daily", SLOT, ["ann@example.com"], "<m1@x>") == 1
    assert ledger.mark_sent(claim.token, "daily", SLOT, ["ann@example.com"], "<m1@x>", 12, 3456) == 1
    assert ledger.mark_failed(claim.token, "daily", SLOT, ["ben@example.com"], "550 no such user") == 1
    assert ledger.release(claim.token, "daily", SLOT, ["cy@example.com"], "451 later") == 1

    again = other.claim("daily", SLOT, RCPTS, STALE)
    assert sorted(again.done) == ["ann@example.com", "ben@example.com"]
    assert again.mine == ("cy@example.com",)
    assert again.busy == ()
    # Even a claim that would take over any in-flight row (stale_after=0) leaves final rows alone.
    late = other.claim("daily", SLOT, RCPTS, 0)
    assert "ann@example.com" in late.done and "ann@example.com" not in late.mine

    ann = one(ledger, "ann@example.com")
    assert (ann.status, ann.attempts, ann.message_id, ann.duration_ms, ann.size_bytes) == (L.SENT, 1, "<m1@x>", 12, 3456)
    assert ann.sent_at is not None and ann.error is None
    ben = one(ledger, "ben@example.com")
    assert (ben.status, ben.error, ben.attempts) == (L.FAILED, "550 no such user", 1)


def test_sent_row_cannot_be_reopened_even_with_the_holders_token(ledger: Ledger) -> None:
    """SPEC §7: `sent` is final — no later write, from anyone, may turn it back into something else."""
    ledger.ensure("daily", SLOT, ["ann@example.com"])
    claim = ledger.claim("daily", SLOT, ["ann@example.com"], STALE)
    ledger.mark_sent(claim.token, "daily", SLOT, ["ann@example.com"], "<m1@x>", 1, 1)
    assert ledger.mark_skipped("daily", SLOT, ["ann@example.com"], "disabled") == 0
    ledger.release(claim.token, "daily", SLOT, ["ann@example.com"], "late transient error")
    ledger.mark_failed(claim.token, "daily", SLOT, ["ann@example.com"], "late permanent error")
    row = one(ledger, "ann@example.com")
    assert row.status == L.SENT
    assert ledger.claim("daily", SLOT, ["ann@example.com"], STALE).done == ("ann@example.com",)


def test_release_makes_a_row_claimable_again_and_keeps_the_error(open_ledger: Callable[[], Ledger]) -> None:
    ledger, other = open_ledger(), open_ledger()
    ledger.ensure("daily", SLOT, ["ann@example.com", "ben@example.com"])
    first = ledger.claim("daily", SLOT, ["ann@example.com", "ben@example.com"], STALE)
    assert ledger.release(first.token, "daily", SLOT, ["ann@example.com"], "SMTP 451 try later") == 1

    row = one(ledger, "ann@example.com")
    assert (row.status, row.error, row.claimed_at, row.attempts) == (L.QUEUED, "SMTP 451 try later", None, 1)
    # The old token no longer holds the released row.
    assert ledger.mark_sent(first.token, "daily", SLOT, ["ann@example.com"], "<m@x>", 1, 1) == 0

    second = other.claim("daily", SLOT, ["ann@example.com", "ben@example.com"], STALE)
    assert second.mine == ("ann@example.com",)
    assert second.busy == ("ben@example.com",)
    row = one(ledger, "ann@example.com")
    assert (row.status, row.attempts, row.error) == (L.RENDERING, 2, "SMTP 451 try later")
    assert other.mark_sent(second.token, "daily", SLOT, ["ann@example.com"], "<m@x>", 1, 1) == 1
    assert one(ledger, "ann@example.com").error is None


def test_release_truncates_long_errors(ledger: Ledger) -> None:
    ledger.ensure("daily", SLOT, ["ann@example.com"])
    claim = ledger.claim("daily", SLOT, ["ann@example.com"], STALE)
    ledger.release(claim.token, "daily", SLOT, ["ann@example.com"], "x" * 10_000)
    assert one(ledger, "ann@example.com").error == "x" * 4000


# ----------------------------------------------------------------------------- stale claims


@pytest.mark.parametrize("in_flight", [L.RENDERING, L.SENDING])
def test_a_stale_claim_can_be_taken_over(open_ledger: Callable[[], Ledger], in_flight: str) -> None:
    dead, alive = open_ledger(), open_ledger()
    dead.ensure("daily", SLOT, ["ann@example.com"])
    old = dead.claim("daily", SLOT, ["ann@example.com"], STALE)
    if in_flight == L.SENDING:
        assert dead.mark_sending(old.token, "daily", SLOT, ["ann@example.com"], "<m@x>") == 1
    set_column(dead, "claimed_at", L.now() - timedelta(seconds=STALE + 60), report="daily", recipient="ann@example.com")

    new = alive.claim("daily", SLOT, ["ann@example.com"], STALE)
    assert new.mine == ("ann@example.com",) and new.busy == ()
    row = one(alive, "ann@example.com")
    assert (row.status, row.attempts) == (L.RENDERING, 2)
    assert row.claimed_at is not None and L.now() - row.claimed_at < timedelta(seconds=STALE)
    # The dead holder's token is worthless now; the new holder's works.
    assert dead.mark_sent(old.token, "daily", SLOT, ["ann@example.com"], "<m@x>", 1, 1) == 0
    assert one(alive, "ann@example.com").status == L.RENDERING
    assert alive.mark_sent(new.token, "daily", SLOT, ["ann@example.com"], "<m@x>", 1, 1) == 1


def test_a_fresh_claim_is_busy_until_it_goes_stale(open_ledger: Callable[[], Ledger]) -> None:
    holder, other = open_ledger(), open_ledger()
    holder.ensure("daily", SLOT, ["ann@example.com", "ben@example.com"])
    held = holder.claim("daily", SLOT, ["ann@example.com"], STALE)
    attempt = other.claim("daily", SLOT, ["ann@example.com", "ben@example.com"], STALE)
    assert attempt.mine == ("ben@example.com",)
    assert attempt.busy == ("ann@example.com",)
    ann = one(holder, "ann@example.com")
    assert ann.claimed_at is not None
    assert attempt.busy_until == ann.claimed_at + timedelta(seconds=STALE)
    assert attempt.busy_until is not None and attempt.busy_until.utcoffset() == timedelta(0)
    assert (ann.status, ann.attempts) == (L.RENDERING, 1)
    assert holder.mark_sent(held.token, "daily", SLOT, ["ann@example.com"], "<m@x>", 1, 1) == 1


def test_stale_after_zero_takes_over_after_a_short_wait(open_ledger: Callable[[], Ledger]) -> None:
    first, second = open_ledger(), open_ledger()
    first.ensure("daily", SLOT, ["ann@example.com"])
    old = first.claim("daily", SLOT, ["ann@example.com"], 0)
    claimed_at = one(first, "ann@example.com").claimed_at
    assert claimed_at is not None
    # Wait until the clock has visibly moved past the claim, so "older than 0 seconds" holds.
    while L.now() <= claimed_at + timedelta(milliseconds=5):
        threading.Event().wait(0.005)
    new = second.claim("daily", SLOT, ["ann@example.com"], 0)
    assert new.mine == ("ann@example.com",)
    assert first.mark_failed(old.token, "daily", SLOT, ["ann@example.com"], "late") == 0


# ----------------------------------------------------------------------------- tokens


def test_marks_with_a_wrong_token_change_nothing(ledger: Ledger) -> None:
    ledger.ensure("daily", SLOT, ["ann@example.com"])
    claim = ledger.claim("daily", SLOT, ["ann@example.com"], STALE)
    before = one(ledger, "ann@example.com")
    wrong = "0" * 32
    assert ledger.mark_sending(wrong, "daily", SLOT, ["ann@example.com"], "<m@x>") == 0
    assert ledger.mark_sent(wrong, "daily", SLOT, ["ann@example.com"], "<m@x>", 1, 1) == 0
    assert ledger.mark_failed(wrong, "daily", SLOT, ["ann@example.com"], "boom") == 0
    assert ledger.release(wrong, "daily", SLOT, ["ann@example.com"], "boom") == 0
    # The right token on the wrong slot or report does nothing either.
    assert ledger.mark_sent(claim.token, "daily", SLOT + timedelta(hours=1), ["ann@example.com"], "<m@x>", 1, 1) == 0
    assert ledger.mark_sent(claim.token, "weekly", SLOT, ["ann@example.com"], "<m@x>", 1, 1) == 0
    assert one(ledger, "ann@example.com") == before
    assert ledger.mark_sent(claim.token, "daily", SLOT, ["ann@example.com"], "<m@x>", 1, 1) == 1


# ----------------------------------------------------------------------------- reading and pruning


def test_rows_filters_and_orders_newest_slot_first(ledger: Ledger) -> None:
    s1, s2, s3 = SLOT, SLOT + timedelta(hours=1), SLOT + timedelta(days=1)
    ledger.ensure("daily", s1, ["ben@example.com", "ann@example.com"])
    ledger.ensure("daily", s3, ["ann@example.com"])
    ledger.ensure("weekly", s2, ["ann@example.com"])
    ledger.ensure("alpha", s3, ["cy@example.com"])
    claim = ledger.claim("daily", s1, ["ann@example.com"], STALE)
    ledger.mark_sent(claim.token, "daily", s1, ["ann@example.com"], "<m@x>", 1, 1)

    keys = [(r.slot, r.report, r.recipient) for r in ledger.rows()]
    assert keys == [
        (s3, "alpha", "cy@example.com"),
        (s3, "daily", "ann@example.com"),
        (s2, "weekly", "ann@example.com"),
        (s1, "daily", "ann@example.com"),
        (s1, "daily", "ben@example.com"),
    ]
    assert [(r.slot, r.recipient) for r in ledger.rows(report="daily")] == [
        (s3, "ann@example.com"),
        (s1, "ann@example.com"),
        (s1, "ben@example.com"),
    ]
    assert [(r.report, r.recipient) for r in ledger.rows(slot=s3)] == [("alpha", "cy@example.com"), ("daily", "ann@example.com")]
    assert [(r.slot, r.recipient) for r in ledger.rows(status=L.SENT)] == [(s1, "ann@example.com")]
    assert [(r.slot, r.recipient) for r in ledger.rows(report="daily", slot=s1, status=L.QUEUED)] == [(s1, "ben@example.com")]
    assert [r.slot for r in ledger.rows(limit=2)] == [s3, s3]
    assert ledger.rows(report="nope") == []


def test_slots_with_rows_reports_statuses_in_the_window(ledger: Ledger) -> None:
    s1, s2 = SLOT, SLOT + timedelta(minutes=15)
    ledger.ensure("daily", s1, ["ann@example.com", "ben@example.com"])
    ledger.ensure("daily", s2, ["ann@example.com"])
    claim = ledger.claim("daily", s1, ["ann@example.com"], STALE)
    ledger.mark_sent(claim.token, "daily", s1, ["ann@example.com"], "<m@x>", 1, 1)
    assert ledger.slots_with_rows("daily", s1, s2) == {s1: {L.SENT, L.QUEUED}}
    assert ledger.slots_with_rows("daily", s1, s2 + timedelta(seconds=1)) == {s1: {L.SENT, L.QUEUED}, s2: {L.QUEUED}}
    assert ledger.slots_with_rows("weekly", s1, s2) == {}


def test_prune_deletes_only_final_rows_older_than_the_cutoff(ledger: Ledger) -> None:
    old_slot, new_slot = SLOT - timedelta(days=120), SLOT
    who = ["sent@example.com", "failed@example.com", "skipped@example.com", "queued@example.com", "rendering@example.com"]
    for slot in (old_slot, new_slot):
        ledger.ensure("daily", slot, who)
        claim = ledger.claim("daily", slot, ["sent@example.com", "failed@example.com", "rendering@example.com"], STALE)
        ledger.mark_sent(claim.token, "daily", slot, ["sent@example.com"], "<m@x>", 1, 1)
        ledger.mark_failed(claim.token, "daily", slot, ["failed@example.com"], "550")
        ledger.mark_skipped("daily", slot, ["skipped@example.com"], "disabled")
    long_ago = L.now() - timedelta(days=100)
    set_column(ledger, "created_at", long_ago, report="daily", slot=old_slot)

    cutoff = L.now() - timedelta(days=90)
    assert ledger.prune(cutoff) == 3
    left = {(r.slot, r.recipient, r.status) for r in ledger.rows()}
    assert left == {
        (old_slot, "queued@example.com", L.QUEUED),
        (old_slot, "rendering@example.com", L.RENDERING),
        *((new_slot, r, s) for r, s in zip(who, [L.SENT, L.FAILED, L.SKIPPED, L.QUEUED, L.RENDERING], strict=True)),
    }
    assert ledger.prune(cutoff) == 0


# ----------------------------------------------------------------------------- time zones


def test_aware_datetimes_round_trip_in_utc(ledger: Ledger) -> None:
    berlin = ZoneInfo("Europe/Berlin")
    winter = datetime(2026, 1, 15, 7, 0, 0, 123456, tzinfo=berlin)
    summer = datetime(2026, 7, 15, 7, 0, tzinfo=berlin)
    ledger.ensure("daily", winter, ["ann@example.com"])
    ledger.ensure("daily", summer, ["ann@example.com"])

    rows = ledger.rows()
    assert [r.slot for r in rows] == [summer, winter]
    assert [r.slot for r in rows] == [datetime(2026, 7, 15, 5, 0, tzinfo=UTC), datetime(2026, 1, 15, 6, 0, 0, 123456, tzinfo=UTC)]
    for row in rows:
        assert row.slot.tzinfo == UTC
        assert row.created_at.tzinfo == UTC and row.updated_at.tzinfo == UTC
    # The same instant written in another zone is the same key.
    utc_winter = winter.astimezone(UTC)
    assert ledger.ensure("daily", utc_winter, ["ann@example.com"]) == 0
    assert ledger.claim("daily", utc_winter, ["ann@example.com"], STALE).mine == ("ann@example.com",)
    claimed = ledger.rows(slot=winter)[0]
    assert claimed.claimed_at is not None and claimed.claimed_at.tzinfo == UTC
    assert abs(claimed.claimed_at - L.now()) < timedelta(minutes=5)


def test_naive_datetimes_are_refused(ledger: Ledger) -> None:
    with pytest.raises(sa.exc.StatementError, match="naive datetime"):
        ledger.ensure("daily", datetime(2026, 1, 15, 7, 0), ["ann@example.com"])
    assert ledger.rows() == []


# ----------------------------------------------------------------------------- dispatch watermarks


def test_dispatch_marks_only_move_forward(open_ledger: Callable[[], Ledger]) -> None:
    ledger, other = open_ledger(), open_ledger()
    assert ledger.marks() == {}
    berlin = ZoneInfo("Europe/Berlin")
    ledger.advance_mark("daily", datetime(2026, 1, 15, 18, 1, tzinfo=berlin))
    other.advance_mark("weekly", SLOT)
    assert ledger.marks() == {"daily": datetime(2026, 1, 15, 17, 1, tzinfo=UTC), "weekly": SLOT}
    other.advance_mark("daily", datetime(2026, 1, 15, 16, 1, tzinfo=UTC))  # a late dispatcher for an older window
    assert ledger.marks()["daily"] == datetime(2026, 1, 15, 17, 1, tzinfo=UTC)
    other.advance_mark("daily", datetime(2026, 1, 15, 18, 1, tzinfo=UTC))
    marks = ledger.marks()
    assert marks["daily"] == datetime(2026, 1, 15, 18, 1, tzinfo=UTC) and marks["daily"].tzinfo == UTC


def test_stuck_finds_dead_claims_lost_tasks_and_lost_retries_but_not_pending_retries(ledger: Ledger) -> None:
    now = L.now()
    names = ["dead", "fresh-claim", "never-tried", "never-tried-recent", "retry-pending", "retry-lost", "sent"]
    ledger.ensure("daily", SLOT, names)
    # dead: claimed long ago by an execution that died; fresh-claim: claimed just now (alive).
    old = ledger.claim("daily", SLOT, ["dead"], stale_after=60)
    set_column(ledger, "claimed_at", now - timedelta(minutes=10), recipient="dead")
    ledger.claim("daily", SLOT, ["fresh-claim"], stale_after=60)
    # never-tried: queued, untouched for a while (its task was lost); never-tried-recent: just queued.
    set_column(ledger, "updated_at", now - timedelta(minutes=5), recipient="never-tried")
    # retry-pending: handed back after an attempt 5 minutes ago, its retry countdown may still be running;
    # retry-lost: handed back half an hour ago, longer than any countdown.
    for name, ago in (("retry-pending", 5), ("retry-lost", 30)):
        claim = ledger.claim("daily", SLOT, [name], stale_after=60)
        ledger.release(claim.token, "daily", SLOT, [name], "SMTP 451")
        set_column(ledger, "updated_at", now - timedelta(minutes=ago), recipient=name)
    sent = ledger.claim("daily", SLOT, ["sent"], stale_after=60)
    ledger.mark_sent(sent.token, "daily", SLOT, ["sent"], "<id@x>", 1, 1)

    found = ledger.stuck(
        stale_before=now - timedelta(minutes=3), queued_before=now - timedelta(minutes=2), retry_before=now - timedelta(minutes=12)
    )
    assert {(s.recipient, s.dead, s.attempts) for s in found} == {("dead", True, 1), ("never-tried", False, 0), ("retry-lost", False, 1)}
    assert old.token  # the dead execution's token no longer matters: the row is claimable by a new one
    # Lost rows are stamped: the next sweep does not pick them up again straight away.
    again = ledger.stuck(
        stale_before=now - timedelta(minutes=3), queued_before=now - timedelta(minutes=2), retry_before=now - timedelta(minutes=12)
    )
    assert {s.recipient for s in again} == {"dead"}


def test_skip_stuck_records_rows_of_a_removed_report_as_skipped(ledger: Ledger) -> None:
    ledger.ensure("gone", SLOT, ["a@x", "b@x"])
    claim = ledger.claim("gone", SLOT, ["b@x"], stale_after=60)
    assert claim.mine == ("b@x",)
    assert ledger.skip_stuck("gone", SLOT, ["a@x", "b@x"], "the report is no longer in the configuration") == 2
    assert {(r.recipient, r.status) for r in ledger.rows(report="gone")} == {("a@x", "skipped"), ("b@x", "skipped")}


def test_a_claim_that_only_records_an_outcome_is_not_an_attempt(ledger: Ledger) -> None:
    ledger.ensure("daily", SLOT, ["a@x"])
    first = ledger.claim("daily", SLOT, ["a@x"], stale_after=60)
    ledger.release(first.token, "daily", SLOT, ["a@x"], "SMTP 451")
    giving_up = ledger.claim("daily", SLOT, ["a@x"], stale_after=60, attempt=False)
    ledger.mark_failed(giving_up.token, "daily", SLOT, ["a@x"], "SMTP 451 (gave up)")
    assert (one(ledger, "a@x").status, one(ledger, "a@x").attempts) == ("failed", 1)


@pytest.mark.slow
def test_many_processes_creating_a_fresh_ledger_at_once_all_succeed(tmp_path: Path) -> None:
    """beat, the worker and the CLI open a new ledger at the same moment: none may fail on 'already exists'."""
    import multiprocessing

    spawn = multiprocessing.get_context("spawn")
    for _ in range(8):  # the race is in timing: several rounds, each on a new file
        url = f"sqlite:///{tmp_path / f'fresh-{uuid.uuid4().hex[:6]}.db'}"
        barrier = spawn.Barrier(6)
        procs = [spawn.Process(target=_open_ledger_at, args=(url, barrier)) for _ in range(6)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(60)
        assert [p.exitcode for p in procs] == [0] * 6
    check = Ledger.from_url(url)
    assert set(sa.inspect(check.engine).get_table_names()) == set(L.metadata.tables)
    check.dispose()


def _open_ledger_at(url: str, barrier: Any) -> None:
    barrier.wait(30)  # all at once, once each has imported everything
    Ledger.from_url(url).dispose()

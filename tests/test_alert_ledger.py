"""The alert_evaluations table, on SQLite and PostgreSQL: the first evaluation of a slot is its truth."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from reporter import alert
from reporter import ledger as L
from reporter.alert import Evaluation, Policy
from reporter.ledger import Ledger

T0 = datetime(2026, 3, 2, 7, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)
POLICY = Policy("value > 1000", value="rows | sum(attribute='amount')", notify="change")


def evaluated(slot: datetime, amount: float, before: Evaluation | None = None) -> Evaluation:
    return alert.evaluation("big", POLICY, slot, [{"region": "North", "amount": amount}], ["region", "amount"], before)


def test_the_first_evaluation_of_a_slot_is_recorded_and_later_ones_read_it(open_ledger: Callable[[], Ledger]) -> None:
    ledger = open_ledger()
    first = ledger.record_evaluation(evaluated(T0, 1500.0))
    assert (first.held, first.value, first.decision, first.rows) == (True, 1500.0, alert.SEND, [{"region": "North", "amount": 1500.0}])
    assert first.held_since == T0 and first.last_alert == T0 and first.evaluated_at is not None
    # A retry that saw other data (the warehouse changed) still gets the first decision.
    again = open_ledger().record_evaluation(evaluated(T0, 10.0))
    assert again == first
    assert ledger.evaluation("big", T0) == first
    assert ledger.evaluation("big", T0 + HOUR) is None and ledger.evaluation("other", T0) is None


def test_previous_is_the_latest_evaluation_before_the_slot(open_ledger: Callable[[], Ledger]) -> None:
    ledger = open_ledger()
    assert ledger.previous_evaluation("big", T0) is None
    s0 = ledger.record_evaluation(evaluated(T0, 1500.0))
    s2 = ledger.record_evaluation(evaluated(T0 + 2 * HOUR, 2000.0, s0))
    assert ledger.previous_evaluation("big", T0 + HOUR) == s0
    assert ledger.previous_evaluation("big", T0 + 3 * HOUR) == s2
    assert ledger.previous_evaluation("big", T0) is None
    assert s2.decision == alert.NOT_SENT and "already held at" in s2.reason and s2.held_since == T0 and s2.last_alert == T0


def test_concurrent_evaluations_of_one_slot_agree_on_one(open_ledger: Callable[[], Ledger]) -> None:
    ledgers = [open_ledger() for _ in range(6)]
    results: list[Evaluation] = []
    barrier = threading.Barrier(len(ledgers))

    def evaluate(index: int) -> None:
        barrier.wait()
        results.append(ledgers[index].record_evaluation(evaluated(T0, 1000.0 + index * 100)))

    threads = [threading.Thread(target=evaluate, args=(i,)) for i in range(len(ledgers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == len(ledgers) and len({(r.value, r.decision) for r in results}) == 1


def test_not_sent_is_final_with_its_reason(open_ledger: Callable[[], Ledger]) -> None:
    ledger = open_ledger()
    ledger.ensure("big", T0, ["ann@example.com", "ben@example.com"])
    claim = ledger.claim("big", T0, ["ann@example.com", "ben@example.com"], stale_after=60)
    assert ledger.mark_not_sent(claim.token, "big", T0, claim.mine, "condition false: value > 1000 → 10") == 2
    rows = ledger.rows(report="big")
    assert {(r.status, r.error) for r in rows} == {(L.NOT_SENT, "condition false: value > 1000 → 10")}
    # Final: another execution claims nothing, and the claim's token can no longer change the rows.
    again = ledger.claim("big", T0, ["ann@example.com", "ben@example.com"], stale_after=60)
    assert again.mine == () and sorted(again.done) == ["ann@example.com", "ben@example.com"]
    assert ledger.mark_failed(claim.token, "big", T0, claim.mine, "x") == 0


def test_prune_keeps_each_reports_latest_evaluation(open_ledger: Callable[[], Ledger]) -> None:
    ledger = open_ledger()
    s0 = ledger.record_evaluation(evaluated(T0, 1500.0))
    ledger.record_evaluation(evaluated(T0 + HOUR, 1600.0, s0))
    ledger.prune(datetime.now(UTC) + timedelta(days=1))
    assert ledger.evaluation("big", T0) is None
    assert ledger.evaluation("big", T0 + HOUR) is not None

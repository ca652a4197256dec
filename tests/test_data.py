"""The data step: seeding a sample warehouse when several worker processes start at once."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable

from reporter.config import load
from reporter.data import Datasources
from tests.conftest import ORDERS_SQL, Project


def test_a_worker_seeding_beside_another_sees_all_of_the_seed_and_no_error(make_project: Callable[..., Project]) -> None:
    """Two pool processes find the warehouse empty at once: the second must wait for the first, not fail or read half."""
    project = make_project()
    config = load(project.config, {})
    other = sqlite3.connect(project.root / "warehouse.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # the first worker is seeding: it holds the write lock, nothing committed yet
    outcome: dict[str, object] = {}

    def second_worker() -> None:
        try:
            engine = Datasources(config).engine("warehouse")
            with engine.connect() as conn:
                outcome["rows"] = conn.exec_driver_sql("select count(*) from orders").scalar_one()
        except Exception as exc:  # noqa: BLE001 - the test reports whatever the second worker raised
            outcome["error"] = exc

    thread = threading.Thread(target=second_worker)
    thread.start()
    time.sleep(0.5)  # the second worker has seen no tables and now waits for the lock
    for statement in filter(str.strip, ORDERS_SQL.split(";")):
        other.execute(statement)
    other.execute("COMMIT")
    other.close()
    thread.join(30)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["rows"] == 3

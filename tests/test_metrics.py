"""A worker's Prometheus endpoint, scraped after real deliveries, and its one log line per delivery.

The worker replaces its process after every task (--max-tasks-per-child 1), so the two sends run in
two different child processes: the endpoint must add up both, the replaced one's included.
"""

from __future__ import annotations

import json
import os
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from reporter.ledger import FINAL, Ledger
from reporter.runner import free_port
from tests.conftest import Inbox, Project
from tests.test_deploy import BIN, minute, publish_send, reporter_cmd, spawn, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RECIPIENTS = ["ann@example.com", "ben@example.com", "cy@example.com"]


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the endpoint: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("reporter_")
    }


def test_metrics_endpoint_counts_deliveries_across_worker_processes(
    make_project: Callable[..., Project], fresh_redis: str, inbox: Inbox, tmp_path: Path
) -> None:
    project = make_project(recipients=RECIPIENTS)
    port = free_port()
    env = project.env(
        REPORTER_BROKER_URL=fresh_redis, REPORTER_SMTP_URL=inbox.url, REPORTER_METRICS_PORT=str(port), REPORTER_LOG_FORMAT="json"
    )
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    inbox.script = ["550 5.1.1 mailbox unavailable"]  # the first message is refused for good
    name = f"metrics-{uuid.uuid4().hex[:4]}"
    worker = spawn(
        reporter_cmd("worker", "-c", "1", "--max-tasks-per-child", "1", "-n", f"{name}@%h", "--without-mingle", "--without-gossip"),
        env,
        tmp_path / "worker.log",
    )
    ledger = Ledger.from_url(project.db_url)
    try:
        wait_until(lambda: " ready." in worker.output(), 60, "the worker to be ready", worker)
        for slot in (minute(-2), minute(-1)):
            publish_send(fresh_redis, "regional", slot)

            def done(slot: object = slot) -> bool:
                rows = ledger.rows(report="regional", slot=slot)  # type: ignore[arg-type]
                return len(rows) == 3 and all(r.status in FINAL for r in rows)

            wait_until(done, 90, f"the send for {slot} to finish", worker)

        regional = (("report", "regional"),)
        expected = {
            ("reporter_deliveries_total", (("report", "regional"), ("status", "sent"))): 5.0,
            ("reporter_deliveries_total", (("report", "regional"), ("status", "failed"))): 1.0,
            ("reporter_render_seconds_count", regional): 2.0,
            ("reporter_send_seconds_count", regional): 6.0,
            ("reporter_lag_seconds_count", regional): 5.0,
        }
        found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

        def counted() -> bool:
            # The ledger row is final a moment before the observers hear of it: scrape until they have.
            found.clear()
            found.update(scrape(port))
            return all(found.get(key) == value for key, value in expected.items())

        wait_until(counted, 30, "the endpoint to count both sends", worker)
        assert found[("reporter_render_seconds_sum", regional)] > 0
        assert found[("reporter_lag_seconds_sum", regional)] >= 5 * 60  # each slot lies at least a minute back
        assert found[("reporter_lag_seconds_bucket", (("le", "+Inf"), *regional))] == 5.0
    finally:
        worker.stop()
        ledger.engine.dispose()

    output = worker.output()
    # Two tasks, two child processes (replaced after each task), one endpoint adding both up.
    assert "ForkPoolWorker-1" in output and "ForkPoolWorker-2" in output
    assert f"metrics on http://0.0.0.0:{port}/metrics" in output
    # One JSON log line per delivery, with what an operator searches by.
    lines = [json.loads(line[line.index("{") :]) for line in output.splitlines() if '"event": "delivery"' in line]
    assert sorted(d["status"] for d in lines) == ["failed"] + ["sent"] * 5
    for d in lines:
        assert {"report", "slot", "recipient", "status", "duration_ms", "message_id"} <= d.keys()
        assert d["report"] == "regional"
        assert d["message_id"].startswith("<regional.")
    (failed,) = [d["recipient"] for d in lines if d["status"] == "failed"]
    sent = Counter(d["recipient"] for d in lines if d["status"] == "sent")
    assert sent == {r: 1 if r == failed else 2 for r in RECIPIENTS}

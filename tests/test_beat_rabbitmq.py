"""Two `celery beat` processes on a RabbitMQ broker, where there is no Redis to hold the leader lock: they
lead by the lease in the ledger database (PostgreSQL, as on several hosts). One leads, the other stands
by; the leader is SIGKILLed and the standby takes over; every recipient gets one email per slot, sent by a
real worker on RabbitMQ to an aiosmtpd inbox."""

from __future__ import annotations

import itertools
import json
import os
import signal
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from reporter import defaults
from reporter.ledger import Ledger
from reporter.schedule import isoformat
from tests.conftest import Inbox, Project, Worker, wait_until
from tests.test_reliability import delivered, project_yaml

pytestmark = [pytest.mark.integration, pytest.mark.slow(minutes=3)]

REPORT = """\
  minutely:
    schedule: "* * * * *"
    subject: "Minutely {{ slot.strftime('%H:%M') }}"
    template: simple.html
    query: {datasource: warehouse, sql: "select region, amount from orders"}
    recipients: [ann@example.com, ben@example.com]
"""


def leader_pid(ledger: Ledger) -> int | None:
    """The pid of the beat holding the leader lease in the ledger, if any."""
    raw = ledger.lease_holder(defaults.BEAT_LEADER_KEY)
    return None if raw is None else int(json.loads(raw)["pid"])


def test_two_beats_on_rabbitmq_lead_by_the_ledger_lease_and_the_standby_takes_over_after_sigkill(
    make_project: Callable[..., Project],
    amqp_url: str,
    pg_url: str,
    inbox: Inbox,
    start_worker: Callable[..., Worker],
    start_beat: Callable[..., Any],
    tmp_path: Path,
) -> None:
    project = make_project(yaml_text="placeholder")
    project.config.write_text(project_yaml(project.root, REPORT, dispatch_cron="* * * * *", beat_lock_timeout=10))
    env = project.env(REPORTER_BROKER_URL=amqp_url, REPORTER_DATABASE_URL=pg_url, REPORTER_SMTP_URL=inbox.url)
    ledger = Ledger.from_url(pg_url)
    try:
        worker = start_worker(env, concurrency=2)
        first = start_beat(env, "beat-a")
        wait_until(lambda: leader_pid(ledger) == first.pid, 60, "the first beat to lead", lambda: (tmp_path / "beat-a.log").read_text())
        second = start_beat(env, "beat-b")
        wait_until(lambda: "standing by" in (tmp_path / "beat-b.log").read_text(), 60, "the second beat to stand by")
        # Two beats, two slots: each reaches each recipient once.
        wait_until(lambda: len({slot for slot, _ in delivered(inbox)}) >= 2, 150, "two slots delivered", worker.output)
        assert leader_pid(ledger) == first.pid, "the standby must not take the lease from a live leader"

        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        wait_until(lambda: leader_pid(ledger) == second.pid, 60, "the standby to take over", lambda: (tmp_path / "beat-b.log").read_text())
        slots_before = {slot for slot, _ in delivered(inbox)}
        wait_until(lambda: len({slot for slot, _ in delivered(inbox)} - slots_before) >= 1, 150, "a slot delivered after the handover")
        # Every row of the run up to a slot ago is final, then the whole run is checked: no (slot, recipient)
        # twice, no slot missing across the handover.
        settled = datetime.now(UTC) - timedelta(seconds=30)
        wait_until(
            lambda: all(r.status == "sent" for r in ledger.rows(report="minutely", until=settled)),
            120,
            "the slots before the handover to be sent",
            worker.output,
        )
        got = delivered(inbox)
        assert max(got.values()) == 1, f"duplicates: {[k for k, n in got.items() if n > 1]}"
        slots = sorted({datetime.fromisoformat(slot.replace("Z", "+00:00")) for slot, _ in got})
        assert all(b - a == timedelta(minutes=1) for a, b in itertools.pairwise(slots)), f"a slot was lost: {slots}"
        assert all(got[(isoformat(s), r)] == 1 for s in slots for r in ("ann@example.com", "ben@example.com"))
        assert "beat leads" in (tmp_path / "beat-b.log").read_text()
        assert worker.proc.poll() is None
    finally:
        ledger.dispose()

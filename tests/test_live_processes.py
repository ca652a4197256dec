"""Live configuration with real processes: beat and two workers follow edits of schedules.yaml with no
restart — a report added, an invalid edit (nothing applied, nothing stops, status says why), then a fix
that changes one report and removes another."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from celery import Celery

from reporter.config import load
from reporter.ledger import Ledger
from reporter.schedule import isoformat
from tests.conftest import Inbox, Project, Worker, run_cli, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ADDED = """
  weekly-ops:
    schedule: "* * * * *"
    subject: "Ops {{ slot.strftime('%H:%M') }}"
    template: simple.html
    query:
      datasource: warehouse
      sql: "select region, amount from orders order by id"
    formats: [html]
    recipients: ["ops@corp.local"]
"""


def subjects(inbox: Inbox, address: str) -> list[str]:
    return [str(m["Subject"]) for m in inbox.to(address)]


@pytest.mark.slow(minutes=3)
def test_beat_and_workers_follow_an_added_report_an_invalid_edit_and_a_fix(
    make_project: Callable[..., Project],
    fresh_redis: str,
    inbox: Inbox,
    start_worker: Callable[..., Worker],
    start_beat: Callable[..., subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    # An hourly dispatcher: a report added now is in no window beat has dispatched, so only following
    # the edit gets it sent this hour.
    project = make_project(cron="* * * * *", dispatch_cron="1 * * * *", recipients=["ann@example.com"])
    env = project.env(REPORTER_BROKER_URL=fresh_redis, REPORTER_SMTP_URL=inbox.url)
    workers = [start_worker(env, concurrency=1), start_worker(env, concurrency=1)]
    beat = start_beat(env)
    beat_log = tmp_path / "beat.log"  # where start_beat writes it

    def logs() -> str:
        return "\n".join([beat_log.read_text(errors="replace"), *(w.output() for w in workers)])

    first = load(project.config, env).version
    wait_until(lambda: "beat leads" in beat_log.read_text(errors="replace"), 60, "beat leads", logs)

    # 1. A report added while everything runs is sent from its next slot.
    project.config.write_text(project.config.read_text() + ADDED)
    added = load(project.config, env).version
    wait_until(lambda: bool(subjects(inbox, "ops@corp.local")), 100, "the added report reaches its inbox", logs)
    assert re.search(rf"configuration {added} applied \(was {first}\): reports added: weekly-ops", beat_log.read_text()), logs()
    wait_until(lambda: bool(subjects(inbox, "ann@example.com")), 70, "the report that was there all along is sent too", logs)

    # 2. An invalid edit: nothing is applied, nothing stops, beat logs it once, status says so.
    good = project.config.read_text()
    project.config.write_text(good.replace('    subject: "Ops', '    subjekt: "Ops'))
    problem = re.compile(r"has 2 problem\(s\); still running " + added)
    wait_until(lambda: bool(problem.search(beat_log.read_text(errors="replace"))), 30, "beat logs the problems", logs)
    status = run_cli("status", env=env)
    assert status.returncode == 0, status.stderr
    assert f"configuration: running {added} from " in status.stdout, status.stdout
    assert "the file on disk has 2 problem(s), so it is not applied:" in status.stdout, status.stdout
    assert "reports.weekly-ops.subjekt: unknown key (did you mean 'subject'?)" in status.stdout, status.stdout
    for role in ("beat", "worker"):
        health = run_cli("health", role, env=env)
        assert health.returncode == 0 and health.stdout.startswith("ok: "), (role, health.stdout, health.stderr)
    sent_before = len(inbox.messages)
    wait_until(lambda: len(inbox.messages) >= sent_before + 2, 100, "sends go on with the last good version", logs)
    assert beat.poll() is None and all(w.proc.poll() is None for w in workers), "a broken edit stopped a process"
    assert len(problem.findall(beat_log.read_text())) == 1, "the same problems are logged once"

    # Queue regional's next minutes by hand as well: near the hour, beat's own window may hold none of them
    # any more (its next dispatch, at :01, would already run under the fix, which removes regional).
    soon = datetime.now(UTC).replace(second=0, microsecond=0) + timedelta(minutes=1)
    Celery("t", broker=fresh_redis, set_as_current=False).send_task(
        "email_reports.schedule_hourly",
        kwargs={"scheduled_for": isoformat(soon), "window_end": isoformat(soon + timedelta(minutes=3)), "reports": ["regional"]},
        queue="reporter.scheduled",
    )
    wait_until(lambda: "for [" + isoformat(soon) in logs(), 30, "the hand dispatch of regional", logs)

    # 3. The fix changes weekly-ops' subject and removes the report that was there first.
    fixed = good.replace('subject: "Ops {{', 'subject: "Ops v2 {{')
    fixed = fixed[: fixed.index("  regional:")] + fixed[fixed.index("  weekly-ops:") :]
    project.config.write_text(fixed)
    final = load(project.config, env).version
    wait_until(lambda: any(s.startswith("Ops v2") for s in subjects(inbox, "ops@corp.local")), 100, "the changed subject arrives", logs)

    ledger = Ledger.from_url(project.db_url)
    try:

        def removed_rows_skipped() -> bool:
            rows = ledger.rows(report="regional", status="skipped")
            return any("no longer in the configuration" in (r.error or "") for r in rows)

        # The removed report's slots dispatched in this window are recorded skipped when they come due.
        wait_until(removed_rows_skipped, 100, "the removed report's queued slot is skipped", logs)
        now = datetime.now(UTC)
        ops = ledger.rows(report="weekly-ops", status="sent", until=now)
        versions = {r.config_version for r in ops}
        assert versions <= {added, final} and final in versions, versions
        assert all(r.wait_ms is not None and r.duration_ms is not None for r in ops)
        # Every (report, slot, recipient) went out at most once.
        assert len({(r.report, r.slot, r.recipient) for r in ledger.rows()}) == len(ledger.rows())
        counted = {
            (str(m["X-Reporter-Report"]), str(m["X-Reporter-Slot"]), a)
            for m, (_, rcpts) in zip(inbox.messages, inbox.envelopes, strict=True)
            for a in rcpts
        }
        assert len(counted) == sum(len(r) for _, r in inbox.envelopes), "an email arrived twice"
        regional_after = [r for r in ledger.rows(report="regional", status="sent") if r.config_version == final]
        assert not regional_after, "the removed report was sent under the version that removed it"
    finally:
        ledger.dispose()
    assert "Traceback" not in logs(), logs()

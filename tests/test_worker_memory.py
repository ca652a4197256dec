"""A worker replaces a pool process that keeps growing, and only that: memory counts from the process's own start."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from celery import Celery

from tests.conftest import Inbox, Project, Worker, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BALLAST = """
# Imported by the worker's main process when it checks the config: 150 MB resident there, and so in the
# peak resident memory (ru_maxrss) every pool process forked from it inherits.
BALLAST = b"x" * (150 * 1024 * 1024)
KEPT = []

def steady(slot, report):
    return [{"region": "Atlantis", "amount": 1.5}]

def leaky(slot, report):
    KEPT.append(b"y" * (128 * 1024 * 1024))  # 128 MB more, kept: a process that really grows
    return [{"region": "Mu", "amount": 2.5}]
"""

YAML = """\
timezone: UTC
defaults:
  sender: "Reports <reports@example.com>"
  rate_limit: "50/s"
reports:
  steady:
    schedule: "0 7 * * *"
    subject: "Steady"
    template: simple.html
    function: ballast:steady
    recipients: [ann@example.com]
  leaky:
    schedule: "0 7 * * *"
    subject: "Leaky"
    template: simple.html
    function: ballast:leaky
    recipients: [ann@example.com]
"""


def finished(worker: Worker) -> list[tuple[str, str]]:
    """(pool process, report) of each send that succeeded, in order."""
    return re.findall(r"INFO/(ForkPoolWorker-\d+)\] Task email_reports\.send\[[^\]]+\] succeeded.*?'report': '(\w+)'", worker.output())


def test_a_large_main_process_does_not_make_every_child_recycle_but_a_growing_child_is(
    make_project: Callable[..., Project], fresh_redis: str, inbox: Inbox, start_worker: Callable[..., Worker]
) -> None:
    project = make_project(yaml_text=YAML)
    Path(project.root / "ballast.py").write_text(BALLAST)
    env = project.env(REPORTER_BROKER_URL=fresh_redis, REPORTER_SMTP_URL=inbox.url)
    # 100 MB: below what the main process (and so each child's inherited peak) holds, above what a send adds.
    worker = start_worker(env, concurrency=1, max_memory_per_child=100_000)
    app = Celery("t", broker=fresh_redis, set_as_current=False)

    def send(report: str, day: int) -> None:
        count = len(finished(worker))
        app.send_task("email_reports.send", args=(report, f"2026-01-{day:02d}T07:00:00Z"), queue="reporter.scheduled")
        wait_until(lambda: len(finished(worker)) > count, 60, f"{report} to be sent", worker.output)

    for day in (1, 2, 3):
        send("steady", day)
    # One process did all three (a process replaced after its task would hand the next one to ForkPoolWorker-2).
    assert [process for process, _ in finished(worker)] == ["ForkPoolWorker-1"] * 3, worker.output()[-3000:]

    send("leaky", 4)
    send("steady", 5)
    # The process that grew 128 MB was replaced once its task ended: a fresh one took the next send.
    assert [process for process, _ in finished(worker)][3:] == ["ForkPoolWorker-1", "ForkPoolWorker-2"], worker.output()[-3000:]
    assert len(inbox.messages) == 5

"""Every call the benchmarks make into reporter, in one place.

The figures use only what is here, so when reporter's modules move (Runtime into runtime.py, tasks
split up), the import paths are fixed in this file alone. Each function goes through the path a user's
process takes: the config loader, the checks `validate` runs, the dispatcher task, the send task's
`send_slot`, the Celery publish the dispatcher uses.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any


def use_environment(env: Mapping[str, str]) -> None:
    """Make this process run with ENV's REPORTER_* settings, and forget the Runtime it had built.

    The private broker's URL must be in ENV before `reporter.celery_app` is first imported (Celery
    reads it at import); later calls only change the config, ledger and SMTP settings.
    """
    for key in [k for k in os.environ if k.startswith("REPORTER_")]:
        del os.environ[key]
    os.environ.update(env)
    # The Celery app the tasks publish through, built from the environment on first import (and made
    # the current app, so tasks called here publish to the private Redis, never to a default broker).
    import reporter.celery_app  # noqa: F401
    from reporter import runtime

    runtime.reset()


def runtime() -> Any:
    """This process's Runtime for the environment set by `use_environment` (config loaded, ledger created)."""
    from reporter.runtime import runtime as get

    return get()


def load_config(path: Path) -> Any:
    """reporter.config.load: read, expand and validate schedules.yaml (what every process does at start)."""
    from reporter.config import load

    return load(path, dict(os.environ), path.parent / "templates")


def load_checked(path: Path) -> Any:
    """The config plus every content check (templates, functions, drivers): what `validate` and a worker run."""
    from reporter.checks import load_checked as checked

    return checked(path, dict(os.environ), path.parent / "templates")


def send_slot(rt: Any, report: str, slot: datetime, only: list[str] | None = None) -> Any:
    """Render REPORT once for SLOT and send it to every recipient (or ONLY), as the send task does."""
    from reporter.deliver import send_slot as send

    return send(rt, report, slot, only=only)


def sent_count(result: Any) -> int:
    """Recipients a send_slot result says were sent to."""
    return len(result.sent)


def render(rt: Any, report: str, slot: datetime) -> Any:
    """The Runtime's renderer's output for REPORT at SLOT (HTML, text, PDF, CSV)."""
    return rt.renderer.render(report, slot)


def pdf_html(rt: Any, report: str, slot: datetime) -> str:
    """The HTML the renderer turns into REPORT's PDF for SLOT (charts inline), for a raw WeasyPrint baseline."""
    renderer = rt.renderer
    seen: list[str] = []
    original = renderer.pdf

    def spy(html: str) -> bytes:
        seen.append(html)
        return bytes(original(html))

    renderer.pdf = spy  # an instance attribute, removed below: the class is untouched
    try:
        renderer.render(report, slot)
    finally:
        del renderer.pdf
    if not seen:
        raise RuntimeError(f"{report} made no PDF")
    return seen[0]


def dispatch(start: datetime, end: datetime) -> int:
    """Run the dispatcher task's body in this process for [START, END): ledger rows and enqueued sends; slots enqueued."""
    from reporter.schedule import isoformat
    from reporter.tasks import schedule_hourly

    result = schedule_hourly(scheduled_for=isoformat(start), window_end=isoformat(end))
    return int(result["enqueued"])


def enqueue(rt: Any, report: str, slot: datetime) -> None:
    """Publish email_reports.send for (REPORT, SLOT) as the dispatcher does (eta = the slot)."""
    from reporter.dispatch import Due
    from reporter.tasks import enqueue_send

    enqueue_send(rt, Due(report, slot))


def close(rt: Any) -> None:
    """Let go of a Runtime's database connections."""
    rt.ledger.dispose()

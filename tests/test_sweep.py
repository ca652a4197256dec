"""The sweep's re-enqueue, through the real app onto a real Redis: a lost row goes back as the kind of send
that made it (a send-now stays a send-now), so an alert's manual send never records an evaluation."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis

from reporter import defaults, runtime
from reporter.app import create_app
from reporter.ledger import Ledger
from reporter.schedule import isoformat
from reporter.settings import Settings
from tests.conftest import Project

pytestmark = [pytest.mark.integration]


def published(client: redis.Redis, queue: str) -> list[dict[str, Any]]:
    """The email_reports.send messages waiting on QUEUE: their kwargs, with the report and slot."""
    out = []
    for raw in client.lrange(queue, 0, -1):
        message = json.loads(raw)
        args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        out.append({"report": args[0], "slot": args[1], **kwargs})
    return out


@pytest.fixture
def in_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[dict[str, str]], None]]:
    def use(env: dict[str, str]) -> None:
        for key, value in env.items():
            if key.startswith("REPORTER_"):
                monkeypatch.setenv(key, value)
        runtime.reset()
        create_app(Settings.from_env())

    yield use
    runtime.reset()


def test_the_sweep_sends_a_lost_send_now_back_as_a_send_now_and_a_scheduled_row_as_scheduled(
    make_project: Callable[..., Project], fresh_redis: str, in_process: Callable[[dict[str, str]], None]
) -> None:
    from reporter.tasks import sweep

    project = make_project(recipients=["ann@example.com"])
    in_process(project.env(REPORTER_BROKER_URL=fresh_redis, REPORTER_SWEEP_GRACE="1"))
    ledger = Ledger.from_url(project.db_url)
    past = (datetime.now(UTC) - timedelta(hours=2)).replace(minute=0, second=0, microsecond=0)
    ledger.ensure("regional", past, ["ann@example.com"], trigger="manual")  # `reporter send --now`, its task lost
    ledger.ensure("regional", past - timedelta(hours=1), ["ann@example.com"], trigger="schedule")
    time.sleep(1.5)  # untouched longer than the grace
    counts = sweep()
    assert counts["re_enqueued"] == 2, counts
    client = redis.Redis.from_url(fresh_redis)
    [urgent] = published(client, defaults.QUEUE_URGENT)
    [scheduled] = published(client, defaults.QUEUE_SCHEDULED)
    assert (urgent["trigger"], urgent["only"], urgent["slot"]) == ("manual", ["ann@example.com"], isoformat(past))
    assert scheduled["trigger"] == "schedule"
    ledger.dispose()

"""Beat needs only the configuration and the broker: it starts, leads and dispatches while the ledger
database is down, saying so once, and keeps trying."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from reporter import defaults
from reporter.runner import free_port
from tests.conftest import Project, wait_until

pytestmark = pytest.mark.integration


def test_beat_starts_leads_and_dispatches_while_the_ledger_database_is_down(
    make_project: Callable[..., Project], fresh_redis: str, start_beat: Callable[..., Any], tmp_path: Path
) -> None:
    project = make_project(dispatch_cron="1 * * * *")
    ledger_url = f"postgresql+psycopg://reporter:pw-s3cret@127.0.0.1:{free_port()}/reporter"  # nothing listens there
    beat = start_beat(project.env(REPORTER_BROKER_URL=fresh_redis, REPORTER_DATABASE_URL=ledger_url), "beat-noledger")
    log = tmp_path / "beat-noledger.log"
    client = redis.Redis.from_url(fresh_redis)

    def ticks() -> list[str]:
        raw = client.get(defaults.BEAT_TICK_KEY)
        return [json.loads(raw)["at"]] if raw else []

    seen: set[str] = set()

    def ticked_three_times() -> bool:
        seen.update(ticks())
        return len(seen) >= 3

    # It leads (its heartbeat is in the broker), and its start-up dispatch waits in the queue for a worker.
    wait_until(lambda: bool(ticks()) and client.llen(defaults.QUEUE_SCHEDULED) >= 1, 60, "beat to lead and dispatch", log.read_text)
    wait_until(ticked_three_times, 90, "beat to keep ticking", log.read_text)
    assert beat.poll() is None, log.read_text()[-3000:]
    text = log.read_text()
    said = "beat: the ledger database postgresql+psycopg://reporter:***@127.0.0.1:"
    assert text.count(said) == 1, text[-3000:]  # one clear line, not one per tick
    assert "scheduling goes on" in text and "recorded there once it answers" in text
    assert "Traceback" not in text and "pw-s3cret" not in text
    client.close()


def test_beat_records_its_configuration_once_the_ledger_answers_and_says_so_once_until_then(
    make_project: Callable[..., Project], fresh_redis: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from reporter.app import create_app
    from reporter.beat import Scheduler
    from reporter.ledger import Ledger
    from reporter.settings import Settings

    project = make_project()
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the ledger's folder should be")  # the ledger cannot open until it goes
    ledger_url = f"sqlite:///{blocker / 'ledger.db'}"
    env = project.env(REPORTER_BROKER_URL=fresh_redis, REPORTER_DATABASE_URL=ledger_url)
    scheduler = Scheduler(create_app(Settings.from_env(env)))
    version = scheduler.config.version
    down = "beat: the ledger database sqlite:///"
    with caplog.at_level("INFO", logger="reporter.beat"):
        scheduler._record()
        scheduler._record()  # tried again, and not said again
        assert caplog.text.count(down) == 1
        blocker.unlink()
        scheduler._record()
        assert f"beat: the ledger database answers again; configuration {version} recorded" in caplog.text
    ledger = Ledger.from_url(ledger_url)
    assert ledger.config_source(version) is not None
    ledger.dispose()
    scheduler._ledger.dispose()

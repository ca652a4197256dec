"""What a worker says at start-up about broker settings that would duplicate or lose sends."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest

from tests.conftest import ROOT, Project, Worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_visibility_timeout_shorter_than_the_dispatch_window_is_refused(make_project: Callable[..., Project], fresh_redis: str) -> None:
    project = make_project(dispatch_cron="1 * * * *")  # enqueues up to an hour ahead; time_limit is 30 s
    env = project.env(REPORTER_BROKER_URL=fresh_redis, REPORTER_VISIBILITY_TIMEOUT="600")
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "reporter.celery_app", "worker", "--loglevel", "INFO"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "REPORTER_VISIBILITY_TIMEOUT: 600s is too short: the dispatcher enqueues sends up to 3600s ahead" in done.stderr
    assert "Set it above 3630" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_long_enough_visibility_timeout_is_used_and_redis_without_persistence_is_named(
    make_project: Callable[..., Project], fresh_redis: str, start_worker: Callable[..., Worker]
) -> None:
    project = make_project(dispatch_cron="1 * * * *")
    worker = start_worker(project.env(REPORTER_BROKER_URL=fresh_redis, REPORTER_VISIBILITY_TIMEOUT="7200"))
    # The test Redis is started with --save "" --appendonly no, as `reporter run`'s is.
    assert "Redis keeps nothing on disk: a Redis restart loses queued sends" in worker.output()
    done = subprocess.run(
        [sys.executable, "-c", "from reporter.celery_app import app; print(app.conf.broker_transport_options['visibility_timeout'])"],
        env=project.env(REPORTER_BROKER_URL=fresh_redis, REPORTER_VISIBILITY_TIMEOUT="7200"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout.strip() == "7200", done.stderr


def test_a_malformed_smtp_url_is_refused_before_anything_starts(make_project: Callable[..., Project], fresh_redis: str) -> None:
    project = make_project()
    env = project.env(REPORTER_BROKER_URL=fresh_redis, REPORTER_SMTP_URL="smtp//bot:pw-s3cret@mail.example.com")
    worker = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "reporter.celery_app", "worker"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    run = subprocess.run([sys.executable, "-m", "reporter", "run"], env=env, cwd=project.root, capture_output=True, text=True, timeout=60)
    for done in (worker, run):
        assert done.returncode == 1, done.stderr[-2000:]
        assert "REPORTER_SMTP_URL: must start with smtp:// or smtps://" in done.stderr
        assert "Traceback" not in done.stderr and "pw-s3cret" not in done.stderr
    assert "reporter run: started" not in run.stderr

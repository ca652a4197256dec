"""Stock Flower (`reporter flower`, i.e. `celery -A reporter.celery_app flower`) against a running worker:
its API lists the worker and shows a finished send under its own name, with readable arguments."""

from __future__ import annotations

import base64
import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from reporter.runner import free_port
from reporter.schedule import isoformat
from tests.conftest import Inbox, Project, Worker
from tests.test_deploy import BIN, minute, publish_send, reporter_cmd, spawn, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

AUTH = "ops:s3cret"


def get(port: int, path: str, auth: str | None = AUTH) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except OSError:
        return 0, ""


def test_flower_shows_the_worker_and_a_finished_send(
    make_project: Callable[..., Project], fresh_redis: str, inbox: Inbox, start_worker: Callable[..., Worker], tmp_path: Path
) -> None:
    project = make_project(recipients=["ann@example.com", "ben@example.com", "cy@example.com"])
    env = project.env(REPORTER_BROKER_URL=fresh_redis, REPORTER_SMTP_URL=inbox.url)
    worker = start_worker(env, concurrency=1)
    node = f"{worker.name}@{os.uname().nodename}"

    port = free_port()
    flower_env = {**env, "FLOWER_PORT": str(port), "FLOWER_ADDRESS": "127.0.0.1", "FLOWER_BASIC_AUTH": AUTH}
    flower_env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    flower = spawn(reporter_cmd("flower"), flower_env, tmp_path / "flower.log")
    try:
        wait_until(lambda: get(port, "/healthcheck", auth=None) == (200, "OK"), 60, "Flower to answer", flower)
        # Flower hears the worker's events (its heartbeats) before the send, so it sees the send's too.
        online = f'flower_worker_online{{worker="{node}"}} 1.0'
        wait_until(lambda: online in get(port, "/metrics")[1], 60, "Flower to hear the worker's heartbeat", flower)
        assert get(port, "/api/workers", auth=None)[0] == 401  # the API is not open to anyone

        slot = minute(-1)
        publish_send(fresh_redis, "regional", slot)
        inbox.wait_for(3)
        found: dict[str, Any] = {}

        def finished() -> bool:
            status, body = get(port, "/api/tasks?taskname=email_reports.send")
            tasks = json.loads(body) if status == 200 else {}
            done = [t for t in tasks.values() if t.get("state") == "SUCCESS"]
            if done:
                found.update(done[0])
            return bool(done)

        wait_until(finished, 60, "Flower to show the send as finished", flower)
        assert found["name"] == "email_reports.send"
        assert found["worker"] == node
        assert found["args"] == repr(("regional", isoformat(slot)))
        assert "'trigger': 'manual'" in found["kwargs"]
        assert re.search(r"'sent': 3\b", found["result"]), found["result"]
        assert found["runtime"] > 0

        status, body = get(port, "/api/workers?refresh=1")
        assert status == 200, body
        workers = json.loads(body)
        assert node in workers
        assert "email_reports.send" in workers[node]["registered"]
        assert {q["name"] for q in workers[node]["active_queues"]} == {"reporter.urgent", "reporter.scheduled"}
    finally:
        flower.stop()

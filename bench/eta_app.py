"""A bare Celery app for the latency figure's baseline: how late Celery runs a task that has an ETA.

`celery -A bench.eta_app worker` with BENCH_BROKER_URL set; each `stamp(at)` pushes (now - at) onto a
Redis list, so the bench reads how late each one ran.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery

KEY = "bench:eta-lateness"

app = Celery("bench_eta", broker=os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/15"))
app.conf.update(task_serializer="json", accept_content=["json"], task_ignore_result=True, worker_prefetch_multiplier=1)


@app.task(name="bench.stamp")  # type: ignore[untyped-decorator]
def stamp(at: float) -> None:
    """Record how many seconds after AT this ran."""
    import redis

    late = time.time() - at
    client: Any = redis.Redis.from_url(app.conf.broker_url)
    client.rpush(KEY, late)
    client.close()

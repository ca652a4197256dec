"""Prometheus metrics: a delivery observer, and the endpoint a worker's main process serves.

Prefork workers send in their child processes, and a child is replaced after a number of tasks or
when it grows too big. So the counts go through prometheus_client's multiprocess mode: each child
writes its samples to files in a folder made fresh for each worker, and the main process adds up all
the files, those of replaced children included, whenever it is scraped.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

from reporter.observers import Delivery
from reporter.settings import Settings

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""Where prometheus_client's multiprocess mode keeps each process's samples."""

RENDER_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
SEND_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# From "on time" to a catch-up after an outage (the grace period is an hour by default).
LAG_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)


@dataclass(frozen=True)
class _Metrics:
    deliveries: Any
    render_seconds: Any
    send_seconds: Any
    lag_seconds: Any
    config_problems: Any
    config_version: Any


@cache
def _metrics() -> _Metrics:
    """The metrics, created once per process on first use: in a worker's child, after the fork."""
    from prometheus_client import Counter, Gauge, Histogram

    return _Metrics(
        deliveries=Counter("reporter_deliveries", "Emails by outcome: sent, failed (for good), retry (handed back)", ["report", "status"]),
        render_seconds=Histogram(
            "reporter_render_seconds", "Seconds to fetch the data and render one report slot", ["report"], buckets=RENDER_BUCKETS
        ),
        send_seconds=Histogram("reporter_send_seconds", "Seconds of one SMTP (or Maildir) transaction", ["report"], buckets=SEND_BUCKETS),
        lag_seconds=Histogram("reporter_lag_seconds", "Seconds from a slot to its email being sent", ["report"], buckets=LAG_BUCKETS),
        config_problems=Gauge(
            "reporter_config_problems",
            "Problems in schedules.yaml (or its templates) on disk; non-zero: an edit is not applied, the last good version runs",
            multiprocess_mode="livemax",
        ),
        config_version=Gauge(
            "reporter_config_version_info", "1 for the configuration version a process runs", ["version"], multiprocess_mode="livemax"
        ),
    )


class PrometheusObserver:
    """Counts deliveries by status and times renders, sends and the lag from slot to send."""

    def rendered(self, report: str, slot: datetime, seconds: float, rows: int) -> None:
        _metrics().render_seconds.labels(report).observe(seconds)

    def delivered(self, delivery: Delivery) -> None:
        m = _metrics()
        m.deliveries.labels(delivery.report, delivery.status).inc()
        if delivery.message_id is not None:  # an SMTP transaction was attempted
            m.send_seconds.labels(delivery.report).observe(delivery.seconds)
        if delivery.status == "sent":
            m.lag_seconds.labels(delivery.report).observe(max((datetime.now(UTC) - delivery.slot).total_seconds(), 0.0))

    def configured(self, version: str, problems: int) -> None:
        m = _metrics()
        m.config_problems.set(problems)
        if version != self._version:
            if self._version is not None:
                m.config_version.labels(self._version).set(0)
            m.config_version.labels(version).set(1)
            self._version = version

    _version: str | None = None

    def __repr__(self) -> str:
        return "PrometheusObserver()"


class Endpoint:
    """The /metrics HTTP endpoint of one worker, adding up the samples of all its processes."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @classmethod
    def start(cls, port: int, host: str = "0.0.0.0") -> Endpoint | None:
        """Serve on PORT from this (the worker's main) process; None, logged, if the port is taken.

        Call it before the pool forks: the children inherit the folder through the environment.
        """
        from prometheus_client import CollectorRegistry, start_http_server, values
        from prometheus_client.multiprocess import MultiProcessCollector

        directory = Path(tempfile.mkdtemp(prefix="reporter-metrics-"))
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
        try:
            start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            log.error("metrics endpoint not started on %s:%d: %s", host, port, exc)
            shutil.rmtree(directory, ignore_errors=True)
            return None
        # prometheus_client decides when imported whether samples go to files; it was imported above,
        # before the folder was known, so choose again. The forked children inherit both.
        Settings.export(MULTIPROC_ENV, str(directory))
        values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
        log.info("metrics on http://%s:%d/metrics", host, port)
        return cls(directory)

    def close(self) -> None:
        """Remove the samples folder (the HTTP server thread ends with the process)."""
        shutil.rmtree(self.directory, ignore_errors=True)

"""The Celery app, configured in this one place: `celery -A reporter.celery_app worker|beat|…`."""

from __future__ import annotations

import logging
import sys
from typing import Any

from celery import Celery, signals
from kombu.entity import Exchange, Queue

from reporter import defaults
from reporter.errors import ConfigError, Problem, ReporterError
from reporter.settings import Settings, is_redis_url, redis_client_url

log = logging.getLogger(__name__)

try:
    settings = Settings.from_env()
    _broker_url = settings.broker.require()  # the same rule as every `reporter` command
except ReporterError as _exc:
    print(f"reporter: {_exc}", file=sys.stderr)
    raise SystemExit(1) from None

app = Celery("reporter", include=["reporter.tasks"])
app.conf.update(
    broker_url=_broker_url,
    broker_connection_retry_on_startup=True,
    # JSON only: no pickle, so a message can never run code it carries.
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    timezone="UTC",
    enable_utc=True,
    # Acknowledge after the work, and hand the message back if the worker process dies:
    # the ledger's claim turns the resulting redelivery into a no-op when the work was done.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    # Let a running send finish if the broker connection drops: it records `sent` in the ledger, and
    # the redelivered copy then finds it done. Cancelling would cut sends off mid-SMTP-transaction.
    worker_cancel_long_running_tasks_on_connection_loss=False,
    # Each queue its own exchange and routing key, so a send-now never lands behind scheduled work.
    task_queues=tuple(Queue(q, Exchange(q, type="direct"), routing_key=q) for q in (defaults.QUEUE_URGENT, defaults.QUEUE_SCHEDULED)),
    task_default_exchange=defaults.QUEUE_SCHEDULED,
    task_default_routing_key=defaults.QUEUE_SCHEDULED,
    task_default_queue=defaults.QUEUE_SCHEDULED,
    task_soft_time_limit=defaults.SOFT_TIME_LIMIT,
    task_time_limit=defaults.TIME_LIMIT,
    # No task-sent event: it cost a second broker publish for every task the dispatcher enqueues
    # (10,000 slots, 20,000 publishes). Workers' events (received, started, succeeded...) still carry
    # each task's name, arguments and result to Flower; only a task no worker has received yet is
    # not shown as SENT there. `reporter status` reads the ledger, not events.
    task_send_sent_event=False,
    worker_send_task_events=True,
    beat_scheduler="reporter.beat:Scheduler",
    beat_max_loop_interval=10,
    broker_transport_options={"visibility_timeout": defaults.DISPATCH_WINDOW + defaults.TIME_LIMIT + defaults.VISIBILITY_MARGIN},
)


def configure_from(config: Any) -> None:
    """Apply the parts of schedules.yaml that Celery itself must know before it connects."""
    from reporter.beat import dispatcher_cron
    from reporter.schedule import period

    d = config.defaults
    app.conf.task_soft_time_limit = d.soft_time_limit
    app.conf.task_time_limit = d.time_limit
    # Redis redelivers an unacknowledged message after visibility_timeout, even to a live worker
    # still waiting for its ETA; it must outlast the longest ETA the dispatcher gives plus a send.
    window = defaults.DISPATCH_WINDOW
    found = dispatcher_cron(config)
    if found is not None:
        from datetime import UTC, datetime

        window = int(max(period(found[0], found[1], datetime.now(UTC)).total_seconds(), 60))
    needed = int(window + d.time_limit)
    chosen = settings.visibility_timeout
    if chosen is not None and chosen <= needed:
        raise ConfigError(
            [
                Problem(
                    "REPORTER_VISIBILITY_TIMEOUT",
                    None,
                    "",
                    f"{chosen}s is too short: the dispatcher enqueues sends up to {window}s ahead (its cron "
                    f"{found[0] if found else 'default'!r}) and a send may run {d.time_limit:g}s (time_limit), so Redis would hand "
                    f"waiting sends to a second worker. Set it above {needed}, or unset it to use {needed + defaults.VISIBILITY_MARGIN}.",
                )
            ]
        )
    app.conf.broker_transport_options = {"visibility_timeout": chosen or needed + defaults.VISIBILITY_MARGIN}


def broker_warnings(broker_url: str) -> list[str]:
    """Redis settings that would silently lose queued sends or the beat lock (checked at start-up)."""
    if not is_redis_url(broker_url):
        return []
    import redis

    out: list[str] = []
    try:
        client = redis.Redis.from_url(redis_client_url(broker_url), socket_connect_timeout=5, socket_timeout=5)
        policy = str(client.config_get("maxmemory-policy").get("maxmemory-policy", "noeviction"))
        if policy != "noeviction":
            out.append(
                f"Redis maxmemory-policy is {policy}: under memory pressure Redis may evict queued sends and the beat "
                "lock. Set maxmemory-policy noeviction."
            )
        persistence = client.config_get("appendonly").get("appendonly") == "yes" or bool(client.config_get("save").get("save"))
        if not persistence:
            out.append(
                "Redis keeps nothing on disk: a Redis restart loses queued sends. The ledger and the sweep re-send them "
                "within minutes, but turn on appendonly for production."
            )
        client.close()
    except redis.RedisError:
        pass  # CONFIG may be disabled (managed Redis); nothing to say then
    return out


def _load_or_exit() -> None:
    from reporter.runtime import runtime

    try:
        configure_from(runtime().config)
    except ConfigError as exc:
        print(f"reporter: invalid configuration, not starting:\n{exc}", file=sys.stderr)
        raise SystemExit(1) from None
    for warning in settings.warnings:
        log.warning("%s", warning)
    for warning in broker_warnings(str(app.conf.broker_url)):
        log.warning("%s", warning)


try:
    # Only the config: `celery inspect` or Flower importing this module must not need the ledger.
    from reporter import config as _config

    configure_from(_config.load(settings.config_path, settings.environ, settings.templates_dir))
except ConfigError:
    pass  # reported, with every problem, when a worker or beat starts (below)


@signals.worker_init.connect
def _worker_init(**_: Any) -> None:
    _load_or_exit()


@signals.beat_init.connect
def _beat_init(**_: Any) -> None:
    _load_or_exit()


@signals.worker_process_init.connect
def _child_init(**_: Any) -> None:
    from reporter.runtime import reset

    # Database engines and Redis connections must not be shared across the fork; the configuration is
    # kept, so a child forked while schedules.yaml holds a broken edit runs the last good version.
    reset(keep_config=True)


_metrics_endpoint: Any = None


@signals.celeryd_after_setup.connect
def _start_metrics(**_: Any) -> None:
    # In the main process, after logging is set up and before the pool forks: every child inherits the folder.
    global _metrics_endpoint
    if settings.metrics_port is not None and _metrics_endpoint is None:
        from reporter.metrics import Endpoint

        _metrics_endpoint = Endpoint.start(settings.metrics_port)


@signals.worker_shutdown.connect
def _stop_metrics(**_: Any) -> None:
    if _metrics_endpoint is not None:
        _metrics_endpoint.close()

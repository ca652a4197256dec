"""The Celery app factory: `create_app(settings)` configures Celery in this one place.

Building the app reads no file, prints nothing and exits nothing, so tests build as many as they like.
The start-up checks (the configuration, the visibility timeout, Redis settings that would lose sends)
run when a worker or beat starts, from signals the factory connects. `reporter.celery_app` is the one
module that builds an app from the environment, for `celery -A reporter.celery_app …`.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from celery import Celery, signals
from kombu.entity import Exchange, Queue

from reporter import defaults
from reporter.config import Config
from reporter.errors import ConfigError, Problem, ReporterError
from reporter.settings import Settings, is_redis_url, redis_client_url

log = logging.getLogger(__name__)


class App(Celery):
    """Celery with the Settings it was built from, and the configuration its start-up checks passed."""

    settings: Settings
    checked: Config | None = None
    """Set once the start-up checks pass (worker_init, or beat's scheduler, whichever comes first)."""
    reporter_handlers: list[Callable[..., None]]
    """The signal receivers create_app connected: signals hold them weakly, so the app keeps them."""


def visibility_timeout(window: float, time_limit: float, chosen: int | None = None) -> int:
    """Redis' visibility_timeout: CHOSEN (REPORTER_VISIBILITY_TIMEOUT) if set, else the longest ETA the
    dispatcher gives (WINDOW) plus a send's hard TIME_LIMIT plus a margin.

    Redis redelivers an unacknowledged message after it, even to a live worker still waiting for its
    ETA; it must outlast the longest wait plus a send."""
    return chosen or int(window + time_limit) + defaults.VISIBILITY_MARGIN


def create_app(settings: Settings) -> App:
    """The Celery app for SETTINGS, its tasks registered (by `include`) and its start-up checks wired to
    its signals. Raises BrokerUnavailable when SETTINGS name no broker (a stale var/broker.url)."""
    app = App("reporter", include=["reporter.tasks"])
    app.settings = settings
    app.conf.update(
        broker_url=settings.broker.require(),  # the same rule as every `reporter` command
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
        task_queues=tuple(Queue(q, Exchange(q, type="direct"), routing_key=q) for q in defaults.QUEUES),
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
        broker_transport_options={
            "visibility_timeout": visibility_timeout(defaults.DISPATCH_WINDOW, defaults.TIME_LIMIT, settings.visibility_timeout)
        },
    )
    _wire_signals(app)
    return app


def app_from_env() -> App:
    """create_app from the environment, or a clear message on stderr and exit 1 (no traceback)."""
    try:
        return create_app(Settings.from_env())
    except ReporterError as exc:
        print(f"reporter: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def configure(app: App, config: Config, now: datetime | None = None) -> None:
    """Apply the parts of schedules.yaml that Celery itself must know before it connects; ConfigError if
    REPORTER_VISIBILITY_TIMEOUT is too short for them."""
    from reporter.beat import dispatcher_cron, longest_eta

    d = config.defaults
    app.conf.task_soft_time_limit = d.soft_time_limit
    app.conf.task_time_limit = d.time_limit
    # A task copies these from the app's configuration when it is bound (Celery's Task.from_config),
    # which `celery worker` does before the start-up checks run: the bound tasks get the YAML's too, or
    # a send published without limits of its own would run under the built-in ones.
    for name in defaults.TASKS:
        task = app.tasks.get(name)
        if task is not None:
            task.soft_time_limit, task.time_limit = d.soft_time_limit, d.time_limit
    window = longest_eta(config, now or datetime.now(UTC))
    needed = int(window + d.time_limit)
    chosen = app.settings.visibility_timeout
    if chosen is not None and chosen <= needed:
        found, derived = dispatcher_cron(config), visibility_timeout(window, d.time_limit)
        raise ConfigError(
            [
                Problem(
                    "REPORTER_VISIBILITY_TIMEOUT",
                    None,
                    "",
                    f"{chosen}s is too short: the dispatcher enqueues sends up to {window}s ahead (its cron "
                    f"{found[0] if found else 'default'!r}) and a send may run {d.time_limit:g}s (time_limit), so Redis would hand "
                    f"waiting sends to a second worker. Set it above {needed}, or unset it to use {derived}.",
                )
            ]
        )
    app.conf.broker_transport_options = {"visibility_timeout": visibility_timeout(window, d.time_limit, chosen)}


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


def start_checks(app: App, load: Callable[[], Config]) -> Config:
    """The start-up checks of a worker or beat, once per app: the configuration LOAD gives, applied to
    APP, or every problem on stderr and exit 1; then warnings about the environment and Redis."""
    if app.checked is not None:
        return app.checked
    try:
        config = load()
        configure(app, config)
    except ConfigError as exc:
        print(f"reporter: invalid configuration, not starting:\n{exc}", file=sys.stderr)
        raise SystemExit(1) from None
    for warning in (*app.settings.warnings, *broker_warnings(str(app.conf.broker_url))):
        log.warning("%s", warning)
    app.checked = config
    return config


def worker_config(app: App) -> Callable[[], Config]:
    """A worker's configuration: its main process builds the Runtime (ledger included), which the pool
    inherits. With the ledger database down, the files alone: the worker still starts with the YAML's
    time limits and visibility timeout (each task builds its Runtime when it runs, and fails for now)."""

    def load() -> Config:
        from reporter.data import db_error
        from reporter.live import load_checked
        from reporter.runtime import runtime
        from reporter.settings import mask_url

        url = app.settings.database_url
        try:
            return runtime().config
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever the driver raises, the worker must not start without the YAML's settings
            log.error("the ledger database (%s) does not answer: %s; sends fail until it does", mask_url(url), db_error(exc, url))
            return load_checked(app.settings)

    return load


def beat_config(app: App) -> Callable[[], Config]:
    """Beat's configuration: the files only, so beat starts while the ledger database is down."""
    from reporter.live import load_checked

    return lambda: load_checked(app.settings)


def _wire_signals(app: App) -> None:
    """Connect APP's start-up checks and metrics endpoint to Celery's signals (for this app's processes only)."""
    metrics: list[Any] = []

    def worker_init(sender: Any = None, instance: Any = None, **_: Any) -> None:
        # celeryd_init (instance=): before the worker reads its default time limits from the app, so the
        # YAML's apply to every task; worker_init (sender=): for workers started without `celery worker`.
        if getattr(instance or sender, "app", None) is app:
            start_checks(app, worker_config(app))

    def beat_init(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is app:
            start_checks(app, beat_config(app))

    def child_init(**_: Any) -> None:
        from reporter.runtime import reset

        # Database engines and Redis connections must not be shared across the fork; the configuration is
        # kept, so a child forked while schedules.yaml holds a broken edit runs the last good version.
        reset(keep_config=True)
        count_memory_from_here()

    def start_metrics(instance: Any = None, **_: Any) -> None:
        # In the main process, after logging is set up and before the pool forks: every child inherits the folder.
        port = app.settings.metrics_port
        if getattr(instance, "app", None) is app and port is not None and not metrics:
            from reporter.metrics import Endpoint

            metrics.append(Endpoint.start(port))

    def stop_metrics(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is app:
            for endpoint in metrics:
                if endpoint is not None:
                    endpoint.close()
            metrics.clear()

    handlers = (
        (signals.celeryd_init, worker_init),
        (signals.worker_init, worker_init),
        (signals.beat_init, beat_init),
        (signals.worker_process_init, child_init),
        (signals.celeryd_after_setup, start_metrics),
        (signals.worker_shutdown, stop_metrics),
    )
    for signal, handler in handlers:
        signal.connect(handler, weak=True)
    # Signals hold their receivers weakly: the app keeps them alive exactly as long as itself.
    app.reporter_handlers = [h for _, h in handlers]


def resident_kib() -> int | None:
    """This process's resident memory now, in KiB (None where /proc is not there to tell)."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE") // 1024


def count_memory_from_here() -> None:
    """In a pool process just forked: make `--max-memory-per-child` count what this process has grown
    since now, not its peak resident memory.

    Celery (billiard) compares the limit with getrusage's ru_maxrss, the peak, which on Linux a forked
    child inherits from its parent: a worker whose main process holds a large configuration (and
    WeasyPrint, fonts and charts) would replace every child after every task. What the limit is for is
    a child that keeps growing, so it is measured against the child's own start, with the resident
    memory now rather than the peak (a big PDF's memory freed again is not growth).
    """
    start = resident_kib()
    if start is None:
        return  # Celery's own measure stays
    import billiard.pool

    def grown_kib() -> int:
        now = resident_kib()
        return max((now or start) - start, 1)  # billiard takes 0 or less as "cannot tell"

    billiard.pool.mem_rss = grown_kib  # looked up by name in billiard's worker loop after every task


def worker_command(
    concurrency: int,
    name: str | None = None,
    max_tasks_per_child: int = defaults.WORKER_MAX_TASKS_PER_CHILD,
    max_memory_per_child: int = defaults.WORKER_MAX_MEMORY_PER_CHILD,
    extra: Sequence[str] = (),
) -> list[str]:
    """The command line of a worker on every queue (urgent first): `reporter worker`, `reporter run` and the tests."""
    return [
        *celery_command("worker"),
        "-Q",
        ",".join(defaults.QUEUES),
        "-c",
        str(concurrency),
        *(["-n", name] if name else []),
        f"--max-tasks-per-child={max_tasks_per_child}",
        f"--max-memory-per-child={max_memory_per_child}",
        "--loglevel",
        "INFO",
        *extra,
    ]


def beat_command(extra: Sequence[str] = ()) -> list[str]:
    """The command line of beat: `reporter beat`, `reporter run` and the tests."""
    return [*celery_command("beat"), "--loglevel", "INFO", *extra]


def celery_command(*args: str) -> list[str]:
    """`python -m celery -A reporter.celery_app ARGS…` with this interpreter."""
    return [sys.executable, "-m", "celery", "-A", "reporter.celery_app", *args]

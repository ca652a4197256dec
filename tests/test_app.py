"""The app factory and the tasks' policies, in-process and without a broker: importing reporter.tasks does
nothing, create_app only builds, and each policy is a plain function with a table."""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from reporter import config as config_mod
from reporter import defaults
from reporter.app import App, beat_command, configure, create_app, visibility_timeout, worker_command
from reporter.beat import CronSchedule, builtin_entries, dispatch_window, fired_window, longest_eta
from reporter.errors import BrokerUnavailable, ConfigError
from reporter.ledger import Stuck
from reporter.settings import Broker, Settings
from reporter.tasks import backoff, busy_recheck, give_up, out_of_retries, same_queue
from tests.conftest import ROOT, Project

SLOT = datetime(2026, 11, 23, 7, 0, tzinfo=UTC)


def settings(**env: str) -> Settings:
    return Settings.from_env({"REPORTER_BROKER_URL": "redis://127.0.0.1:1/0", **env})


def app_for(**env: str) -> App:
    return create_app(settings(**env))


REPORT = """reports:
  r:
    schedule: "0 7 * * *"
    subject: s
    template: t.html
    function: examples.signups:rows
    recipients: [a@example.com]
"""


def config_with(dispatch_cron: str | None, time_limit: int = 30) -> config_mod.Config:
    beat = f'beat:\n  d:\n    task: email_reports.schedule_hourly\n    cron: "{dispatch_cron}"\n' if dispatch_cron else ""
    text = f"timezone: UTC\ndefaults:\n  soft_time_limit: {time_limit - 10}\n  time_limit: {time_limit}\n{beat}{REPORT}"
    return config_mod.parse(text, "schedules.yaml", {}, Path("templates"), {"t.html": "<p>{{ rows }}</p>"})


# ----------------------------------------------------------------------------- import and factory


def test_importing_every_module_but_celery_app_reads_no_environment_file_and_prints_nothing(tmp_path: Path) -> None:
    # An environment that cannot be read and no schedules.yaml: importing must still succeed, silently.
    code = (
        "import pkgutil, importlib, reporter\n"
        "for m in pkgutil.iter_modules(reporter.__path__):\n"
        "    if m.name not in ('celery_app', '__main__'):\n"
        "        importlib.import_module('reporter.' + m.name)\n"
        "from reporter.tasks import send, sweep\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "REPORTER_METRICS_PORT": "not a port", "REPORTER_CONFIG": "missing.yaml"}
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert not (tmp_path / "var").exists()


def test_celery_app_alone_reads_the_environment_and_exits_1_with_the_reason(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "REPORTER_METRICS_PORT": "not a port"}
    done = subprocess.run(
        [sys.executable, "-c", "import reporter.celery_app"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1
    assert done.stderr.startswith("reporter: REPORTER_METRICS_PORT: not a port number") and "Traceback" not in done.stderr


def test_create_app_registers_every_task_and_the_beat_tasks_config_allows_are_the_registered_ones() -> None:
    app = app_for()
    app.loader.import_default_modules()
    registered = {name for name in app.tasks if name.startswith("email_reports.")}
    assert registered == {defaults.TASK_DISPATCH, defaults.TASK_SEND, defaults.TASK_PRUNE, defaults.TASK_SWEEP}
    assert set(config_mod.KNOWN_TASKS) == registered - {defaults.TASK_SEND}


def test_the_sweep_runs_every_minute_on_the_minute_unless_its_interval_is_set() -> None:
    default = builtin_entries(config_with("0 * * * *"))[defaults.TASK_SWEEP]
    assert default["schedule"] == CronSchedule("* * * * *", ZoneInfo("UTC"))
    assert default["options"]["expires"] == 55
    every5 = builtin_entries(config_with("0 * * * *"), sweep_interval=5)[defaults.TASK_SWEEP]
    assert every5["schedule"].run_every == timedelta(seconds=5)
    assert 0 < every5["options"]["expires"] < 5


def test_create_app_takes_the_broker_and_visibility_timeout_from_its_settings_only() -> None:
    app = app_for(REPORTER_VISIBILITY_TIMEOUT="7200")
    assert app.conf.broker_url == "redis://127.0.0.1:1/0"
    assert app.conf.broker_transport_options == {"visibility_timeout": 7200}
    assert app_for().conf.broker_transport_options == {"visibility_timeout": defaults.DISPATCH_WINDOW + defaults.TIME_LIMIT + 600}
    assert [q.name for q in app.conf.task_queues] == list(defaults.QUEUES)


def test_create_app_refuses_settings_without_a_broker() -> None:
    stale = Settings.from_env({"REPORTER_BROKER_URL": "redis://x/0"})
    stale = Settings(**{**stale.__dict__, "broker": Broker(None, "stale", 4242)})
    with pytest.raises(BrokerUnavailable, match=r"pid 4242"):
        create_app(stale)


@pytest.mark.parametrize(
    ("dispatch_cron", "time_limit", "chosen", "expected"),
    [
        ("1 * * * *", 30, None, 3600 + 30 + 600),  # an hourly dispatcher enqueues an hour ahead
        ("* * * * *", 120, None, 60 + 120 + 600),
        ("*/15 * * * *", 30, 7200, 7200),  # chosen, and long enough
        (None, 30, None, defaults.DISPATCH_WINDOW + 30 + 600),  # no dispatcher entry: the hand-called window
    ],
)
def test_configure_derives_the_visibility_timeout_from_the_dispatch_window(
    dispatch_cron: str | None, time_limit: int, chosen: int | None, expected: int
) -> None:
    app = app_for(**({"REPORTER_VISIBILITY_TIMEOUT": str(chosen)} if chosen else {}))
    configure(app, config_with(dispatch_cron, time_limit), now=SLOT)
    assert app.conf.broker_transport_options == {"visibility_timeout": expected}
    assert (app.conf.task_soft_time_limit, app.conf.task_time_limit) == (time_limit - 10, time_limit)


def test_tasks_bound_before_the_start_up_checks_get_the_yamls_time_limits() -> None:
    """`celery worker` binds the tasks (copying the app's time limits) before worker start-up applies schedules.yaml."""
    app = app_for()
    assert app.tasks[defaults.TASK_SEND].soft_time_limit == defaults.SOFT_TIME_LIMIT  # bound with the built-in ones
    configure(app, config_with(None, time_limit=16), now=SLOT)
    assert [(app.tasks[name].soft_time_limit, app.tasks[name].time_limit) for name in defaults.TASKS] == [(6, 16)] * 4


def test_a_worker_whose_ledger_does_not_answer_still_starts_with_the_yamls_settings(
    make_project: Callable[..., Project], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from reporter import runtime
    from reporter.app import start_checks, worker_config
    from reporter.runner import free_port

    project = make_project()  # soft_time_limit 20, time_limit 30
    dead = f"postgresql+psycopg://reporter:s3cret@127.0.0.1:{free_port()}/ledger"
    for name, value in project.env(REPORTER_BROKER_URL="redis://127.0.0.1:1/0", REPORTER_DATABASE_URL=dead).items():
        if name.startswith("REPORTER_"):
            monkeypatch.setenv(name, value)
    runtime.reset()
    app = create_app(Settings.from_env())
    try:
        config = start_checks(app, worker_config(app))
    finally:
        runtime.reset()
    assert config.defaults.time_limit == 30
    assert (app.conf.task_soft_time_limit, app.conf.task_time_limit) == (20, 30)
    assert (app.tasks[defaults.TASK_SEND].soft_time_limit, app.tasks[defaults.TASK_SEND].time_limit) == (20, 30)
    said = [r.getMessage() for r in caplog.records if "does not answer" in r.getMessage()]
    assert len(said) == 1 and "s3cret" not in said[0], said


def test_configure_refuses_a_visibility_timeout_the_window_outlasts() -> None:
    app = app_for(REPORTER_VISIBILITY_TIMEOUT="600")
    with pytest.raises(ConfigError, match=r"600s is too short: .* up to 3600s ahead .* Set it above 3630, or unset it to use 4230"):
        configure(app, config_with("1 * * * *"), now=SLOT)
    assert visibility_timeout(3600, 30) == 4230


def test_one_worker_command_line_for_the_cli_run_and_the_tests() -> None:
    cmd = worker_command(3, name="w@%h", extra=["--without-gossip"])
    assert cmd[:6] == [sys.executable, "-m", "celery", "-A", "reporter.celery_app", "worker"]
    assert cmd[cmd.index("-Q") + 1] == "reporter.urgent,reporter.scheduled"
    assert cmd[cmd.index("-c") + 1] == "3" and cmd[cmd.index("-n") + 1] == "w@%h" and cmd[-1] == "--without-gossip"
    assert "-n" not in worker_command(1)
    assert beat_command(["-s", "x"])[5:] == ["beat", "--loglevel", "INFO", "-s", "x"]


# ----------------------------------------------------------------------------- policies


def stuck(attempts: int, dead: bool, recipient: str = "a@example.com") -> Stuck:
    return Stuck("r", SLOT, recipient, attempts, dead)


@pytest.mark.parametrize(
    ("rows", "retries", "failed", "again"),
    [
        ([stuck(1, True)], 3, [], ["a@example.com"]),  # killed once: try again
        ([stuck(3, True)], 3, [], ["a@example.com"]),  # three attempts of four allowed
        ([stuck(4, True)], 3, ["a@example.com"], []),  # the fourth (retries + 1) ended without a result: give up
        ([stuck(9, True)], 3, ["a@example.com"], []),
        ([stuck(1, True)], 0, ["a@example.com"], []),  # no retries: the first lost attempt is the last
        ([stuck(9, False)], 3, [], ["a@example.com"]),  # queued, its task lost: never given up, re-enqueued
        ([stuck(0, False)], 0, [], ["a@example.com"]),
        ([stuck(4, True, "a@x.org"), stuck(1, True, "b@x.org"), stuck(5, False, "c@x.org")], 3, ["a@x.org"], ["b@x.org", "c@x.org"]),
        ([], 3, [], []),
    ],
)
def test_the_sweep_gives_up_on_rows_whose_attempts_all_died(rows: list[Stuck], retries: int, failed: list[str], again: list[str]) -> None:
    spent, retry = give_up(rows, retries)
    assert ([r.recipient for r in spent], [r.recipient for r in retry]) == (failed, again)


@pytest.mark.parametrize(
    ("busy", "until", "expected"),
    [
        (["a@x.org"], SLOT + timedelta(seconds=90), 90.0),  # look again once the other claim goes stale
        (["a@x.org"], SLOT + timedelta(seconds=0.2), 1.0),  # at least a second
        (["a@x.org"], SLOT - timedelta(minutes=5), 1.0),  # already stale
        (["a@x.org"], None, None),  # no claim deadline known: nothing to schedule
        ([], SLOT + timedelta(seconds=90), None),  # nobody else busy
    ],
)
def test_a_send_that_finds_rows_busy_re_checks_them_after_the_claim_expires(
    busy: list[str], until: datetime | None, expected: float | None
) -> None:
    assert busy_recheck(busy, until, SLOT) == expected


@pytest.mark.parametrize(
    ("info", "queue"),
    [({"routing_key": "reporter.urgent"}, "reporter.urgent"), ({"routing_key": None}, "reporter.scheduled"), (None, "reporter.scheduled")],
)
def test_the_busy_re_check_stays_on_the_queue_the_send_came_from(info: dict[str, str | None] | None, queue: str) -> None:
    assert same_queue(info) == queue


@pytest.mark.parametrize(("retries", "allowed", "out"), [(0, 0, True), (0, 3, False), (2, 3, False), (3, 3, True), (4, 3, True)])
def test_a_send_is_out_of_retries_once_it_retried_max_retries_times(retries: int, allowed: int, out: bool) -> None:
    assert out_of_retries(retries, allowed) is out


@pytest.mark.parametrize(
    ("retries", "low", "high"),
    [(0, 5, 10), (1, 10, 20), (2, 20, 40), (5, 160, 320), (6, 300, 600), (30, 300, 600)],  # base 10 s, capped at 600 s
)
def test_backoff_doubles_with_equal_jitter_and_is_capped(retries: int, low: float, high: float) -> None:
    rand = random.Random(retries)
    delays = [backoff(retries, rand=rand) for _ in range(200)]
    assert all(low <= d <= high for d in delays)
    assert max(delays) - min(delays) > (high - low) / 2  # jittered, not a constant


@pytest.mark.parametrize(
    ("cron", "start", "end"),
    [
        ("1 * * * *", datetime(2026, 11, 23, 7, 1, tzinfo=UTC), datetime(2026, 11, 23, 8, 1, tzinfo=UTC)),
        ("1 * * * *", datetime(2026, 11, 23, 7, 30, tzinfo=UTC), datetime(2026, 11, 23, 8, 1, tzinfo=UTC)),  # by hand, mid-hour
        ("* * * * *", datetime(2026, 11, 23, 7, 0, tzinfo=UTC), datetime(2026, 11, 23, 7, 1, tzinfo=UTC)),
        ("*/15 * * * *", datetime(2026, 11, 23, 7, 5, 30, tzinfo=UTC), datetime(2026, 11, 23, 7, 15, tzinfo=UTC)),
        (None, datetime(2026, 11, 23, 7, 5, tzinfo=UTC), datetime(2026, 11, 23, 8, 5, tzinfo=UTC)),  # no entry: DISPATCH_WINDOW
    ],
)
def test_the_dispatcher_covers_from_its_start_to_its_next_fire(cron: str | None, start: datetime, end: datetime) -> None:
    assert dispatch_window(config_with(cron), start) == (start, end)


def test_a_late_beat_dispatch_covers_the_window_of_the_instant_it_was_due() -> None:
    # Beat sends the 07:01 dispatch at 07:03 (it was busy or down): the window still starts at 07:01.
    late = datetime(2026, 11, 23, 7, 3, 12, tzinfo=UTC)
    assert fired_window("1 * * * *", ZoneInfo("UTC"), late) == (
        datetime(2026, 11, 23, 7, 1, tzinfo=UTC),
        datetime(2026, 11, 23, 8, 1, tzinfo=UTC),
    )


@pytest.mark.parametrize(
    ("cron", "seconds"), [("1 * * * *", 3600), ("* * * * *", 60), ("*/5 * * * *", 300), (None, defaults.DISPATCH_WINDOW)]
)
def test_the_longest_eta_is_the_dispatch_window(cron: str | None, seconds: int) -> None:
    assert longest_eta(config_with(cron), SLOT) == seconds

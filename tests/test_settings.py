"""The environment, parsed strictly in one place: every variable's good and bad values, and the broker rule."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from reporter import defaults, runstate
from reporter.errors import BrokerUnavailable, ConfigError
from reporter.settings import OPTIONS, Broker, Settings, resolve_broker
from tests.conftest import ROOT, Project

PORT_FIX = "REPORTER_METRICS_PORT: not a port number: write a whole number from 1 to 65535, such as REPORTER_METRICS_PORT=9808 "


def parsed(**env: str) -> Settings:
    return Settings.from_env(env)


def problems(**env: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    return [str(p) for p in caught.value.problems]


@pytest.mark.parametrize(
    ("name", "raw", "field", "expected"),
    [
        ("REPORTER_CONFIG", "conf/schedules.yaml", "config_path", Path("conf/schedules.yaml")),
        ("REPORTER_TEMPLATES", "/srv/tpl", "templates_dir", Path("/srv/tpl")),
        ("REPORTER_BROKER_URL", "redis://redis:6379/1", "broker_url", "redis://redis:6379/1"),
        ("REPORTER_BROKER_URL", "rediss://u:pw@redis:6380/0", "broker_url", "rediss://u:pw@redis:6380/0"),
        ("REPORTER_BROKER_URL", "amqp://guest:guest@rabbit:5672//", "broker_url", "amqp://guest:guest@rabbit:5672//"),
        ("REPORTER_BROKER_URL", "redis+socket:///run/redis.sock", "broker_url", "redis+socket:///run/redis.sock"),
        ("REPORTER_DATABASE_URL", "postgresql+psycopg://u:pw@db/reporter", "database_url", "postgresql+psycopg://u:pw@db/reporter"),
        ("REPORTER_DATABASE_URL", "sqlite:////tmp/ledger.db", "database_url", "sqlite:////tmp/ledger.db"),
        (
            "REPORTER_SMTP_URL",
            "smtp://bot:pw@mail.example.com:587?starttls=true",
            "smtp_url",
            "smtp://bot:pw@mail.example.com:587?starttls=true",
        ),
        ("REPORTER_SMTP_URL", "smtps://mail.example.com", "smtp_url", "smtps://mail.example.com"),
        ("REPORTER_OUTBOX", "/var/mail/out", "outbox", Path("/var/mail/out")),
        ("REPORTER_METRICS_PORT", "9808", "metrics_port", 9808),
        ("REPORTER_METRICS_PORT", "1", "metrics_port", 1),
        ("REPORTER_METRICS_PORT", "65535", "metrics_port", 65535),
        ("REPORTER_LOG_FORMAT", "json", "log_json", True),
        ("REPORTER_LOG_FORMAT", "JSON", "log_json", True),
        ("REPORTER_LOG_FORMAT", "text", "log_json", False),
        ("REPORTER_VISIBILITY_TIMEOUT", "7200", "visibility_timeout", 7200),
        ("REPORTER_RELOAD_INTERVAL", "30", "reload_interval", 30),
        ("REPORTER_SWEEP_INTERVAL", "5", "sweep_interval", 5),
        ("REPORTER_SWEEP_GRACE", "20", "sweep_grace", 20),
        ("REPORTER_CLAIM_MARGIN", "2", "claim_margin", 2),
        ("FLOWER_PORT", "5556", "flower_port", 5556),
    ],
)
def test_good_values_are_read(name: str, raw: str, field: str, expected: object) -> None:
    assert getattr(parsed(**{name: raw}), field) == expected


def test_unset_variables_give_the_declared_defaults() -> None:
    s = parsed()
    assert (s.config_path, s.templates_dir, s.database_url, s.smtp_url, s.outbox) == (
        Path(defaults.CONFIG_PATH),
        Path(defaults.TEMPLATES_DIRNAME),
        defaults.DATABASE_URL,
        None,
        Path(defaults.OUTBOX),
    )
    assert (s.metrics_port, s.log_format, s.visibility_timeout, s.flower_port, s.warnings) == (None, "text", None, 5555, ())


@pytest.mark.parametrize(
    ("name", "raw", "message"),
    [
        ("REPORTER_METRICS_PORT", "9808 ", "REPORTER_METRICS_PORT: has spaces around it: write REPORTER_METRICS_PORT=9808 (got '9808 ')"),
        (
            "REPORTER_METRICS_PORT",
            "nine",
            PORT_FIX + "(got 'nine')",
        ),
        (
            "REPORTER_METRICS_PORT",
            "-1",
            PORT_FIX + "(got '-1')",
        ),
        (
            "REPORTER_METRICS_PORT",
            "70000",
            PORT_FIX + "(got '70000')",
        ),
        (
            "REPORTER_METRICS_PORT",
            "0",
            PORT_FIX + "(got '0')",
        ),
        (
            "FLOWER_PORT",
            "5555x",
            "FLOWER_PORT: not a port number: write a whole number from 1 to 65535, such as FLOWER_PORT=5555 (got '5555x')",
        ),
        (
            "REPORTER_LOG_FORMAT",
            "jsn",
            "REPORTER_LOG_FORMAT: not one of text, json: write REPORTER_LOG_FORMAT=text or REPORTER_LOG_FORMAT=json "
            "(did you mean json?) (got 'jsn')",
        ),
        (
            "REPORTER_LOG_FORMAT",
            "yaml",
            "REPORTER_LOG_FORMAT: not one of text, json: write REPORTER_LOG_FORMAT=text or REPORTER_LOG_FORMAT=json (got 'yaml')",
        ),
        (
            "REPORTER_VISIBILITY_TIMEOUT",
            "7200.0",
            "REPORTER_VISIBILITY_TIMEOUT: not a whole number of seconds: write REPORTER_VISIBILITY_TIMEOUT=7200 (got '7200.0')",
        ),
        (
            "REPORTER_VISIBILITY_TIMEOUT",
            "-600",
            "REPORTER_VISIBILITY_TIMEOUT: not a whole number of seconds: write a whole number above 0, "
            "such as REPORTER_VISIBILITY_TIMEOUT=7200 (got '-600')",
        ),
        (
            "REPORTER_VISIBILITY_TIMEOUT",
            "2h",
            "REPORTER_VISIBILITY_TIMEOUT: not a whole number of seconds: write a whole number above 0, "
            "such as REPORTER_VISIBILITY_TIMEOUT=7200 (got '2h')",
        ),
        (
            "REPORTER_RELOAD_INTERVAL",
            "0.5",
            "REPORTER_RELOAD_INTERVAL: not a whole number of seconds: write a whole number above 0, "
            "such as REPORTER_RELOAD_INTERVAL=5 (got '0.5')",
        ),
        (
            "REPORTER_VISIBILITY_TIMEOUT",
            "0",
            "REPORTER_VISIBILITY_TIMEOUT: must be above 0: write a whole number of seconds above 0, "
            "or unset REPORTER_VISIBILITY_TIMEOUT to use the default (got '0')",
        ),
        (
            "REPORTER_BROKER_URL",
            "http://bot:s3cret@redis:6379",
            "REPORTER_BROKER_URL: must start with redis://, rediss://, redis+socket://, amqp://, amqps:// or pyamqp://: "
            "write for example REPORTER_BROKER_URL=redis://127.0.0.1:6379/0 (got 'http://bot:***@redis:6379')",
        ),
        (
            "REPORTER_BROKER_URL",
            "127.0.0.1:6379",
            "REPORTER_BROKER_URL: must start with redis://, rediss://, redis+socket://, amqp://, amqps:// or pyamqp://: "
            "write for example REPORTER_BROKER_URL=redis://127.0.0.1:6379/0 (got '127.0.0.1:6379')",
        ),
        (
            "REPORTER_BROKER_URL",
            "redis://",
            "REPORTER_BROKER_URL: names nothing after the scheme: write for example REPORTER_BROKER_URL=redis://127.0.0.1:6379/0 "
            "(got 'redis://')",
        ),
        (
            "REPORTER_DATABASE_URL",
            "reporter.db",
            "REPORTER_DATABASE_URL: not a SQLAlchemy URL: write for example "
            "REPORTER_DATABASE_URL=postgresql+psycopg://user:password@host/reporter or sqlite:///var/reporter.db (got 'reporter.db')",
        ),
        (
            "REPORTER_DATABASE_URL",
            " sqlite:///x.db",
            "REPORTER_DATABASE_URL: has spaces around it: write REPORTER_DATABASE_URL=sqlite:///x.db (got ' sqlite:///x.db')",
        ),
        (
            "REPORTER_SMTP_URL",
            "smtp//bot:pw-s3cret@mail.example.com",
            "REPORTER_SMTP_URL: must start with smtp:// or smtps:// (got smtp//bot:***@mail.example.com)",
        ),
        (
            "REPORTER_SMTP_URL",
            "http://bot:pw-s3cret@mail.example.com",
            "REPORTER_SMTP_URL: must start with smtp:// or smtps:// (got http://bot:***@mail.example.com)",
        ),
        (
            "REPORTER_CONFIG",
            "schedules.yaml ",
            "REPORTER_CONFIG: has spaces around it: write REPORTER_CONFIG=schedules.yaml (got 'schedules.yaml ')",
        ),
        ("REPORTER_OUTBOX", "out\0box", "REPORTER_OUTBOX: contains a NUL character: write the value without it (got 'out\\x00box')"),
    ],
)
def test_a_malformed_value_is_refused_with_the_variable_the_value_and_what_to_write(name: str, raw: str, message: str) -> None:
    found = problems(**{name: raw})
    assert found == [message]
    assert "s3cret" not in message


def test_every_malformed_variable_is_named_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"REPORTER_METRICS_PORT": "9808 ", "REPORTER_LOG_FORMAT": "jsn", "REPORTER_VISIBILITY_TIMEOUT": "7200.0"})
    assert str(caught.value).splitlines() == [
        "3 problems in the environment:",
        "  REPORTER_METRICS_PORT: has spaces around it: write REPORTER_METRICS_PORT=9808 (got '9808 ')",
        "  REPORTER_LOG_FORMAT: not one of text, json: write REPORTER_LOG_FORMAT=text or REPORTER_LOG_FORMAT=json "
        "(did you mean json?) (got 'jsn')",
        "  REPORTER_VISIBILITY_TIMEOUT: not a whole number of seconds: write REPORTER_VISIBILITY_TIMEOUT=7200 (got '7200.0')",
    ]


def test_a_value_from_a_file_is_parsed_as_strictly(tmp_path: Path) -> None:
    (tmp_path / "port").write_text("9809\n")  # a secrets file's final newline is not part of the value
    (tmp_path / "bad").write_text("98 09\n")
    assert parsed(REPORTER_METRICS_PORT_FILE=str(tmp_path / "port")).metrics_port == 9809
    assert problems(REPORTER_METRICS_PORT_FILE=str(tmp_path / "bad")) == [
        "REPORTER_METRICS_PORT: not a port number: write a whole number from 1 to 65535, such as REPORTER_METRICS_PORT=9808 (got '98 09')"
    ]


@pytest.mark.parametrize(
    ("name", "warning"),
    [
        ("REPORTER_METRIC_PORT", "REPORTER_METRIC_PORT is not a reporter setting and is ignored; did you mean REPORTER_METRICS_PORT?"),
        ("REPORTER_SMTP_URI", "REPORTER_SMTP_URI is not a reporter setting and is ignored; did you mean REPORTER_SMTP_URL?"),
        ("REPORTER_SMTP_UR_FILE", "REPORTER_SMTP_UR_FILE is not a reporter setting and is ignored; did you mean REPORTER_SMTP_URL_FILE?"),
        ("REPORTER_COLOUR", "REPORTER_COLOUR is not a reporter setting and is ignored"),
    ],
)
def test_an_unknown_reporter_variable_is_a_warning_with_a_did_you_mean(name: str, warning: str) -> None:
    assert parsed(**{name: "1"}).warnings == (warning,)


def test_known_names_and_the_test_suites_own_give_no_warning() -> None:
    env = {o.name: "" for o in OPTIONS} | {f"{o.name}_FILE": "" for o in OPTIONS} | {"REPORTER_TEST_PG_URL": "x"}
    assert parsed(**env).warnings == ()


def test_templates_follow_config_unless_reporter_templates_is_set() -> None:
    assert parsed().with_config(Path("/etc/r/schedules.yaml")).templates_dir == Path("/etc/r/templates")
    chosen = parsed(REPORTER_TEMPLATES="/srv/tpl").with_config(Path("/etc/r/schedules.yaml"))
    assert (chosen.config_path, chosen.templates_dir) == (Path("/etc/r/schedules.yaml"), Path("/srv/tpl"))


# ----------------------------------------------------------------------------- the broker rule


def test_the_broker_rule_environment_then_live_run_then_default(tmp_path: Path) -> None:
    var = tmp_path / "var"
    assert resolve_broker(None, var) == Broker(defaults.BROKER_URL, "default")
    assert resolve_broker("redis://elsewhere:6379/0", var) == Broker("redis://elsewhere:6379/0", "env")
    lock = runstate.RunLock(var)
    lock.acquire()
    try:
        runstate.write_marker(var, "redis://127.0.0.1:41234/0")
        assert resolve_broker(None, var) == Broker("redis://127.0.0.1:41234/0", "run", os.getpid())
        assert resolve_broker("redis://elsewhere:6379/0", var).origin == "env"  # the environment wins
    finally:
        lock.release()
    # The marker is left, its run gone: stale, never a broker to blame.
    assert resolve_broker(None, var) == Broker(None, "stale", None)


def test_a_stale_marker_names_the_dead_run_and_says_what_to_do(tmp_path: Path) -> None:
    var = tmp_path / "var"
    var.mkdir()
    (var / runstate.LOCK_NAME).write_text("4242\n")  # what a SIGKILLed run leaves: its PID, unlocked
    runstate.write_marker(var, "redis://127.0.0.1:41234/0")
    broker = resolve_broker(None, var)
    assert broker == Broker(None, "stale", 4242)
    assert not broker.shared
    with pytest.raises(BrokerUnavailable) as caught:
        broker.require()
    assert str(caught.value) == (
        "no `reporter run` is running in this folder: the one (pid 4242) that wrote var/broker.url has stopped. "
        "Start `reporter run` again, set REPORTER_BROKER_URL, or delete that file to use the default broker redis://127.0.0.1:6379/0"
    )


@pytest.mark.parametrize(
    ("broker", "message"),
    [
        (
            Broker("redis://u:pw@r:6379/0", "env"),
            "cannot reach the broker at redis://u:***@r:6379/0 (refused); check that it is running and that REPORTER_BROKER_URL is right",
        ),
        (
            Broker("redis://127.0.0.1:40000/0", "run", 77),
            "cannot reach the broker at redis://127.0.0.1:40000/0 (refused); the `reporter run` here (pid 77) is up but its Redis "
            "does not answer; see var/redis.log",
        ),
        (
            Broker(defaults.BROKER_URL, "default"),
            "cannot reach the broker at redis://127.0.0.1:6379/0 (refused); no `reporter run` is running here and "
            "REPORTER_BROKER_URL is not set: start `reporter run` in another terminal, or set REPORTER_BROKER_URL to your broker",
        ),
    ],
)
def test_an_unreachable_broker_says_which_where_it_came_from_and_what_to_do(broker: Broker, message: str) -> None:
    assert broker.unreachable("refused") == message


@pytest.mark.parametrize(("origin", "shared"), [("env", True), ("run", True), ("default", False), ("stale", False)])
def test_send_sync_shares_the_rate_limit_only_on_a_broker_workers_are_known_to_use(origin: str, shared: bool) -> None:
    assert Broker("redis://x/0", origin).shared is shared


# ----------------------------------------------------------------------------- every entry point


@pytest.mark.integration
@pytest.mark.slow
def test_a_bad_variable_stops_validate_run_and_a_celery_worker_with_exit_1_and_no_traceback(make_project: Callable[..., Project]) -> None:
    project = make_project()
    env = project.env(REPORTER_METRICS_PORT="9808 ", REPORTER_BROKER_URL="http://bot:pw-s3cret@redis:6379")
    commands = {
        "validate": [sys.executable, "-m", "reporter", "validate"],
        "run": [sys.executable, "-m", "reporter", "run"],
        "worker": [sys.executable, "-m", "celery", "-A", "reporter.celery_app", "worker"],
        "beat": [sys.executable, "-m", "celery", "-A", "reporter.celery_app", "beat"],
    }
    for what, cmd in commands.items():
        done = subprocess.run(cmd, env=env, cwd=project.root if what == "run" else ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 1, (what, done.stderr[-2000:])
        assert "REPORTER_METRICS_PORT: has spaces around it: write REPORTER_METRICS_PORT=9808 (got '9808 ')" in done.stderr, what
        assert "REPORTER_BROKER_URL: must start with redis://" in done.stderr and "(got 'http://bot:***@redis:6379')" in done.stderr
        assert "Traceback" not in done.stderr and "pw-s3cret" not in done.stderr, what
    assert not (project.root / "var" / runstate.MARKER_NAME).exists()  # `run` started nothing


@pytest.mark.integration
@pytest.mark.slow
def test_an_unknown_variable_is_a_warning_and_the_command_still_runs(make_project: Callable[..., Project]) -> None:
    project = make_project()
    done = subprocess.run(
        [sys.executable, "-m", "reporter", "validate"],
        env=project.env(REPORTER_METRIC_PORT="9808"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("OK: 1 reports")
    assert done.stderr == (
        "reporter: warning: REPORTER_METRIC_PORT is not a reporter setting and is ignored; did you mean REPORTER_METRICS_PORT?\n"
    )


@pytest.mark.integration
@pytest.mark.slow
def test_a_broker_that_does_not_answer_is_named_with_what_to_do_by_status_health_and_send(make_project: Callable[..., Project]) -> None:
    from reporter.runner import free_port

    project = make_project()
    port = free_port()
    env = project.env(REPORTER_BROKER_URL=f"redis://bot:pw-s3cret@127.0.0.1:{port}/0")
    advice = "check that it is running and that REPORTER_BROKER_URL is right"
    for args in (["status"], ["health", "beat"], ["health", "worker", "--timeout", "1"], ["send", "regional", "--wait", "1"]):
        done = subprocess.run(
            [sys.executable, "-m", "reporter", *args], env=env, cwd=project.root, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 1, (args, done.stdout, done.stderr)
        assert f"redis://bot:***@127.0.0.1:{port}/0" in done.stderr, (args, done.stderr)
        assert advice in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr and "pw-s3cret" not in done.stderr, args

"""The CLI as a user runs it: `python -m reporter …` subprocesses, real files, a real SMTP inbox."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pypdf import PdfReader

from reporter.settings import mask_url
from tests.conftest import ROOT, Inbox, Project, run_cli, wait_until

pytestmark = pytest.mark.slow


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPORTER_")}
    env.update(extra)
    return env


def assert_clean_failure(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr + done.stdout


# ----------------------------------------------------------------------------- validate


def test_validate_shipped_config(shipped_copy: Path) -> None:
    done = run_cli("validate", env=clean_env(), cwd=shipped_copy)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("OK: 4 reports, 2 beat entries")


def test_validate_reports_every_problem_with_its_line(shipped_copy: Path) -> None:
    text = (shipped_copy / "schedules.yaml").read_text()
    # sales-daily's only (sales-by-region, further down, has the same schedule and zone).
    text = text.replace('schedule: "0 7 * * 1-5"', 'schedule: "0 7 * * 1-8"', 1)
    text = text.replace("timezone: Europe/Berlin", "timezone: Europe/Berlinn", 1)
    # 'alice@example' would be an address (a single-label domain); 'alice at example' is not.
    text = text.replace(
        "recipients: [alice@example.com, bob@example.com]", "recipients: [alice at example, bob@example.com]\n    colour: red"
    )
    (shipped_copy / "schedules.yaml").write_text(text)
    lines = text.splitlines()

    def line_of(needle: str) -> int:
        return next(i for i, line in enumerate(lines, 1) if needle in line)

    done = run_cli("validate", env=clean_env(), cwd=shipped_copy)
    assert_clean_failure(done)
    err = done.stderr
    assert "4 problem(s)" in err
    assert f"schedules.yaml:{line_of('1-8')}: reports.sales-daily.schedule: invalid cron" in err
    assert f"schedules.yaml:{line_of('Berlinn')}: reports.sales-daily.timezone: unknown timezone 'Europe/Berlinn'" in err
    assert (
        f"schedules.yaml:{line_of('alice at example,')}: reports.sales-daily.recipients[0]: 'alice at example' is not an email address"
        in err
    )
    assert f"schedules.yaml:{line_of('colour')}: reports.sales-daily.colour: unknown key" in err


def test_validate_finds_template_syntax_errors(shipped_copy: Path) -> None:
    (shipped_copy / "templates" / "signups.html").write_text("<p>\n{% for row in rows %}\n{{ row.plan }\n")
    done = run_cli("validate", env=clean_env(), cwd=shipped_copy)
    assert_clean_failure(done)
    assert re.search(r"signups\.html:3: reports\.signups\.template: template syntax error", done.stderr), done.stderr


def test_missing_config_and_bad_usage_exit_1_without_traceback(tmp_path: Path) -> None:
    assert_clean_failure(run_cli("validate", env=clean_env(), cwd=tmp_path))
    assert_clean_failure(run_cli("preview", env=clean_env(), cwd=tmp_path))  # missing argument
    assert_clean_failure(run_cli("no-such-command", env=clean_env(), cwd=tmp_path))


def test_unknown_report_names_the_known_ones(shipped_copy: Path) -> None:
    done = run_cli("preview", "sales-dialy", env=clean_env(), cwd=shipped_copy)
    assert_clean_failure(done)
    assert "no report named 'sales-dialy' (did you mean 'sales-daily'?)" in done.stderr


# ----------------------------------------------------------------------------- list, next


def test_list_and_next(shipped_copy: Path) -> None:
    done = run_cli("list", env=clean_env(), cwd=shipped_copy)
    assert done.returncode == 0, done.stderr
    assert re.search(
        r"sales-daily\s+At 07:00, Monday through Friday \(0 7 \* \* 1-5\)\s+Europe/Berlin\s+\d{4}-\d\d-\d\d 07:00 CES?T", done.stdout
    ), done.stdout
    done = run_cli("next", "sales-daily", "-n", "3", env=clean_env(), cwd=shipped_copy)
    assert done.returncode == 0, done.stderr
    times = done.stdout.strip().splitlines()
    assert len(times) == 3 and all("T07:00:00+0" in t for t in times), times


# ----------------------------------------------------------------------------- preview


def test_preview_writes_html_txt_pdf_csv(shipped_copy: Path) -> None:
    out = shipped_copy / "out"
    done = run_cli("preview", "sales-daily", "--slot", "2026-11-20T07:00", "--out", str(out), env=clean_env(), cwd=shipped_copy)
    assert done.returncode == 0, done.stderr
    stem = out / "sales-daily-2026-11-20_0700"
    html = stem.with_suffix(".html").read_text()
    assert "Sales Friday 20 November 2026" in html
    text = stem.with_suffix(".txt").read_text()
    orders = stem.with_suffix(".csv").read_bytes().count(b"\r\n") - 1
    assert text.startswith("Sales Friday 20 November: ") and f"\n{orders} orders, " in text and " EUR in total.\n" in text
    assert "\nNext run: Monday 23 November 2026, 07:00 CET.\n" in text  # the footer, in the report's zone
    assert stem.with_suffix(".csv").read_bytes().startswith(b"\xef\xbb\xbfid,region,product,quantity,amount")
    reader = PdfReader(stem.with_suffix(".pdf"))
    pages = len(reader.pages)
    assert pages >= 2, "the sample sales table should span pages"
    assert f"Page {pages} of {pages}" in reader.pages[-1].extract_text()
    assert "subject: Sales Friday 20 November:" in done.stdout


# ----------------------------------------------------------------------------- send --sync, history


def test_send_sync_delivers_once_and_history_lists_it(shipped_copy: Path, inbox: Inbox) -> None:
    env = clean_env(REPORTER_SMTP_URL=inbox.url)
    done = run_cli("send", "sales-daily", "--sync", "--slot", "2026-11-20T07:00", env=env, cwd=shipped_copy)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert [line.split("\t")[:2] for line in lines] == [["alice@example.com", "sent"], ["bob@example.com", "sent"]]
    assert sorted(r for _, rcpts in inbox.envelopes for r in rcpts) == ["alice@example.com", "bob@example.com"]
    msg = inbox.messages[0]
    # Named in the report's own zone (07:00 Berlin), as the reader's day, not in UTC (06:00).
    assert {p.get_filename() for p in msg.iter_attachments()} == {"sales-daily-2026-11-20_0700.pdf", "sales-daily-2026-11-20_0700.csv"}

    again = run_cli("send", "sales-daily", "--sync", "--slot", "2026-11-20T07:00", env=env, cwd=shipped_copy)
    assert again.returncode == 0, again.stderr
    assert all(line.split("\t")[1] == "already-sent" for line in again.stdout.strip().splitlines())
    assert len(inbox.messages) == 2, "a slot already sent must not be sent again"

    history = run_cli("history", "sales-daily", env=env, cwd=shipped_copy)
    assert history.returncode == 0, history.stderr
    rows = [line for line in history.stdout.splitlines() if "sales-daily" in line]
    assert len(rows) == 2
    assert all(re.search(r"2026-11-20 06:00\s+sales-daily\s+\S+@example\.com\s+sent\s+1\s", row) for row in rows), history.stdout
    assert run_cli("history", "--status", "failed", env=env, cwd=shipped_copy).stdout.startswith("no deliveries")


def test_send_picks_the_latest_scheduled_slot_or_now_and_history_tells_them_apart(shipped_copy: Path, inbox: Inbox) -> None:
    from reporter.config import load
    from reporter.schedule import latest_fire

    env = clean_env(REPORTER_SMTP_URL=inbox.url)
    config = load(shipped_copy / "schedules.yaml", env, shipped_copy / "templates")
    spec = config.reports["sales-daily"]
    latest = latest_fire(spec.schedule, config.zone(spec), datetime.now(UTC))
    done = run_cli("send", "sales-daily", "--sync", env=env, cwd=shipped_copy)
    assert done.returncode == 0, done.stderr
    # The latest scheduled slot (07:00 Berlin on a weekday), as `preview` takes it, and it says so.
    shown = latest.astimezone(config.zone(spec)).isoformat()
    assert f"slot {shown} (the latest scheduled; --now for an ad-hoc one)" in done.stderr, done.stderr
    assert {str(m["X-Reporter-Slot"]) for m in inbox.messages} == {latest.strftime("%Y-%m-%dT%H:%M:%SZ")}
    again = run_cli("send", "sales-daily", "--sync", env=env, cwd=shipped_copy)
    assert [line.split("\t")[1] for line in again.stdout.splitlines()] == ["already-sent", "already-sent"]
    assert "`--now` sends an ad-hoc slot" in again.stderr
    # --now: an ad-hoc slot to the second; two of them a few seconds apart are two slots in history.
    first = run_cli("send", "sales-daily", "--sync", "--now", "--to", "ops@example.org", env=env, cwd=shipped_copy)
    assert first.returncode == 0 and "(ad hoc, --now)" in first.stderr, first.stderr
    time.sleep(1.1)
    second = run_cli("send", "sales-daily", "--sync", "--now", "--to", "ops@example.org", env=env, cwd=shipped_copy)
    assert second.returncode == 0, second.stderr
    assert len(inbox.to("ops@example.org")) == 2
    history = run_cli("history", "sales-daily", env=env, cwd=shipped_copy)
    header = history.stdout.splitlines()[0]
    assert re.search(r"SENT AT \(UTC\)\s+WAIT MS\s+SMTP MS\s+BYTES\s+CONFIG\s", header), history.stdout
    adhoc = [line for line in history.stdout.splitlines() if "ops@example.org" in line]
    seconds = {re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\s", line).group(1) for line in adhoc}  # type: ignore[union-attr]
    assert len(adhoc) == 2 and len(seconds) == 2, history.stdout
    assert all(config.version in line for line in history.stdout.splitlines()[2:]), history.stdout
    both = run_cli("send", "sales-daily", "--slot", "2026-11-20T07:00", "--now", env=env, cwd=shipped_copy)
    assert_clean_failure(both)
    assert "give --slot or --now, not both" in both.stderr


def test_send_sync_to_a_dead_smtp_server_fails_with_exit_2(shipped_copy: Path) -> None:
    from reporter.runner import free_port

    env = clean_env(REPORTER_SMTP_URL=f"smtp://user:s3cret-pw@127.0.0.1:{free_port()}")
    done = run_cli("send", "signups", "--sync", env=env, cwd=shipped_copy)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    assert re.search(r"oncall@example\.com\tfailed\t.*unreachable", done.stdout), done.stdout
    assert "s3cret-pw" not in done.stdout + done.stderr
    history = run_cli("history", "signups", env=env, cwd=shipped_copy)
    assert "failed" in history.stdout and "s3cret-pw" not in history.stdout


def test_send_without_broker_says_what_to_do(shipped_copy: Path) -> None:
    from reporter.runner import free_port

    # Every command now has the same default broker; one that does not answer says which, and what to do.
    port = free_port()
    done = run_cli("send", "signups", "--wait", "5", env=clean_env(REPORTER_BROKER_URL=f"redis://127.0.0.1:{port}/0"), cwd=shipped_copy)
    assert_clean_failure(done)
    assert f"broker redis://127.0.0.1:{port}/0 unreachable: " in done.stderr
    assert "check that it is running and that REPORTER_BROKER_URL is right; or use --sync" in done.stderr


def test_send_with_no_worker_says_so_at_once_and_queues_nothing(shipped_copy: Path, fresh_redis: str) -> None:
    from reporter.ledger import Ledger

    env = clean_env(REPORTER_BROKER_URL=fresh_redis)
    done = run_cli("send", "signups", env=env, cwd=shipped_copy)
    assert_clean_failure(done)
    assert "queued signups" not in done.stderr and "waiting up to" not in done.stderr, "nothing is queued for nobody, nor waited for"
    assert f"no worker answers on the broker {fresh_redis}: start `reporter run` (or `reporter worker`)" in done.stderr
    ledger = Ledger.from_url(f"sqlite:///{shipped_copy / 'var' / 'reporter.db'}")
    assert ledger.rows(report="signups") == [], "nothing is recorded as queued for a send nobody takes"
    ledger.dispose()


# ----------------------------------------------------------------------------- run


def processes_in(folder: Path) -> list[int]:
    """PIDs of processes whose working directory is FOLDER (what `reporter run` started there)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if Path(os.readlink(entry / "cwd")) == folder:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.integration
@pytest.mark.slow(minutes=1)
def test_run_delivers_on_embedded_defaults_and_ctrl_c_stops_everything(shipped_copy: Path, inbox: Inbox) -> None:
    log = shipped_copy / "run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "reporter", "run"],
            cwd=shipped_copy,
            env=clean_env(REPORTER_SMTP_URL=inbox.url),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        # The minutely sample report is due within a minute of start (the hourly alert may come first at :00).
        wait_until(
            lambda: any(str(m["Subject"]).startswith("Sign-ups at ") for m in inbox.to("oncall@example.com")),
            100,
            "the minutely sign-ups email",
            log.read_text,
        )
        assert (shipped_copy / "var" / "broker.url").exists()
        assert len(processes_in(shipped_copy)) >= 4  # supervisor, redis, worker (+ pool), beat
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
    output = log.read_text()
    assert code == 0, output[-3000:]
    assert "reporter run: stopped" in output
    assert "Traceback" not in output
    deadline = time.monotonic() + 10
    while processes_in(shipped_copy) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_in(shipped_copy) == [], "reporter run left processes behind"
    assert not (shipped_copy / "var" / "broker.url").exists()
    history = run_cli("history", "signups", env=clean_env(), cwd=shipped_copy)
    assert re.search(r"signups\s+oncall@example\.com\s+sent", history.stdout), history.stdout


def test_python_dash_m_and_console_script_agree() -> None:
    done = subprocess.run([sys.executable, "-m", "reporter", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and "validate" in done.stdout and "history" in done.stdout
    script = Path(sys.executable).parent / "reporter"
    if script.exists():
        assert subprocess.run([str(script), "--help"], capture_output=True, text=True).stdout == done.stdout


def test_send_to_override_validates_addresses(shipped_copy: Path, make_project: Callable[..., Project]) -> None:
    done = run_cli("send", "signups", "--sync", "--to", "not-an-address", env=clean_env(), cwd=shipped_copy)
    assert_clean_failure(done)
    assert "--to: 'not-an-address' is not an email address" in done.stderr


def test_unreadable_secret_file_and_bad_ledger_url_are_one_line_exit_1(shipped_copy: Path) -> None:
    done = run_cli("validate", env=clean_env(REPORTER_SMTP_URL_FILE="/nonexistent/smtp-url"), cwd=shipped_copy)
    assert_clean_failure(done)
    assert "REPORTER_SMTP_URL_FILE: cannot read /nonexistent/smtp-url: No such file or directory" in done.stderr
    for url, expected in (
        ("postgresql+psycopg://bob:hunter2pw@127.0.0.1:1/db", "ledger database postgresql+psycopg://bob:***@127.0.0.1:1/db: "),
        ("nosuchdb://x/y", "ledger database nosuchdb://x/y: "),
    ):
        done = run_cli("history", env=clean_env(REPORTER_DATABASE_URL=url), cwd=shipped_copy)
        assert_clean_failure(done)
        assert expected in done.stderr and "hunter2pw" not in done.stderr, done.stderr


def test_a_wrong_query_fails_at_once_instead_of_being_retried(shipped_copy: Path, inbox: Inbox) -> None:
    text = (shipped_copy / "schedules.yaml").read_text().replace("from orders where day", "from ordres where day")
    (shipped_copy / "schedules.yaml").write_text(text)
    done = run_cli("send", "sales-daily", "--sync", env=clean_env(REPORTER_SMTP_URL=inbox.url), cwd=shipped_copy)
    assert done.returncode == 2, done.stderr
    assert re.search(r"alice@example\.com\tfailed\t.*query failed: .*no such table: ordres", done.stdout), done.stdout
    assert "not retried" not in done.stdout  # a permanent failure, not a transient one given up on
    # The owners are told once, about both recipients.
    assert [rcpts for _, rcpts in inbox.envelopes] == [["data-team@example.com"]]


# ----------------------------------------------------------------------------- one check for every command


def break_shipped(folder: Path) -> list[str]:
    """Three kinds of mistake in the shipped config at once; the problems `validate` should print."""
    path = folder / "schedules.yaml"
    text = path.read_text()
    text = text.replace("examples.signups:last_minute", "examples.signups:nope")
    text = text.replace("subject: \"Sales {{ slot.strftime('%A %d %B') }}", "subject: \"Sales {{ slot.strftime('%A %d %B') }")
    text = text.replace('rate_limit: "1/s"', 'rate_limit: "fast"')
    path.write_text(text)
    lines = text.splitlines()

    def line_of(needle: str) -> int:
        return next(i for i, line in enumerate(lines, 1) if needle in line)

    return [
        "reporter: 3 problem(s) in the configuration:",
        f"  schedules.yaml:{line_of('fast')}: defaults.rate_limit: rate 'fast' is not like '1/s', '30/m' or '500/h'",
        f"  schedules.yaml:{line_of('subject: ' + chr(34) + 'Sales')}: reports.sales-daily.subject: template syntax error: unexpected '}}'",
        f"  schedules.yaml:{line_of(':nope')}: reports.signups.function: module examples.signups has no function 'nope'",
    ]


def test_validate_finds_schema_template_and_function_problems_in_one_pass(shipped_copy: Path) -> None:
    expected = break_shipped(shipped_copy)
    done = run_cli("validate", env=clean_env(), cwd=shipped_copy)
    assert_clean_failure(done)
    assert done.stderr.splitlines() == expected
    assert done.stdout == ""


@pytest.mark.parametrize(
    "command",
    [["send", "signups", "--sync"], ["send", "signups"], ["preview", "signups"], ["run"], ["list"]],
    ids=["send-sync", "send", "preview", "run", "list"],
)
def test_every_command_refuses_what_validate_refuses_with_the_same_messages(shipped_copy: Path, inbox: Inbox, command: list[str]) -> None:
    expected = break_shipped(shipped_copy)
    done = run_cli(*command, env=clean_env(REPORTER_SMTP_URL=inbox.url), cwd=shipped_copy, timeout=60)
    assert_clean_failure(done)
    assert done.stderr.splitlines() == expected
    assert inbox.messages == []
    assert not (shipped_copy / "var" / "broker.url").exists()  # `run` started nothing
    assert not (shipped_copy / "preview").exists()


def test_validate_connect_says_what_answers(shipped_copy: Path, pg_url: str, inbox: Inbox) -> None:
    done = run_cli("validate", "--connect", env=clean_env(WAREHOUSE_URL=pg_url, REPORTER_SMTP_URL=inbox.url), cwd=shipped_copy)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "OK: 4 reports, 2 beat entries (schedules.yaml)",
        f"datasource warehouse ({mask_url(pg_url)}): answers",
        f"mail (SMTP smtp://{inbox.host}:{inbox.port}): answers",
    ]
    assert inbox.messages == []


def test_validate_connect_exits_1_when_something_does_not_answer(shipped_copy: Path) -> None:
    from reporter.runner import free_port

    port = free_port()
    done = run_cli("validate", "--connect", env=clean_env(REPORTER_SMTP_URL=f"smtp://bot:s3cret-pw@127.0.0.1:{port}"), cwd=shipped_copy)
    assert_clean_failure(done)
    assert done.stdout.splitlines() == [
        "OK: 4 reports, 2 beat entries (schedules.yaml)",
        "datasource warehouse (sqlite:///var/warehouse.db): not opened: the file is made from examples/warehouse.sql on first use",
        f"mail (SMTP smtp://127.0.0.1:{port}): does not answer: ConnectionRefusedError: [Errno 111] Connection refused",
    ]
    assert done.stderr == "reporter: 1 of 2 did not answer\n"
    assert "s3cret-pw" not in done.stdout + done.stderr


# ----------------------------------------------------------------------------- addresses a company relay delivers


def test_addresses_at_local_and_localhost_are_delivered(make_project: Callable[..., Project], inbox: Inbox) -> None:
    project = make_project(recipients=["ops@corp.local", "root@localhost"])
    env = project.env(REPORTER_SMTP_URL=inbox.url)
    done = run_cli("send", "regional", "--sync", "--slot", "2026-11-20T07:00Z", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [line.split("\t")[:2] for line in done.stdout.splitlines()] == [["ops@corp.local", "sent"], ["root@localhost", "sent"]]

    done = run_cli(
        "send", "regional", "--sync", "--slot", "2026-11-20T08:00Z", "--to", "a@example.test", "--to", "x@host.internal", env=env
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert [line.split("\t")[:2] for line in done.stdout.splitlines()] == [["a@example.test", "sent"], ["x@host.internal", "sent"]]
    assert sorted(r for _, rcpts in inbox.envelopes for r in rcpts) == [
        "a@example.test",
        "ops@corp.local",
        "root@localhost",
        "x@host.internal",
    ]
    assert sorted(m["To"] for m in inbox.messages) == ["a@example.test", "ops@corp.local", "root@localhost", "x@host.internal"]


def test_outbox_an_empty_folder_works_and_a_folder_of_other_files_is_refused_cleanly(shipped_copy: Path) -> None:
    empty = shipped_copy / "empty-outbox"
    empty.mkdir()
    slot = ("--slot", "2026-11-20T07:00")
    done = run_cli("send", "sales-daily", "--sync", *slot, env=clean_env(REPORTER_OUTBOX=str(empty)), cwd=shipped_copy)
    assert done.returncode == 0, done.stderr
    assert len(list((empty / "new").iterdir())) == 2

    other = shipped_copy / "documents"
    other.mkdir()
    (other / "letter.txt").write_text("not mail")
    refused = run_cli(
        "send", "sales-daily", "--sync", "--slot", "2026-11-21T07:00", env=clean_env(REPORTER_OUTBOX=str(other)), cwd=shipped_copy
    )
    assert_clean_failure(refused)
    assert f"REPORTER_OUTBOX: {other}: is a folder with other files in it, not a Maildir" in refused.stderr
    assert sorted(p.name for p in other.iterdir()) == ["letter.txt"]
    history = run_cli("history", "sales-daily", env=clean_env(), cwd=shipped_copy)
    assert history.returncode == 0, history.stderr
    assert "sending" not in history.stdout and "2026-11-21" not in history.stdout

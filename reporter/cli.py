"""`reporter` (also `python -m reporter`): validate, list, next, preview, send, history, worker, beat, run.

Exit codes: 0 done, 1 bad input (a clear message, no traceback), 2 a delivery failed.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, tzinfo
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, ParamSpec, TypeVar

import click
from sqlalchemy.exc import SQLAlchemyError

from reporter import defaults
from reporter.errors import BrokerUnavailable, ConfigError, ReporterError
from reporter.ledger import STATUSES
from reporter.settings import Settings, mask_url

if TYPE_CHECKING:  # the commands import these when they run, so that `reporter --help` starts fast
    from reporter.config import Config
    from reporter.config import Report as ReportSpec
    from reporter.data import Table
    from reporter.ledger import Row
    from reporter.render import Renderer
    from reporter.runtime import Runtime
    from reporter.status import Check

EXIT_OK, EXIT_INPUT, EXIT_DELIVERY = 0, 1, 2

P = ParamSpec("P")
R = TypeVar("R")


class Context:
    """What every command shares: the settings, and the runtime built from them on demand."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def config(self) -> Config:
        """The config, if it passes every check `reporter validate` makes; else ConfigError."""
        from reporter.checks import load_checked

        return load_checked(self.settings.config_path, self.settings.variables, self.settings.templates_dir)

    def runtime(self, local_limiter: bool = False) -> Runtime:
        """A Runtime for this process; LOCAL_LIMITER: a rate limit of its own, shared with no worker."""
        from reporter import ratelimit, runtime

        rt = runtime.build(self.settings)
        if local_limiter:
            rt.limiter = ratelimit.LocalLimiter()
        return rt


def fail(message: str, code: int = EXIT_INPUT) -> NoReturn:
    click.echo(f"reporter: {message}", err=True)
    sys.exit(code)


def handles_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn reporter's own errors into a message and exit 1, never a traceback."""

    @wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except ConfigError as exc:
            click.echo(f"reporter: {len(exc.problems)} problem(s) in the configuration:", err=True)
            for problem in exc.problems:
                click.echo(f"  {problem}", err=True)
            sys.exit(EXIT_INPUT)
        except ReporterError as exc:
            fail(str(exc))
        except SQLAlchemyError as exc:
            # An unreachable or misspelt ledger database: say which (password masked) and stop.
            url = mask_url(click.get_current_context().find_object(Context).settings.database_url)  # type: ignore[union-attr]
            fail(f"ledger database {url}: {str(getattr(exc, 'orig', None) or exc).strip().splitlines()[0]}")

    return wrapper


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[("" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def fmt(r: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()

    return "\n".join([fmt(list(headers)), fmt(["-" * w for w in widths]), *(fmt(r) for r in cells)])


def parse_slot(text: str | None, zone: tzinfo) -> datetime | None:
    from reporter.schedule import parse_instant

    if text is None:
        return None
    try:
        return parse_instant(text, zone)
    except ValueError:
        fail(f"--slot {text!r} is not an ISO timestamp such as 2026-11-23T07:00 or 2026-11-23T06:00Z")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    help="schedules.yaml to use [env: REPORTER_CONFIG; default ./schedules.yaml]",
)
@click.version_option(package_name="reporter")
@click.pass_context
def cli(ctx: click.Context, config_path: Path | None) -> None:
    """Scheduled email reports: schedules.yaml -> Celery beat -> workers -> inboxes."""
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        fail(str(exc))
    for warning in settings.warnings:
        click.echo(f"reporter: warning: {warning}", err=True)
    if config_path is not None:
        settings = settings.with_config(config_path)
    ctx.obj = Context(settings)


@cli.command()
@click.option("--connect", is_flag=True, help="also open each datasource and the SMTP server, and say which answer")
@click.pass_obj
@handles_errors
def validate(obj: Context, connect: bool) -> None:
    """Check the config, templates, data functions and URLs; print every problem, exit 1 if any."""
    config = obj.config()
    click.echo(f"OK: {len(config.reports)} reports, {len(config.beat)} beat entries ({obj.settings.config_path})")
    if connect:
        from reporter.checks import connect_problems

        reached = connect_problems(config, obj.settings)
        for reach in reached:
            click.echo(str(reach))
        silent = [r for r in reached if r.problem]
        if silent:
            fail(f"{len(silent)} of {len(reached)} did not answer")


@cli.command("list")
@click.pass_obj
@handles_errors
def list_(obj: Context) -> None:
    """Reports with their cron in words, timezone and next fire time."""
    from reporter.schedule import describe, next_fire

    config = obj.config()
    now = datetime.now(UTC)
    rows = []
    for name, report in sorted(config.reports.items()):
        zone = config.zone(report)
        nxt = next_fire(report.schedule, zone, now).astimezone(zone)
        rows.append(
            [
                name,
                f"{describe(report.schedule)} ({report.schedule})",
                str(zone),
                nxt.strftime("%Y-%m-%d %H:%M %Z") if report.enabled else "disabled",
                ",".join(report.formats),
                "burst" if report.burst is not None else len(report.recipients),
            ]
        )
    click.echo(table(["REPORT", "SCHEDULE", "TIMEZONE", "NEXT", "FORMATS", "RECIPIENTS"], rows))


@cli.command("next")
@click.argument("report", required=False)
@click.option("-n", "count", type=click.IntRange(1, 1000), default=5, show_default=True, help="how many fire times")
@click.pass_obj
@handles_errors
def next_(obj: Context, report: str | None, count: int) -> None:
    """The next N fire times of REPORT (or of every report)."""
    from reporter.schedule import next_fires

    config = obj.config()
    names = [report] if report else sorted(config.reports)
    now = datetime.now(UTC)
    for name in names:
        spec = config.report(name)
        zone = config.zone(spec)
        if len(names) > 1:
            click.echo(f"{name}:")
        for fire in next_fires(spec.schedule, zone, now, count):
            local = fire.astimezone(zone)
            click.echo(f"{'  ' if len(names) > 1 else ''}{local.isoformat()}  ({fire.strftime('%Y-%m-%d %H:%M')} UTC)")


@cli.command()
@click.argument("report")
@click.option("--slot", help="the slot to render (ISO; naive means the report's zone) [default: the latest]")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("preview"), show_default=True, help="folder for the files")
@click.option("--as", "as_", metavar="ADDRESS", help="a burst report: render this reader's slice [default: the first reader's]")
@click.pass_obj
@handles_errors
def preview(obj: Context, report: str, slot: str | None, out_dir: Path, as_: str | None) -> None:
    """Render REPORT to html, txt, pdf, csv and xlsx files; sends nothing."""
    from reporter.charts import for_pdf
    from reporter.render import Renderer
    from reporter.schedule import latest_fire
    from reporter.sheets import to_csv, to_xlsx

    config = obj.config()
    spec = config.report(report)
    zone = config.zone(spec)
    at = parse_slot(slot, zone) or latest_fire(spec.schedule, zone, datetime.now(UTC))
    renderer = Renderer(config)
    reader, readers = _burst_reader(renderer, report, at, as_)
    table_ = renderer.fetch(report, at, reader)
    extra, said, variant = _preview_alert(obj, report, at, table_) if spec.when is not None else (None, None, spec)
    rendered = renderer.render_table(report, at, table_, extra=extra, spec=variant, reader=reader)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{report}-{at.astimezone(zone).strftime('%Y-%m-%d_%H%M')}"
    # The files show the charts inline (SVG data: URLs); the email carries them as cid: PNG parts.
    html = for_pdf(rendered.html, report, rendered.charts)
    files = {
        ".html": html.encode(),
        ".txt": rendered.text.encode(),
        ".pdf": rendered.pdf if rendered.pdf is not None else renderer.pdf(html),
        ".csv": rendered.csv if rendered.csv is not None else to_csv(table_, config.csv_bom_of(spec)),
        ".xlsx": rendered.xlsx if rendered.xlsx is not None else to_xlsx(table_, zone, report),
    }
    click.echo(f"subject: {rendered.subject}")
    click.echo(f"slot:    {at.astimezone(zone).isoformat()} ({rendered.row_count} rows)")
    if reader is not None and as_ is None:
        click.echo(f"reader:  {reader['address']} (first of {readers}; --as ADDRESS for another)")
    if said is not None:
        click.echo(f"when:    {said}")
    for suffix, content in files.items():
        path = stem.with_suffix(suffix)
        path.write_bytes(content)
        attached = "" if suffix in (".txt",) or suffix[1:] in spec.formats else "  (not in this report's formats)"
        click.echo(f"wrote   {path} ({len(content):,} bytes){attached}")


def _preview_alert(obj: Context, report: str, at: datetime, data: Table) -> tuple[dict[str, object], str, ReportSpec]:
    """What an alert report's condition says for slot AT and what its slot would do, read-only: the
    decision now, against the ledger's previous evaluation (and the slot's recorded decision, if it
    ran). Never records anything, nor creates a ledger that is not there."""
    import sqlalchemy as sa

    from reporter import alert
    from reporter.ledger import Ledger, make_engine

    config = obj.config()
    spec = config.report(report)
    policy = alert.Policy.of(spec)
    before = recorded = None
    history = "; no ledger to read earlier slots from"
    url = sa.make_url(obj.settings.database_url)
    if url.get_backend_name() != "sqlite" or (url.database and Path(url.database).is_file()):
        ledger = Ledger(make_engine(obj.settings.database_url))
        try:
            recorded, before = ledger.evaluation(report, at), ledger.previous_evaluation(report, at)
            history = ""
        except SQLAlchemyError:
            pass  # unreachable, or a ledger from before alerts: decide as for a first slot
        finally:
            ledger.dispose()
    zone = config.zone(spec)
    try:
        found = alert.evaluation(report, policy, at, data.dicts(), data.columns, before, at=lambda s: alert.slot_label(s, zone))
    except alert.ConditionError as exc:
        fail(f"{exc} (a slot would fail like this, and its owners be told)")
    would: dict[str, str] = {alert.SEND: "would send", alert.RECOVERED: "would send the recovered email", alert.NOT_SENT: "would not send"}
    said = f"{policy.when} → {found.held} ({would[found.decision]}; notify {policy.notify}{history})"
    if found.decision == alert.NOT_SENT:
        said += f"\n         {found.reason}"
    if recorded is not None:
        said += f"\n         this slot already ran and decided: {recorded.reason}"
    if policy.value is not None:
        said += f"\nvalue:   {policy.value} → {alert.show(found.value)}"
    return alert.template_context(found, before), said, alert.email_spec(spec, found)


@cli.command()
@click.argument("report")
@click.option("--to", "to", multiple=True, help="send to this address instead of the report's recipients (repeatable)")
@click.option(
    "--slot",
    help="the slot to send (ISO; naive means the report's zone) [default: the latest scheduled]; a slot already sent is not sent again",
)
@click.option("--now", "now_", is_flag=True, help="send an ad-hoc slot named after the current time (to the second), not a scheduled one")
@click.option("--sync", is_flag=True, help="render and send in this process instead of through the urgent queue")
@click.option("--wait", type=click.IntRange(0), default=defaults.SEND_WAIT, show_default=True, help="seconds to wait for the workers")
@click.option("--as", "as_", metavar="ADDRESS", help="a burst report: send this reader's slice to the --to addresses")
@click.pass_obj
@handles_errors
def send(obj: Context, report: str, to: tuple[str, ...], slot: str | None, now_: bool, sync: bool, wait: int, as_: str | None) -> None:
    """Send REPORT now (its latest scheduled slot by default): one line per recipient; exit 2 if a delivery failed."""
    from reporter import deliver
    from reporter.audience import audience
    from reporter.mail import destination
    from reporter.schedule import latest_fire

    if slot is not None and now_:
        fail("give --slot or --now, not both")
    started = datetime.now(UTC)
    # --sync shares the workers' rate limit only on a broker they are known to use.
    rt = obj.runtime(local_limiter=sync and not obj.settings.broker.shared)
    spec = rt.config.report(report)
    zone = rt.config.zone(spec)
    at = parse_slot(slot, zone)
    if at is None:
        at = started.replace(microsecond=0) if now_ else latest_fire(spec.schedule, zone, started)
    chosen = "as given" if slot else "ad hoc, --now" if now_ else "the latest scheduled; --now for an ad-hoc one"
    click.echo(f"slot {at.astimezone(zone).isoformat()} ({chosen})", err=True)
    try:
        targets = audience(spec, list(to) or None).keys()
    except ValueError as exc:
        fail(f"--to: {exc}")
    if spec.burst is not None:
        targets = _send_burst(rt, report, at, list(to), as_, sync, wait)
    elif as_ is not None:
        fail(no_readers(report))
    elif sync:
        click.echo(f"sending {report} for {at.isoformat()} via {destination(rt.settings.smtp_url, rt.settings.outbox)}", err=True)
        result = deliver.send_slot(rt, report, at, only=list(to) or None, trigger="manual")
        if result.retry:
            deliver.fail_for_good(rt, result, "send --sync does not retry; try again or send through the workers")
        from reporter.notice import notify_owners

        notify_owners(rt, result)
    else:
        _send_async(rt, report, at, list(to), wait)
    rows = {r.recipient: r for r in rt.ledger.rows(report=report, slot=at)}
    decided = rt.ledger.evaluation(report, at) if spec.when is not None else None
    if decided is not None:
        click.echo(f"when: {decided.reason}", err=True)
    failed = False
    already = 0
    for key in targets:
        row = rows.get(key)
        status = row.status if row else "unknown"
        failed |= status not in ("sent", "skipped", "not-sent", "planned")
        detail = row.message_id if row and status == "sent" else (row.error if row else "") or ""
        if row and row.sent_at and row.sent_at < started:
            status, detail = "already-sent", f"{row.message_id} at {row.sent_at.isoformat()}"
            already += 1
        click.echo(f"{key}\t{status}\t{detail}")
    if already and not now_:
        click.echo("a slot is sent once per recipient; `--now` sends an ad-hoc slot named after the current time", err=True)
    sys.exit(EXIT_DELIVERY if failed else EXIT_OK)


def no_readers(report: str) -> str:
    """What `--as` on REPORT, which has no burst:, is told."""
    return f"--as: report {report!r} has no burst: readers; --as picks a burst reader's slice"


def _burst_reader(renderer: Renderer, report: str, at: datetime, as_: str | None) -> tuple[dict[str, object] | None, int]:
    """For `preview`: the reader of burst REPORT whose slice to render (AS_, else the first), and how many
    readers there are; (None, 0) for a report without burst:."""
    from reporter import burst
    from reporter.audience import key_of

    if renderer.config.reports[report].burst is None:
        if as_ is not None:
            fail(no_readers(report))
        return None, 0
    found, _ = burst.readers(renderer, report, at)
    if not found:
        fail(f"report {report!r} has no readers for this slot: its burst query returned no valid address")
    if as_ is None:
        return found[0].as_dict(), len(found)
    try:
        key = key_of(as_)
    except ValueError as exc:
        fail(f"--as: {exc}")
    chosen = next((r for r in found if r.key == key), None)
    if chosen is None:
        fail(burst.not_a_reader(as_, report, found))
    return chosen.as_dict(), len(found)


def _send_burst(rt: Runtime, report: str, at: datetime, to: list[str], as_: str | None, sync: bool, wait: int) -> list[str]:
    """`send` of burst REPORT: with TO, the slice of each (or of AS_) to each; else plan and send every
    reader. Returns the ledger keys to print."""
    from reporter import burst, deliver
    from reporter.audience import key_of
    from reporter.mail import destination
    from reporter.notice import notify_owners

    if as_ is not None and not to:
        fail("--as needs --to: the address that gets the reader's slice")
    if sync:
        click.echo(f"sending {report} for {at.isoformat()} via {destination(rt.settings.smtp_url, rt.settings.outbox)}", err=True)
    results: list[deliver.SendResult] = []
    if to:
        found, _ = burst.readers(rt.renderer, report, at)
        by_key = {r.key: r for r in found}
        try:
            keys = [key_of(a) for a in to]
            source = None if as_ is None else by_key.get(key_of(as_))
        except ValueError as exc:
            fail(f"--to/--as: {exc}")
        if as_ is not None and source is None:
            fail(burst.not_a_reader(as_, report, found))
        slices = {}
        for address, key in zip(to, keys, strict=True):
            if source is not None and key in by_key and by_key[key] is not source:
                # Its row is its own slice's: a slot sends a reader one email, so --as cannot replace it.
                fail(
                    f"{address} is a reader of {report} with its own slice; --as sends a reader's slice to an address that is not a reader"
                )
            reader = source or by_key.get(key)
            if reader is None:
                fail(burst.not_a_reader(address, report, found, advice=True))
            slices[key] = reader.stored()
        # A reader's row that planning made already keeps its own slice: a slot is sent once per reader.
        rt.ledger.ensure_readers(report, at, slices, trigger="manual")
        if sync:
            results.append(burst.send_piece(rt, report, at, keys))
        else:
            _send_async(rt, report, at, keys, wait)
    elif sync:
        # A local work list, pieces and their hand-ons alike: --sync creates no Celery app, so nothing is published.
        pieces: list[burst.Piece] = []
        results.append(burst.send_burst(rt, report, at, None, "manual", enqueue=pieces.append))
        while pieces:
            piece = pieces.pop(0)
            results.append(burst.send_burst(rt, report, at, list(piece.keys), "manual", enqueue=pieces.append))
    else:
        _send_async(rt, report, at, [], wait)
    for result in results:
        if result.retry:
            deliver.fail_for_good(rt, result, "send --sync does not retry; try again or send through the workers")
        notify_owners(rt, result)
    if to:
        return keys
    return sorted(rt.ledger.statuses(report, at), key=burst.listing_order)


def _send_async(rt: Runtime, report: str, at: datetime, to: list[str], wait: int) -> None:
    from reporter.audience import audience
    from reporter.dispatch import Due
    from reporter.ledger import FINAL
    from reporter.status import ping

    broker = rt.settings.broker
    try:
        url = broker.require()
    except ReporterError as exc:
        fail(f"{exc}; or use --sync")
    try:
        # Ask first, so that a send nobody will take is neither queued nor waited for.
        answered = ping(url)
    except ReporterError as exc:
        fail(f"{exc}; {broker.advice()}; or use --sync")
    if not answered:
        fail(
            f"no worker answers on the broker {mask_url(broker.url or '')}: start `reporter run` (or `reporter worker`) "
            "in another terminal, or use --sync to send from this process"
        )
    from reporter.app import create_app
    from reporter.tasks import enqueue_send

    create_app(rt.settings)  # the app the send is published through (the tasks find it as the current app)
    keys = audience(rt.config.reports[report], to or None).keys()
    rt.ledger.ensure(report, at, keys, trigger="manual")
    try:
        enqueue_send(rt, Due(report, at), queue=defaults.QUEUE_URGENT, only=to or None, trigger="manual")
    except Exception as exc:  # noqa: BLE001 - kombu raises many kinds when the broker is down
        fail(f"{rt.settings.broker.unreachable(exc)}; or use --sync")
    click.echo(f"queued {report} for {at.isoformat()} on {defaults.QUEUE_URGENT}; waiting up to {wait}s", err=True)
    deadline = time.monotonic() + wait
    rows: list[Row] = []
    while time.monotonic() < deadline:
        rows = rt.ledger.rows(report=report, slot=at)
        # A burst slot is done when its planning row and every row it made are.
        whole = rt.config.reports[report].burst is not None and not to
        if rows and all(r.status in FINAL for r in rows if r.recipient in keys or whole):
            return
        time.sleep(0.5)
    tried = [r for r in rows if r.recipient in keys and r.attempts]
    if tried:
        # A worker took it and is retrying: say why, not "is a worker running?".
        why = f"the workers keep retrying ({tried[0].error})"
        click.echo(f"not finished after {wait}s: {why}; `reporter history {report}` shows the outcome", err=True)
    else:
        click.echo(f"not finished after {wait}s: no worker has taken it; is one running (`reporter worker`)?", err=True)


@cli.command()
@click.argument("report", required=False)
@click.option("--status", type=click.Choice(list(STATUSES)), help="only rows in this state")
@click.option("--limit", type=click.IntRange(1), default=50, show_default=True)
@click.option("--upcoming", is_flag=True, help="also list slots still to come (queued with an eta)")
@click.pass_obj
@handles_errors
def history(obj: Context, report: str | None, status: str | None, limit: int, upcoming: bool) -> None:
    """The ledger, newest slot first (slots still to come only with --upcoming)."""
    from reporter.ledger import Ledger

    if report is not None:
        obj.config().report(report)  # a clear error for a typo, rather than an empty list
    ledger = Ledger.from_url(obj.settings.database_url)
    rows = ledger.rows(report=report, status=status, limit=limit, until=None if upcoming else datetime.now(UTC))
    if not rows:
        click.echo("no deliveries recorded" + (f" for {report}" if report else ""))
        return
    click.echo(
        table(
            [
                "SLOT (UTC)",
                "REPORT",
                "RECIPIENT",
                "STATUS",
                "TRIES",
                "SENT AT (UTC)",
                "WAIT MS",
                "SMTP MS",
                "BYTES",
                "CONFIG",
                "MESSAGE-ID / ERROR",
            ],
            [
                [
                    slot_text(r.slot),
                    r.report,
                    r.recipient,
                    r.status,
                    r.attempts,
                    r.sent_at.strftime("%Y-%m-%d %H:%M:%S") if r.sent_at else "",
                    r.wait_ms,
                    r.duration_ms,
                    r.size_bytes,
                    r.config_version,
                    (r.error or r.message_id or "").replace("\n", " ")[:200],
                ]
                for r in rows
            ],
        )
    )


def slot_text(slot: datetime) -> str:
    """A slot to the minute, or to the second when it is not on a whole minute (an ad-hoc `send --now`)."""
    return slot.strftime("%Y-%m-%d %H:%M:%S" if slot.second or slot.microsecond else "%Y-%m-%d %H:%M")


def _broker(settings: Settings) -> str:
    return settings.broker.require()  # the one rule, as create_app uses it


def _verdict(check: Check, settings: Settings | None = None) -> NoReturn:
    reason = f"{check.reason}; {settings.broker.advice()}" if settings is not None and check.broker_down else check.reason
    click.echo(("ok: " if check.ok else "unhealthy: ") + reason, err=not check.ok)
    sys.exit(EXIT_OK if check.ok else EXIT_INPUT)


@cli.group()
def health() -> None:
    """Exit 0 if a role is healthy, 1 if not, with a one-line reason: for container health checks."""


@health.command("worker")
@click.option("--node", "-d", "nodes", multiple=True, help="worker node to ping, e.g. celery@host [default: every worker on this host]")
@click.option("--timeout", type=click.FloatRange(0.1), default=2.0, show_default=True, help="seconds to wait for the answer")
@click.pass_obj
@handles_errors
def health_worker(obj: Context, nodes: tuple[str, ...], timeout: float) -> None:
    """Does this host's worker answer `celery inspect ping`?"""
    from reporter.status import worker_health

    _verdict(worker_health(_broker(obj.settings), list(nodes), timeout=timeout), obj.settings)


@health.command("beat")
@click.option("--max-age", type=click.FloatRange(1), default=60.0, show_default=True, help="seconds since beat's last tick")
@click.pass_obj
@handles_errors
def health_beat(obj: Context, max_age: float) -> None:
    """Has the leading beat ticked within --max-age seconds (its heartbeat in the broker)?"""
    from reporter.status import beat_health

    _verdict(beat_health(_broker(obj.settings), max_age), obj.settings)


@health.command("flower")
@click.option("--port", type=click.IntRange(1, 65535), help="Flower's port [env: FLOWER_PORT; default 5555]")
@click.pass_obj
@handles_errors
def health_flower(obj: Context, port: int | None) -> None:
    """Does Flower on this host answer its /healthcheck?"""
    from reporter.status import flower_health

    _verdict(flower_health(port or obj.settings.flower_port))


@cli.command()
@click.option("--failures", type=click.IntRange(0), default=5, show_default=True, help="how many of the latest failed deliveries to show")
@click.option("--json", "as_json", is_flag=True, help="one JSON object instead of text")
@click.pass_obj
@handles_errors
def status(obj: Context, failures: int, as_json: bool) -> None:
    """Workers that answer, the beat that leads and its last tick, queue depths, the latest failures."""
    import json

    from reporter.live import load_checked
    from reporter.status import collect, render

    broker = _broker(obj.settings)
    try:
        found = collect(broker, obj.settings.database_url, failures=failures)
    except BrokerUnavailable as exc:
        fail(f"{exc}; {obj.settings.broker.advice()}")
    try:
        found.disk_version = load_checked(obj.settings).version
    except ConfigError as exc:
        found.disk_problems = [str(p) for p in exc.problems]
    click.echo(json.dumps(found.as_dict(), default=str) if as_json else render(found))


def _exec(argv: list[str]) -> NoReturn:
    os.execv(argv[0], argv)


def concurrency_for(cpus: int, memory_bytes: int | None, per_child_kib: int) -> int:
    """Worker processes: one per CPU (a render is CPU-bound; waiting on SMTP and the database leaves
    room for the rest of the machine), and no more than half the memory holds at PER_CHILD_KIB each (a
    child may pass its limit during the task that replaces it)."""
    by_cpu = cpus
    by_memory = memory_bytes // (2 * per_child_kib * 1024) if memory_bytes else by_cpu
    return max(min(by_cpu, by_memory), 1)


def _machine() -> tuple[int, int | None]:
    """CPUs and bytes of memory this process may use, container (cgroup v2) limits included."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    memory: int | None = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(-(-int(quota) // int(period)), 1))
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            memory = min(memory or int(limit), int(limit))
    except (OSError, ValueError):
        pass  # no cgroup v2 limits to honour
    return cpus, memory


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--concurrency", "-c", type=click.IntRange(1), help="worker processes [default: one per CPU, one per 800 MB at most]")
@click.option(
    "--max-tasks-per-child",
    type=click.IntRange(1),
    default=defaults.WORKER_MAX_TASKS_PER_CHILD,
    show_default=True,
    help="replace a process after this many tasks",
)
@click.option(
    "--max-memory-per-child",
    type=click.IntRange(1),
    default=defaults.WORKER_MAX_MEMORY_PER_CHILD,
    show_default=True,
    help="KiB; replace a process that grew this much since it started, once its task ends",
)
@click.pass_context
def worker(ctx: click.Context, concurrency: int | None, max_tasks_per_child: int, max_memory_per_child: int) -> None:
    """A Celery worker on both queues (urgent first). Extra arguments go to `celery worker`.

    SIGTERM is a warm shutdown: the worker takes no more tasks, finishes the sends in progress and exits.
    """
    from reporter.app import worker_command

    conc = concurrency or concurrency_for(*_machine(), max_memory_per_child)
    _exec(worker_command(conc, max_tasks_per_child=max_tasks_per_child, max_memory_per_child=max_memory_per_child, extra=ctx.args))


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def beat(ctx: click.Context) -> None:
    """The Celery beat scheduler, from the YAML crontab. Run exactly one. Extra arguments go to `celery beat`."""
    from reporter.app import beat_command

    _exec(beat_command(ctx.args))


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def flower(ctx: click.Context) -> None:
    """Flower, the Celery web monitor (pip install 'reporter[flower]'). Extra arguments go to `celery flower`."""
    from reporter.app import celery_command

    _exec(celery_command("flower", *ctx.args))


@cli.command()
@click.option("--concurrency", "-c", type=click.IntRange(1), default=2, show_default=True, help="worker processes")
@click.pass_obj
@handles_errors
def run(obj: Context, concurrency: int) -> None:
    """Everything on the embedded defaults: a private Redis, a worker and beat. Ctrl-C stops it all."""
    from reporter.runner import run_all

    obj.config()  # refuse a broken config before starting anything
    sys.exit(run_all(obj.settings, concurrency))


def main() -> None:
    try:
        cli.main(prog_name="reporter", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(EXIT_INPUT)
    except click.ClickException as exc:
        # Usage errors are bad input: exit 1 (click's own default would be 2, our "delivery failed").
        exc.show()
        sys.exit(EXIT_INPUT)


if __name__ == "__main__":
    main()

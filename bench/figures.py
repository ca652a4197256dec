"""The figures of issue 11, each measured beside its baseline in the same run.

A figure is a function (Context) -> list[Row]. Sizes come from the context: --quick uses small ones.
"""

from __future__ import annotations

import multiprocessing
import os
import smtplib
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from functools import partial
from pathlib import Path

from bench import adapter
from bench.parts import Project, Sink, Spec, flush_redis, make_project, pg_database, recipients, rss_mib, running, worker_args
from bench.table import Row, Target


@dataclass
class Context:
    """What every figure shares: the temp folder, the private Redis, the SMTP sink, the run's size."""

    folder: Path
    redis_url: str
    sink: Sink
    quick: bool
    log: Callable[[str], None] = print
    notes: list[str] = field(default_factory=list)

    def attempt(self, label: str, measure: Callable[[], list[Row]]) -> list[Row]:
        """MEASURE's rows; if it raises (a config the loader refuses at this size, say), a note instead,
        so one size's failure does not lose the figure's other sizes."""
        try:
            return measure()
        except Exception as exc:  # noqa: BLE001 - any failure is reported, not hidden
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            self.notes.append(f"{label}: not measured: {type(exc).__name__}: {first[:300]}")
            self.log(f"  {label}: not measured: {type(exc).__name__}: {first[:300]}")
            return []

    def size(self, quick: int, full: int) -> int:
        return quick if self.quick else full

    def project(self, specs: list[Spec], dispatch_cron: str = "1 * * * *", ledger_url: str | None = None) -> Project:
        return make_project(self.folder, specs, dispatch_cron, ledger_url)

    def env(self, project: Project, **extra: str) -> dict[str, str]:
        return project.env(self.redis_url, self.sink.url, **extra)

    @contextmanager
    def runtime_for(self, project: Project) -> Iterator[object]:
        """A Runtime for PROJECT in this process (config loaded, ledger made), closed afterwards."""
        adapter.use_environment(self.env(project))
        rt = adapter.runtime()
        try:
            yield rt
        finally:
            adapter.close(rt)


def hour_floor(at: datetime) -> datetime:
    return at.replace(minute=0, second=0, microsecond=0)


def raw_sends(host: str, port: int, data: bytes, count: int) -> float:
    """Seconds for COUNT sends of DATA over one smtplib connection (the floor for any sender)."""
    started = time.perf_counter()
    with smtplib.SMTP(host, port) as smtp:
        for i in range(count):
            smtp.sendmail("reports@example.com", [f"raw{i}@example.com"], data)
    return time.perf_counter() - started


def raw_render(html: str, base: Path) -> float:
    """Seconds for one raw WeasyPrint render of HTML (no fetcher, no page style)."""
    import weasyprint

    started = time.perf_counter()
    weasyprint.HTML(string=html, base_url=str(base) + "/").write_pdf()
    return time.perf_counter() - started


# ----------------------------------------------------------------------------- one report to N recipients


def send50(ctx: Context) -> list[Row]:
    """One PDF report (the shipped sales-daily) to N recipients in one send_slot, rate limit lifted;
    vs 1 raw render + N raw sends of the same bytes, and vs rendering once per recipient."""
    n = ctx.size(5, 50)
    project = ctx.project([Spec("sales", kind="sales", recipients=recipients(n))])
    slot = hour_floor(datetime.now(UTC))
    with ctx.runtime_for(project) as rt:
        adapter.send_slot(rt, "sales", slot - timedelta(days=1), only=["r0@example.com"])  # warm: fonts, imports, seed
        ctx.sink.clear()
        started = time.perf_counter()
        result = adapter.send_slot(rt, "sales", slot)
        ours = time.perf_counter() - started
        assert adapter.sent_count(result) == n, result
        started = time.perf_counter()
        adapter.render(rt, "sales", slot)
        our_render = time.perf_counter() - started
        data = ctx.sink.raw[0]
        render = raw_render(adapter.pdf_html(rt, "sales", slot), project.root / "templates")
        send = raw_sends(ctx.sink.host, ctx.sink.port, data, n)
        # Naive: a whole render for each recipient, as Superset's legacy reports did.
        naive_slot = slot - timedelta(days=2)
        started = time.perf_counter()
        for r in recipients(n):
            adapter.send_slot(rt, "sales", naive_slot, only=[r])
        naive = time.perf_counter() - started
    per_recipient = max(ours - our_render, 0.0) / n
    return [
        Row(
            "send50",
            f"one PDF report to {n} recipients, rate limit lifted",
            ours,
            "s",
            render + send,
            f"1 raw WeasyPrint render ({render:.2f} s) + {n} raw SMTP sends of the same bytes",
            target=Target(1.3),
            note=f"its own render {our_render:.2f} s",
        ),
        Row(
            "send50",
            "  per recipient (send_slot − its render) ÷ N",
            per_recipient * 1000,
            "ms",
            send / n * 1000,
            "one raw SMTP send",
            target=Target(2.0),
        ),
        Row(
            "send50",
            f"  same, vs rendering once per recipient ({naive / ours:.1f}× faster)",
            ours,
            "s",
            naive,
            f"naive: {n} renders and sends",
        ),
    ]


# ----------------------------------------------------------------------------- one small HTML task


SMALL_HTML = "<!doctype html><html><body><h1>small</h1><table>{}</table></body></html>"


def small(ctx: Context) -> list[Row]:
    """One small HTML report to 1 recipient (render + claim + send + record) vs raw render + send."""
    import jinja2

    n = ctx.size(30, 200)
    project = ctx.project([Spec("small")])
    base = hour_floor(datetime.now(UTC))
    with ctx.runtime_for(project) as rt:
        for i in range(5):
            adapter.send_slot(rt, "small", base - timedelta(days=1, hours=i))
        started = time.perf_counter()
        for i in range(n):
            adapter.send_slot(rt, "small", base - timedelta(hours=i))
        ours = (time.perf_counter() - started) / n
    template = jinja2.Environment(autoescape=True).from_string(
        "{% for r in rows %}<tr><td>{{ r[0] }}</td><td>{{ r[1] }}</td></tr>{% endfor %}"
    )
    rows = [("North", 1.5), ("South", 2.25), ("East", 3.0)]
    started = time.perf_counter()
    for i in range(n):
        msg = EmailMessage()
        msg["Subject"], msg["From"], msg["To"] = f"Small {i}", "reports@example.com", "r0@example.com"
        msg.set_content("small")
        msg.add_alternative(SMALL_HTML.format(template.render(rows=rows)), subtype="html")
        with smtplib.SMTP(ctx.sink.host, ctx.sink.port) as smtp:
            smtp.send_message(msg)
    raw = (time.perf_counter() - started) / n
    return [
        Row(
            "small",
            "one small HTML report, 1 recipient (send_slot in-process)",
            ours * 1000,
            "ms",
            raw * 1000,
            "raw Jinja render + MIME + smtplib connect/send",
        )
    ]


# ----------------------------------------------------------------------------- config and validate


def big_project(ctx: Context, n: int, due_every: int = 1, ledger_url: str | None = None, rcpts: int = 5) -> Project:
    """N small reports with RCPTS recipients each; every DUE_EVERY-th runs hourly, the rest once a year."""
    specs = [
        Spec(f"r{i:05d}", "0 * * * *" if i % due_every == 0 else "30 3 1 1 *", recipients=recipients(rcpts, f"r{i}x")) for i in range(n)
    ]
    return ctx.project(specs, ledger_url=ledger_url)


def config(ctx: Context) -> list[Row]:
    """reporter.config.load and `reporter validate` of N reports; targets for 10,000: < 2 s and < 5 s."""
    out: list[Row] = []
    for n in [500] if ctx.quick else [1000, 5000, 10000]:
        out += ctx.attempt(f"config {n:,}", partial(_config_rows, ctx, n))
    return out


def _config_rows(ctx: Context, n: int) -> list[Row]:
    import subprocess
    import sys

    project = big_project(ctx, n)
    adapter.use_environment(ctx.env(project))
    started = time.perf_counter()
    adapter.load_config(project.config)
    load = time.perf_counter() - started
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "reporter", "validate"], env=ctx.env(project), capture_output=True, text=True)
    validate = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"validate failed: {done.stdout}{done.stderr}")
    at_target = n == 10000
    return [
        Row(
            "config",
            f"config load, {n:,} reports",
            load,
            "s",
            baseline_what="" if at_target else "target is for 10,000",
            target=Target(2.0, "value") if at_target else None,
            note=f"{load / n * 1000:.2f} ms per report",
        ),
        Row(
            "config",
            f"`reporter validate`, {n:,} reports",
            validate,
            "s",
            baseline_what="" if at_target else "target is for 10,000",
            target=Target(5.0, "value") if at_target else None,
        ),
    ]


# ----------------------------------------------------------------------------- dispatch


def _dispatch_once(ctx: Context, n: int, ledger_url: str, due_every: int, primed: bool) -> tuple[float, int]:
    """Seconds for one dispatcher run over N reports, and slots enqueued."""
    project = big_project(ctx, n, due_every, ledger_url)
    flush_redis(ctx.redis_url)
    start = hour_floor(datetime.now(UTC)) + timedelta(days=1)
    with ctx.runtime_for(project):
        if primed:
            # Steady state: the previous window was dispatched, so every report has a watermark.
            adapter.dispatch(start - timedelta(hours=1), start)
        started = time.perf_counter()
        enqueued = adapter.dispatch(start, start + timedelta(hours=1))
        took = time.perf_counter() - started
    flush_redis(ctx.redis_url)
    return took, enqueued


def dispatch(ctx: Context) -> list[Row]:
    """One dispatch with every report due (N × 5 recipients), SQLite and PostgreSQL ledgers, enqueue to Redis;
    and a steady-state dispatch on PostgreSQL with 1 % of them due."""
    from bench.parts import pg_available

    out: list[Row] = []
    why_no_pg = pg_available()
    if why_no_pg:
        ctx.notes.append(f"PostgreSQL figures skipped: {why_no_pg}")
    for n in [200] if ctx.quick else [1000, 10000]:
        out += ctx.attempt(f"dispatch {n:,} all due, SQLite", partial(_dispatch_row, ctx, n, "SQLite", 1))
        if not why_no_pg:
            out += ctx.attempt(f"dispatch {n:,} all due, PostgreSQL", partial(_dispatch_row, ctx, n, "PostgreSQL", 1))
            out += ctx.attempt(f"dispatch {n:,} 1 % due, PostgreSQL", partial(_dispatch_row, ctx, n, "PostgreSQL", 100))
    return out


def _dispatch_row(ctx: Context, n: int, database: str, due_every: int) -> list[Row]:
    ctx.log(f"  dispatch {n:,}, {'all' if due_every == 1 else '1 %'} due, {database}")
    primed = due_every != 1
    if database == "SQLite":
        took, enqueued = _dispatch_once(ctx, n, f"sqlite:///{ctx.folder / f'dispatch-{uuid.uuid4().hex[:6]}.db'}", due_every, primed)
    else:
        with pg_database() as url:
            took, enqueued = _dispatch_once(ctx, n, url, due_every, primed)
    at_target = n == 10000 and database == "PostgreSQL"
    what = (
        f"dispatch {n:,} reports × 5, all due, {database}" if not primed else f"dispatch {n:,} reports, 1 % due, {database} (steady state)"
    )
    return [
        Row(
            "dispatch",
            what,
            took,
            "s",
            baseline_what="target is for 10,000 on PostgreSQL" if database == "PostgreSQL" and not at_target else "",
            target=(Target(1.0 if primed else 10.0, "value") if at_target else None),
            note=f"{enqueued:,} slots enqueued",
        )
    ]


# ----------------------------------------------------------------------------- real workers


def _sales_html(ctx: Context, project: Project, report: str, slot: datetime) -> str:
    with ctx.runtime_for(project) as rt:
        return adapter.pdf_html(rt, report, slot)


def slot40(ctx: Context) -> list[Row]:
    """N distinct PDF reports due in one slot, dispatched to a 2-process `reporter worker`;
    vs Σ raw renders ÷ 2 + the raw sends."""
    n = ctx.size(4, 40)
    rcpts = 2
    project = ctx.project([Spec(f"sales{i:02d}", "* * * * *", "sales", recipients(rcpts, f"s{i}x")) for i in range(n)])
    flush_redis(ctx.redis_url)
    ctx.sink.clear()
    with running(worker_args(2), ctx.env(project), ctx.folder / "slot40-worker.log") as worker:
        worker.wait_ready(180)
        # Warm both pool processes (imports, fonts, the warehouse seed) with a slot of their own.
        warm = hour_floor(datetime.now(UTC)) - timedelta(days=1)
        with ctx.runtime_for(project) as rt:
            adapter.enqueue(rt, "sales00", warm)
            adapter.enqueue(rt, "sales01", warm)
        ctx.sink.wait_for(2 * rcpts, 120)
        ctx.sink.clear()
        now = datetime.now(UTC)
        minute = now.replace(second=0, microsecond=0)
        with ctx.runtime_for(project):
            started = time.time()
            enqueued = adapter.dispatch(minute, minute + timedelta(minutes=1))
            last = ctx.sink.wait_for(n * rcpts, 600)
        ours = last - started
    assert enqueued == n, enqueued
    html = _sales_html(ctx, project, "sales00", minute)
    renders = sum(raw_render(html, project.root / "templates") for _ in range(n))
    sends = raw_sends(ctx.sink.host, ctx.sink.port, ctx.sink.raw[0], n * rcpts)
    return [
        Row(
            "slot40",
            f"{n} distinct PDF reports × {rcpts} recipients in one slot, 2 worker processes",
            ours,
            "s",
            renders / 2 + sends,
            f"Σ raw renders ({renders:.1f} s) ÷ 2 + {n * rcpts} raw sends",
            target=Target(1.1),
        )
    ]


def _raw_blast(args: tuple[str, int, bytes, int]) -> float:
    host, port, data, count = args
    return raw_sends(host, port, data, count)


def throughput(ctx: Context) -> list[Row]:
    """Sustained HTML deliveries per second, rate limit lifted, a 2-process worker; vs raw smtplib from 2 processes."""
    tasks, rcpts = ctx.size(10, 100), 20
    project = ctx.project([Spec("tp", "* * * * *", recipients=recipients(rcpts))])
    flush_redis(ctx.redis_url)
    ctx.sink.clear()
    base = hour_floor(datetime.now(UTC))
    with running(worker_args(2), ctx.env(project), ctx.folder / "throughput-worker.log") as worker:
        worker.wait_ready(180)
        with ctx.runtime_for(project) as rt:
            for i in range(tasks):
                adapter.enqueue(rt, "tp", base - timedelta(minutes=i + 1))
            total = tasks * rcpts
            ctx.sink.wait_for(total, 600)
    times = sorted(t for t, _ in ctx.sink.arrivals)
    # Sustained: from the 10th percentile message on, past the start-up of both pool processes.
    first = times[len(times) // 10]
    ours = (len(times) - len(times) // 10 - 1) / (times[-1] - first)
    data = ctx.sink.raw[0]
    per = total // 2
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        started = time.perf_counter()
        pool.map(_raw_blast, [(ctx.sink.host, ctx.sink.port, data, per)] * 2)
        raw = 2 * per / (time.perf_counter() - started)
    return [
        Row(
            "throughput",
            "HTML deliveries per second, rate limit lifted, 2 worker processes",
            ours,
            "/s",
            raw,
            "raw smtplib, 2 processes, one connection each",
            higher_is_better=True,
            note=f"{total:,} messages",
        )
    ]


def rss(ctx: Context) -> list[Row]:
    """A pool process's RSS after 10 and after N PDF renders, never recycled (one process)."""
    n = ctx.size(20, 300)
    project = ctx.project([Spec("sales", "* * * * *", "sales")])
    flush_redis(ctx.redis_url)
    ctx.sink.clear()
    base = hour_floor(datetime.now(UTC))
    no_recycling = ["--max-tasks-per-child", "1000000", "--max-memory-per-child", "100000000"]
    with running(worker_args(1, *no_recycling), ctx.env(project), ctx.folder / "rss-worker.log") as worker:
        worker.wait_ready(180)
        with ctx.runtime_for(project) as rt:
            for i in range(n):
                adapter.enqueue(rt, "sales", base - timedelta(minutes=i + 1))
        ctx.sink.wait_for(10, 300)
        time.sleep(0.3)  # the 10th task records its row after the server accepted
        (child,) = worker.pool_children()
        at_10 = rss_mib(child)
        ctx.sink.wait_for(n, 1200)
        time.sleep(0.5)
        children = worker.pool_children()
        at_n = rss_mib(children[0])
    if children != [child]:
        ctx.notes.append(f"rss: the pool process was replaced ({child} -> {children})")
    return [
        Row(
            "rss",
            f"pool process RSS after {n} PDF renders, no recycling",
            at_n,
            "MiB",
            at_10,
            "after 10 renders",
            target=Target(1.15),
            note=f"+{(at_n - at_10) / (n - 10):.2f} MiB per render",
        )
    ]


def _worker_ready_and_send(ctx: Context, n: int, tag: str) -> tuple[float, float, list[float], int]:
    """Start `reporter worker` (its defaults) with N reports; (ready s, RSS MiB of a child, seconds per send, pool replacements)."""
    project = big_project(ctx, n, rcpts=1)
    flush_redis(ctx.redis_url)
    ctx.sink.clear()
    base = hour_floor(datetime.now(UTC))
    sends: list[float] = []
    with running(worker_args(1), ctx.env(project), ctx.folder / f"worker-{tag}.log") as worker:
        ready = worker.wait_ready(600)
        children = worker.pool_children()
        with ctx.runtime_for(project) as rt:
            for i in range(3):
                started = time.time()
                adapter.enqueue(rt, "r00000", base - timedelta(hours=i + 1))
                sends.append(ctx.sink.wait_for(i + 1, 600) - started)
        after = worker.pool_children()
        memory = max((rss_mib(c) for c in after), default=0.0)
    return ready, memory, sends, len(set(after) - set(children))


def worker20k(ctx: Context) -> list[Row]:
    """A `reporter worker` with 20,000 reports: ready after, and each send's time; vs the same with 1 report."""
    n = ctx.size(1000, 20000)
    return ctx.attempt(f"worker with {n:,} reports", partial(_worker_rows, ctx, n))


def _worker_rows(ctx: Context, n: int) -> list[Row]:
    small_ready, small_rss, small_sends, _ = _worker_ready_and_send(ctx, 1, "1")
    ready, memory, sends, replaced = _worker_ready_and_send(ctx, n, str(n))
    return [
        Row(
            "worker20k",
            f"`reporter worker -c 1`, {n:,} reports: ready after",
            ready,
            "s",
            small_ready,
            "the same worker with 1 report",
            target=Target(10.0, "value") if n == 20000 else None,
            note="target: ready in seconds",
        ),
        Row(
            "worker20k",
            f"  then one send, enqueue → SMTP accepted (median of {len(sends)})",
            statistics.median(sends),
            "s",
            statistics.median(small_sends),
            "with 1 report",
            note=f"pool processes replaced during the sends: {replaced}; child RSS {memory:.0f} MiB vs {small_rss:.0f} MiB",
        ),
    ]


# ----------------------------------------------------------------------------- slot to inbox, beat + worker

ETA_APP = "bench.eta_app"


def latency(ctx: Context) -> list[Row]:
    """Slot → SMTP accepted for minutely HTML reports under `reporter beat` + `reporter worker`; vs Celery's own ETA lateness."""
    import redis

    seconds = ctx.size(75, 200)
    reports = 3
    project = ctx.project([Spec(f"m{i}", "* * * * *") for i in range(reports)], dispatch_cron="* * * * *")
    flush_redis(ctx.redis_url)
    ctx.sink.clear()
    env = ctx.env(project)
    begun = datetime.now(UTC)
    with (
        running(worker_args(2), env, ctx.folder / "latency-worker.log") as worker,
        running(["-m", "reporter", "beat", "-s", str(ctx.folder / "beat-schedule")], env, ctx.folder / "latency-beat.log"),
    ):
        worker.wait_ready(180)
        time.sleep(seconds)
    lateness = []
    for at, subject in list(ctx.sink.arrivals):
        slot = datetime.fromisoformat(subject.removeprefix("Small ").strip())
        if slot > begun:
            lateness.append(at - slot.timestamp())
    # Baseline: how late Celery itself runs a trivial task with an ETA, on the same Redis and machine.
    flush_redis(ctx.redis_url)
    eta_env = {**env, "BENCH_BROKER_URL": ctx.redis_url}
    with running(
        ["-m", "celery", "-A", ETA_APP, "worker", "-c", "1", "--loglevel", "INFO", "--without-mingle", "--without-gossip"],
        eta_env,
        ctx.folder / "eta.log",
    ) as eta:
        eta.wait_ready(120)
        os.environ["BENCH_BROKER_URL"] = ctx.redis_url  # before the app is first imported here
        from bench.eta_app import KEY, stamp

        count = 30
        for i in range(count):
            at = time.time() + 2 + i * 0.2
            stamp.apply_async(args=(at,), eta=datetime.fromtimestamp(at, UTC))
        client = redis.Redis.from_url(ctx.redis_url)
        deadline = time.monotonic() + 60
        while client.llen(KEY) < count and time.monotonic() < deadline:
            time.sleep(0.2)
        eta_late = [float(x) for x in client.lrange(KEY, 0, -1)]
        client.close()
    if not lateness:
        raise RuntimeError(f"no minutely report arrived in {seconds} s")
    q = statistics.quantiles(lateness, n=100, method="inclusive") if len(lateness) > 1 else [lateness[0]] * 99
    eta_p50 = statistics.median(eta_late) if eta_late else None
    return [
        Row(
            "latency",
            f"slot → SMTP accepted, minutely HTML, beat + worker: p50 (n={len(lateness)})",
            q[49],
            "s",
            eta_p50,
            "Celery ETA lateness p50",
        ),
        Row("latency", "  p95", q[94], "s"),
        Row("latency", "  p99", q[98], "s", target=Target(2.0, "value")),
    ]


FIGURES: dict[str, Callable[[Context], list[Row]]] = {
    "small": small,
    "send50": send50,
    "config": config,
    "throughput": throughput,
    "slot40": slot40,
    "worker20k": worker20k,
    "dispatch": dispatch,
    "latency": latency,
    "rss": rss,
}
"""Every figure by its --only name, in the order a run measures them (quickest first)."""

"""The delivery ledger: one row per (report, slot, recipient), the source of truth for exactly-once.

A row is claimed by one atomic conditional UPDATE that stamps it with the claimant's token; whoever's
token is on the row may send. `sent` is final. A claim older than the hard time limit belongs to a
process that was killed, and can be taken over.
"""

from __future__ import annotations

import functools
import sqlite3
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from reporter.alert import Evaluation, from_json, to_json

QUEUED, RENDERING, SENDING, SENT, FAILED, SKIPPED = "queued", "rendering", "sending", "sent", "failed", "skipped"
NOT_SENT = "not-sent"
"""Final: decided on purpose that this slot sends nothing to the recipient (an alert whose condition
was false); the row's error says why."""
PLANNED = "planned"
"""Final: the planning row of a burst slot (its recipient is not an address), once the readers' own
rows are made; its error says how many readers, in how many pieces."""
STATUSES = (QUEUED, RENDERING, SENDING, SENT, FAILED, SKIPPED, NOT_SENT, PLANNED)
FINAL = (SENT, FAILED, SKIPPED, NOT_SENT, PLANNED)
IN_FLIGHT = (RENDERING, SENDING)


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, whatever the database keeps."""

    impl = sa.DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the ledger")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


metadata = sa.MetaData()

deliveries = sa.Table(
    "deliveries",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("report", sa.String(200), nullable=False),
    sa.Column("slot", UTCDateTime, nullable=False),
    sa.Column("recipient", sa.String(320), nullable=False),
    sa.Column("status", sa.String(16), nullable=False, default=QUEUED),
    sa.Column("trigger", sa.String(16), nullable=False, default="schedule"),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("message_id", sa.String(400)),
    sa.Column("error", sa.Text),
    sa.Column("claim_token", sa.String(64)),
    sa.Column("task_id", sa.String(64)),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Column("claimed_at", UTCDateTime),
    sa.Column("sent_at", UTCDateTime),
    sa.Column("duration_ms", sa.Integer),
    sa.Column("size_bytes", sa.Integer),
    sa.Column("wait_ms", sa.Integer),
    sa.Column("config_version", sa.String(16)),
    sa.Column("params", sa.Text),
    sa.UniqueConstraint("report", "slot", "recipient", name="uq_delivery_key"),
    sa.Index("ix_deliveries_status_claimed", "status", "claimed_at"),
    sa.Index("ix_deliveries_created", "created_at"),
)


marks = sa.Table(
    "dispatch_marks",
    metadata,
    sa.Column("report", sa.String(200), primary_key=True),
    sa.Column("covered_until", UTCDateTime, nullable=False),
)
"""How far the dispatcher has enqueued each report: where a catch-up after downtime starts."""


config_versions = sa.Table(
    "config_versions",
    metadata,
    sa.Column("version", sa.String(16), primary_key=True),
    sa.Column("seen_at", UTCDateTime, nullable=False),
    sa.Column("source", sa.Text, nullable=False),
)
"""Every configuration version a process loaded: when it was last loaded from the file, and its content
(schedules.yaml and templates, as JSON), so a worker can render a send with the version it was
dispatched under even when its own copy of the file is older or broken."""

ADDED_COLUMNS = {"wait_ms": "INTEGER", "config_version": "VARCHAR(16)", "params": "TEXT"}
"""Columns added to `deliveries` after its first release: `create` adds them to an older ledger."""


notices = sa.Table(
    "owner_notices",
    metadata,
    sa.Column("report", sa.String(200), primary_key=True),
    sa.Column("last_at", UTCDateTime, nullable=False),
)
"""When each report's owners were last told of a failure: notices are throttled per report."""


leases = sa.Table(
    "leases",
    metadata,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("holder", sa.Text, nullable=False),
    sa.Column("expires_at", UTCDateTime, nullable=False),
)
"""Named leases (beat's leadership when the broker is not Redis): one holder until `expires_at`."""


evaluations = sa.Table(
    "alert_evaluations",
    metadata,
    sa.Column("report", sa.String(200), primary_key=True),
    sa.Column("slot", UTCDateTime, primary_key=True),
    sa.Column("held", sa.Boolean, nullable=False),
    sa.Column("value", sa.Text),
    sa.Column("rows", sa.Text, nullable=False),
    sa.Column("row_count", sa.Integer, nullable=False),
    sa.Column("capped", sa.Boolean, nullable=False),
    sa.Column("decision", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("held_since", UTCDateTime),
    sa.Column("last_alert", UTCDateTime),
    sa.Column("evaluated_at", UTCDateTime, nullable=False),
)
"""The first evaluation of each alert slot (reporter/alert.py): that slot's truth for every later
execution, and the next slot's `previous`. Values and rows are JSON (rows capped at alert.ROWS_KEPT)."""


@dataclass(frozen=True)
class Row:
    """A ledger row as read back."""

    id: int
    report: str
    slot: datetime
    recipient: str
    status: str
    trigger: str
    attempts: int
    message_id: str | None
    error: str | None
    created_at: datetime
    updated_at: datetime
    claimed_at: datetime | None
    sent_at: datetime | None
    duration_ms: int | None
    """Milliseconds of the SMTP (or Maildir) transaction, the wait for the rate limit not included"""
    size_bytes: int | None
    wait_ms: int | None
    """Milliseconds the send waited for the rate limit"""
    config_version: str | None
    """The configuration version of the execution that last claimed the row (and sent it)"""
    params: str | None = None
    """A burst reader's address and parameters (JSON), as its planning found them"""


@dataclass(frozen=True)
class Stuck:
    """A row the sweep must act on."""

    report: str
    slot: datetime
    recipient: str
    attempts: int
    dead: bool
    """True: claimed by an execution that died; False: queued, its task lost."""
    trigger: str = "schedule"
    """What made the row (schedule, or manual for a send-now): its new task is the same kind."""


@dataclass(frozen=True)
class Claim:
    """The outcome of trying to claim a slot's rows for one task execution."""

    token: str
    mine: tuple[str, ...]
    """Recipients this execution now holds and may send to."""
    busy: tuple[str, ...]
    """Recipients another live execution holds; try again after `busy_until`."""
    done: tuple[str, ...]
    """Recipients already in a final state."""
    busy_until: datetime | None


def now() -> datetime:
    return datetime.now(UTC)


def _key(report: str, slot: datetime, recipients: Sequence[str]) -> Any:
    """The rows of RECIPIENTS for (REPORT, SLOT)."""
    return (deliveries.c.report == report) & (deliveries.c.slot == slot) & deliveries.c.recipient.in_(list(recipients))


@functools.cache
def _held_update(*columns: str) -> Any:
    """UPDATE … SET COLUMNS WHERE the rows are (report, slot, recipients) held in flight by a token.

    Built once per set of columns with bound parameters (k_* for the key, v_* for the values), so the
    per-message writes do not rebuild and re-compile the expression: SQLAlchemy caches the compiled form.
    """
    c = deliveries.c
    where = (
        (c.report == sa.bindparam("k_report"))
        & (c.slot == sa.bindparam("k_slot", type_=UTCDateTime))
        & c.recipient.in_(sa.bindparam("k_recipients", expanding=True))
        & (c.claim_token == sa.bindparam("k_token"))
        & c.status.in_(IN_FLIGHT)
    )
    values = {name: sa.bindparam(f"v_{name}", type_=c[name].type) for name in (*columns, "updated_at")}
    return deliveries.update().where(where).values(values)


BATCH = 500
"""Names per IN (...) list: well under every database's limit on bound parameters (SQLite's is 32,766)."""


_T = TypeVar("_T")


def _batches(names: list[_T]) -> Iterator[list[_T]]:
    for i in range(0, len(names), BATCH):
        yield names[i : i + BATCH]


SQLITE_WAIT = 30.0
"""Seconds a SQLite connection waits for another process's lock before it fails."""


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    # busy_timeout makes writers queue, not fail; WAL lets the CLI read history while workers write.
    cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_WAIT * 1000)}")
    # Switching a new file to WAL takes an exclusive lock that SQLite does not wait for, even with a
    # busy timeout: beat and the workers opening a new ledger together would fail. Wait for it here.
    deadline = time.monotonic() + SQLITE_WAIT
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    # In WAL mode NORMAL syncs the log at checkpoints, not at every commit: a commit survives the
    # process being killed (it is in the OS's cache), and only an OS crash or power cut can undo the
    # newest commits -- as a whole suffix, so the ledger is then an earlier consistent state. Every
    # row then sits in a state it held before, and each such state leads to a send, never to none:
    # a `sent` undone is `sending` again and is resent once its claim is stale (the at-least-once
    # window of docs/reliability.md, widened by a power cut only); an undone claim is claimed again
    # (its holder died in the same power cut: a SQLite ledger lives on one machine). FULL cost one
    # fsync per commit, two per message: 5x the SMTP transaction it records.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_engine(url: str) -> Engine:
    """An engine for the ledger; SQLite files get their folder created and WAL mode."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(parsed, connect_args={"timeout": SQLITE_WAIT})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return sa.create_engine(parsed, pool_pre_ping=True)


class Ledger:
    """Reads and writes delivery rows. Takes its engine; only the CLI and tasks build one."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    def from_url(cls, url: str) -> Ledger:
        ledger = cls(make_engine(url))
        ledger.create()
        return ledger

    def create(self) -> None:
        """Create the tables if they are not there, and add newer columns to an older ledger
        (safe to call from many processes at once)."""
        for attempt in range(len(metadata.tables) + 1):
            try:
                metadata.create_all(self.engine)
                break
            except (IntegrityError, sa.exc.ProgrammingError, sa.exc.OperationalError):
                # Another process created a table between our check and our CREATE. It is creating the
                # same tables one by one, so look again (each failed try means it made progress).
                if attempt == len(metadata.tables):
                    raise
        for name, kind in ADDED_COLUMNS.items():
            if name in {c["name"] for c in sa.inspect(self.engine).get_columns("deliveries")}:
                continue
            try:
                with self.engine.begin() as conn:
                    conn.execute(sa.text(f"ALTER TABLE deliveries ADD COLUMN {name} {kind}"))
            except (sa.exc.ProgrammingError, sa.exc.OperationalError):
                # Another process added it first; anything else shows on the next statement.
                if name not in {c["name"] for c in sa.inspect(self.engine).get_columns("deliveries")}:
                    raise

    # ----------------------------------------------------------------- writing

    def ensure(self, report: str, slot: datetime, recipients: Iterable[str], trigger: str = "schedule") -> int:
        """Insert a queued row for each recipient that has none; return how many were new."""
        return self.ensure_many([(report, slot, recipients)], trigger)

    def ensure_many(self, wanted: Iterable[tuple[str, datetime, Iterable[str]]], trigger: str = "schedule") -> int:
        """Insert a queued row for each (report, slot, recipient) of WANTED that has none, in one
        transaction of batched statements; return how many were new. Existing rows are left alone."""
        stamp = now()
        values: list[dict[str, Any]] = [
            {
                "report": report,
                "slot": slot,
                "recipient": r,
                "status": QUEUED,
                "trigger": trigger,
                "attempts": 0,
                "created_at": stamp,
                "updated_at": stamp,
            }
            for report, slot, recipients in wanted
            for r in dict.fromkeys(recipients)
        ]
        if not values:
            return 0
        if self.engine.dialect.name == "postgresql" and all(v["slot"].tzinfo is not None for v in values):
            return self._ensure_many_pg(values)  # a naive slot goes the general way, which refuses it
        with self.engine.begin() as conn:
            stmt = self._insert_ignore()
            if self.engine.dialect.name == "sqlite":
                # rowcount of a batch insert is -1 on psycopg; count the rows actually inserted.
                # SQLAlchemy sends many rows per INSERT ("insertmanyvalues"), not one statement per row.
                return len(conn.execute(stmt.returning(deliveries.c.id), values).all())
            result = conn.execute(stmt, values)
            return max(result.rowcount or 0, 0)

    def ensure_readers(self, report: str, slot: datetime, readers: Mapping[str, str], trigger: str = "schedule") -> list[str]:
        """Insert a queued row for each burst reader of READERS (key -> its params as JSON) that has none;
        a row that exists keeps its params and status. Return the keys inserted."""
        return self._insert_absent(report, slot, {k: {"status": QUEUED, "params": p} for k, p in readers.items()}, trigger)

    def record_failed(self, report: str, slot: datetime, errors: Mapping[str, str], trigger: str = "schedule") -> list[str]:
        """Insert a `failed` row for each key of ERRORS (key -> why) that has no row, e.g. a malformed burst
        row; an existing row is left alone. Return the keys inserted."""
        return self._insert_absent(report, slot, {k: {"status": FAILED, "error": e[:4000]} for k, e in errors.items()}, trigger)

    def _insert_absent(self, report: str, slot: datetime, rows: Mapping[str, dict[str, Any]], trigger: str) -> list[str]:
        """Insert ROWS (key -> column values) that have no row yet, in one transaction; return the keys
        this call inserted (not those a concurrent caller inserted first)."""
        if not rows:
            return []
        stamp = now()
        values = [
            {"report": report, "slot": slot, "recipient": k, "trigger": trigger, "attempts": 0, "created_at": stamp, "updated_at": stamp}
            | {"status": QUEUED, "error": None, "params": None}
            | extra
            for k, extra in rows.items()
        ]
        with self.engine.begin() as conn:
            stmt = self._insert_ignore()
            if self.engine.dialect.name in ("sqlite", "postgresql"):
                return list(conn.execute(stmt.returning(deliveries.c.recipient), values).scalars())
            before: set[str] = set()
            for batch in _batches(list(rows)):
                before.update(conn.execute(sa.select(deliveries.c.recipient).where(_key(report, slot, batch))).scalars())
            conn.execute(stmt, values)
            return [k for k in rows if k not in before]

    def expect(self, report: str, slot: datetime, recipients: Sequence[str], at: datetime) -> int:
        """RECIPIENTS' rows still queued wait for a task that starts at AT (a burst piece's countdown):
        their `updated_at` says so, and the sweep takes them for lost only a grace period after it."""
        with self.engine.begin() as conn:
            changed = 0
            for batch in _batches(list(recipients)):
                rows = _key(report, slot, batch) & (deliveries.c.status == QUEUED)
                changed += conn.execute(deliveries.update().where(rows).values(updated_at=at)).rowcount or 0
            return changed

    def params_of(self, report: str, slot: datetime, recipients: Sequence[str]) -> dict[str, str | None]:
        """The stored params (JSON) of RECIPIENTS' rows of (REPORT, SLOT)."""
        out: dict[str, str | None] = {}
        with self.engine.connect() as conn:
            for batch in _batches(list(recipients)):
                query = sa.select(deliveries.c.recipient, deliveries.c.params).where(_key(report, slot, batch))
                out.update({r.recipient: r.params for r in conn.execute(query)})
        return out

    def statuses(self, report: str, slot: datetime) -> dict[str, str]:
        """Recipient -> status of every row of (REPORT, SLOT)."""
        query = sa.select(deliveries.c.recipient, deliveries.c.status).where((deliveries.c.report == report) & (deliveries.c.slot == slot))
        with self.engine.connect() as conn:
            return {r.recipient: r.status for r in conn.execute(query)}

    def _ensure_many_pg(self, values: list[dict[str, Any]]) -> int:
        """ensure_many's insert on PostgreSQL: one statement whose rows come from arrays (unnest), so the
        driver sends a short query and one array per column instead of a placeholder per value (50,000
        rows made psycopg spend seconds scanning multi-row VALUES lists)."""
        naive = [v["slot"].astimezone(UTC).replace(tzinfo=None) for v in values]
        stamp = values[0]["created_at"].astimezone(UTC).replace(tzinfo=None)
        with self.engine.begin() as conn:
            result = conn.exec_driver_sql(
                'INSERT INTO deliveries (report, slot, recipient, status, "trigger", attempts, created_at, updated_at) '
                "SELECT r, s, a, %(status)s, %(trigger)s, 0, %(stamp)s, %(stamp)s "
                "FROM unnest(%(reports)s::varchar[], %(slots)s::timestamp[], %(recipients)s::varchar[]) AS t(r, s, a) "
                "ON CONFLICT (report, slot, recipient) DO NOTHING",
                {
                    "status": QUEUED,
                    "trigger": values[0]["trigger"],
                    "stamp": stamp,
                    "reports": [v["report"] for v in values],
                    "slots": naive,
                    "recipients": [v["recipient"] for v in values],
                },
            )
            return max(result.rowcount, 0)

    def _insert_ignore(self) -> Any:
        return self._insert_ignore_into(deliveries)

    def _insert_ignore_into(self, table: sa.Table) -> Any:
        """INSERT into TABLE that skips rows whose key exists (the database's own ON CONFLICT DO NOTHING)."""
        dialect = self.engine.dialect.name
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            return pg_insert(table).on_conflict_do_nothing()
        if dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            return sqlite_insert(table).on_conflict_do_nothing()
        return table.insert().prefix_with("IGNORE")  # MySQL/MariaDB

    def claim(
        self,
        report: str,
        slot: datetime,
        recipients: Sequence[str],
        stale_after: float,
        task_id: str | None = None,
        attempt: bool = True,
        config_version: str | None = None,
    ) -> Claim:
        """Atomically take every claimable row of RECIPIENTS for this execution.

        Claimable: queued, or in flight with a claim older than STALE_AFTER seconds (its holder died).
        ATTEMPT=False claims only to record an outcome (giving up), which is not another try.
        """
        token = uuid.uuid4().hex
        stamp = now()
        cutoff = stamp - timedelta(seconds=stale_after)
        key = _key(report, slot, recipients)
        claimable = (deliveries.c.status == QUEUED) | (deliveries.c.status.in_(IN_FLIGHT) & (deliveries.c.claimed_at < cutoff))
        with self.engine.begin() as conn:
            conn.execute(
                deliveries.update()
                .where(key & claimable)
                .values(
                    status=RENDERING,
                    claim_token=token,
                    claimed_at=stamp,
                    updated_at=stamp,
                    attempts=deliveries.c.attempts + (1 if attempt else 0),
                    task_id=task_id,
                    **({"config_version": config_version} if config_version else {}),
                )
            )
            rows = conn.execute(
                sa.select(deliveries.c.recipient, deliveries.c.status, deliveries.c.claim_token, deliveries.c.claimed_at).where(key)
            ).all()
        mine = tuple(r.recipient for r in rows if r.claim_token == token and r.status == RENDERING)
        done = tuple(r.recipient for r in rows if r.status in FINAL)
        busy_rows = [r for r in rows if r.claim_token != token and r.status in IN_FLIGHT]
        busy_until = max((r.claimed_at for r in busy_rows), default=None)
        return Claim(
            token=token,
            mine=mine,
            busy=tuple(r.recipient for r in busy_rows),
            done=done,
            busy_until=None if busy_until is None else busy_until.replace(tzinfo=UTC) + timedelta(seconds=stale_after),
        )

    def _set(self, where: Any, **values: Any) -> int:
        """UPDATE the rows WHERE matches; return how many changed."""
        with self.engine.begin() as conn:
            return conn.execute(deliveries.update().where(where).values(updated_at=now(), **values)).rowcount or 0

    def _update(self, token: str, report: str, slot: datetime, recipients: Sequence[str], **values: Any) -> int:
        """UPDATE the rows of RECIPIENTS that TOKEN holds and that are still in flight (sent, failed and
        skipped are final), in one statement and one transaction; return how many changed."""
        statement = _held_update(*sorted(values))
        params = {f"v_{name}": value for name, value in values.items()}
        params.update(k_report=report, k_slot=slot, k_recipients=list(recipients), k_token=token, v_updated_at=now())
        with self.engine.begin() as conn:
            return conn.execute(statement, params).rowcount or 0

    def mark_sending(self, token: str, report: str, slot: datetime, recipients: Sequence[str], message_id: str) -> int:
        """Rows about to be in an SMTP transaction; 0 if the claim was taken over (do not send)."""
        return self._update(token, report, slot, recipients, status=SENDING, message_id=message_id)

    def mark_sent(
        self,
        token: str,
        report: str,
        slot: datetime,
        recipients: Sequence[str],
        message_id: str,
        duration_ms: int,
        size_bytes: int,
        wait_ms: int | None = None,
    ) -> int:
        stamp = now()
        return self._update(
            token,
            report,
            slot,
            recipients,
            status=SENT,
            message_id=message_id,
            error=None,
            sent_at=stamp,
            duration_ms=duration_ms,
            size_bytes=size_bytes,
            wait_ms=wait_ms,
        )

    def mark_planned(self, token: str, report: str, slot: datetime, recipients: Sequence[str], summary: str) -> int:
        """The planning row of a burst slot is done: its readers' rows are made and enqueued (final)."""
        return self._update(token, report, slot, recipients, status=PLANNED, error=summary[:4000])

    def mark_failed(self, token: str, report: str, slot: datetime, recipients: Sequence[str], error: str) -> int:
        return self._update(token, report, slot, recipients, status=FAILED, error=error[:4000])

    def mark_not_sent(self, token: str, report: str, slot: datetime, recipients: Sequence[str], reason: str) -> int:
        """Record claimed RECIPIENTS as `not-sent` (final) on purpose, with REASON (an alert's decision)."""
        return self._update(token, report, slot, recipients, status=NOT_SENT, error=reason[:4000])

    def release(self, token: str, report: str, slot: datetime, recipients: Sequence[str], error: str) -> int:
        """Give the rows back (queued) after a transient failure, keeping the error for history."""
        return self._update(token, report, slot, recipients, status=QUEUED, error=error[:4000], claim_token=None, claimed_at=None)

    def hand_back(self, token: str, report: str, slot: datetime, recipients: Sequence[str], why: str) -> int:
        """Give back rows TOKEN claimed and never tried (a burst piece's hand-on): queued, without the
        attempt their claim counted, so that `attempts` counts real tries and the sweep's give-up is not
        reached by waiting. Guarded like `_update`: only rows TOKEN still holds in flight change."""
        c = deliveries.c
        held = _key(report, slot, recipients) & (c.claim_token == token) & c.status.in_(IN_FLIGHT)
        values = {"status": QUEUED, "error": why[:4000], "claim_token": None, "claimed_at": None}
        return self._set(held, attempts=sa.case((c.attempts > 0, c.attempts - 1), else_=0), **values)

    def mark_skipped(self, report: str, slot: datetime, recipients: Sequence[str], why: str) -> int:
        return self._set(_key(report, slot, recipients) & (deliveries.c.status == QUEUED), status=SKIPPED, error=why)

    def skip_slot(self, report: str, slot: datetime, why: str) -> int:
        """Record every still-queued row of (REPORT, SLOT) as skipped, whoever its recipient."""
        return self._set(
            (deliveries.c.report == report) & (deliveries.c.slot == slot) & (deliveries.c.status == QUEUED), status=SKIPPED, error=why
        )

    def stuck(self, stale_before: datetime, queued_before: datetime, retry_before: datetime) -> list[Stuck]:
        """Rows that need a new task:
        - dead: claimed before STALE_BEFORE, so their holder can no longer be running;
        - lost: queued for a slot before QUEUED_BEFORE and never tried, untouched since QUEUED_BEFORE;
        - lost retry: handed back after an attempt and untouched since RETRY_BEFORE (longer than
          any retry countdown), so the retry message is gone.
        Lost rows are stamped, so that a backlog is not re-enqueued on every sweep."""
        dead = deliveries.c.status.in_(IN_FLIGHT) & (deliveries.c.claimed_at < stale_before)
        waiting = (deliveries.c.status == QUEUED) & (deliveries.c.slot < queued_before)
        lost = waiting & (
            ((deliveries.c.attempts == 0) & (deliveries.c.updated_at < queued_before))
            | ((deliveries.c.attempts > 0) & (deliveries.c.updated_at < retry_before))
        )
        c = deliveries.c
        columns = (c.id, c.report, c.slot, c.recipient, c.attempts, c.status, c.trigger)
        with self.engine.begin() as conn:
            rows = conn.execute(sa.select(*columns).where(dead | lost)).all()
            stamp = now()
            # In batches: a burst can leave thousands of rows stuck at once, more than a database binds.
            for batch in _batches([r.id for r in rows]):
                conn.execute(deliveries.update().where(deliveries.c.id.in_(batch) & lost).values(updated_at=stamp))
        return [Stuck(r.report, r.slot, r.recipient, r.attempts, r.status in IN_FLIGHT, r.trigger) for r in rows]

    def requeue_dead(self, report: str, slot: datetime, recipients: Sequence[str], stale_before: datetime) -> int:
        """Hand RECIPIENTS' rows that are in flight with a claim older than STALE_BEFORE (their holder died)
        back to queued, for a new task; a row claimed again meanwhile is left alone. Returns how many."""
        held = deliveries.c.status.in_(IN_FLIGHT) & (deliveries.c.claimed_at < stale_before)
        changed = 0
        with self.engine.begin() as conn:
            for batch in _batches(list(recipients)):
                values = {"status": QUEUED, "claim_token": None, "claimed_at": None, "updated_at": now()}
                changed += conn.execute(deliveries.update().where(_key(report, slot, batch) & held).values(values)).rowcount or 0
        return changed

    def skip_stuck(self, report: str, slot: datetime, recipients: Sequence[str], why: str) -> int:
        """Record rows found by `stuck` (queued, or claimed by a dead execution) as skipped."""
        return self._set(_key(report, slot, recipients) & deliveries.c.status.in_((QUEUED, *IN_FLIGHT)), status=SKIPPED, error=why)

    def take_notice(self, report: str, cooldown: float) -> datetime | None:
        """Atomically claim the right to notify REPORT's owners (at most once per COOLDOWN seconds).

        Returns the previous notice time to restore with `give_back_notice` if sending fails, or
        None if another notice went out within the cooldown."""
        stamp = now()
        with self.engine.begin() as conn:
            previous = conn.execute(sa.select(notices.c.last_at).where(notices.c.report == report)).scalar()
            if previous is None:
                try:
                    with conn.begin_nested():
                        conn.execute(notices.insert().values(report=report, last_at=stamp))
                    return datetime.min.replace(tzinfo=UTC)
                except IntegrityError:
                    return None
            taken = conn.execute(
                notices.update()
                .where(
                    (notices.c.report == report)
                    & (notices.c.last_at == previous)
                    & (notices.c.last_at < stamp - timedelta(seconds=cooldown))
                )
                .values(last_at=stamp)
            )
            return previous if taken.rowcount else None

    def give_back_notice(self, report: str, previous: datetime) -> None:
        with self.engine.begin() as conn:
            conn.execute(notices.update().where(notices.c.report == report).values(last_at=previous))

    def advance_mark(self, report: str, until: datetime) -> None:
        """Record that REPORT's slots before UNTIL have been dispatched (never moves backwards)."""
        with self.engine.begin() as conn:
            moved = conn.execute(
                marks.update().where((marks.c.report == report) & (marks.c.covered_until < until)).values(covered_until=until)
            )
            if moved.rowcount:
                return
            if conn.execute(sa.select(marks.c.report).where(marks.c.report == report)).first() is None:
                try:
                    with conn.begin_nested():
                        conn.execute(marks.insert().values(report=report, covered_until=until))
                except IntegrityError:
                    pass  # a concurrent dispatcher inserted it; it is at least as far as ours

    def advance_marks(self, reports: Sequence[str], until: datetime) -> None:
        """`advance_mark` for every one of REPORTS, in one transaction: one UPDATE per batch of names
        and one batched INSERT for the reports that have no watermark yet."""
        names = list(dict.fromkeys(reports))
        if not names:
            return
        if self.engine.dialect.name == "postgresql" and until.tzinfo is not None:
            # One upsert whose rows come from an array: a mark only ever moves forward.
            with self.engine.begin() as conn:
                conn.exec_driver_sql(
                    "INSERT INTO dispatch_marks (report, covered_until) SELECT r, %(until)s FROM unnest(%(names)s::varchar[]) AS t(r) "
                    "ON CONFLICT (report) DO UPDATE SET covered_until = excluded.covered_until "
                    "WHERE dispatch_marks.covered_until < excluded.covered_until",
                    {"until": until.astimezone(UTC).replace(tzinfo=None), "names": names},
                )
            return
        if self.engine.dialect.name != "sqlite":
            for name in names:
                self.advance_mark(name, until)
            return
        with self.engine.begin() as conn:
            for batch in _batches(names):
                conn.execute(marks.update().where(marks.c.report.in_(batch) & (marks.c.covered_until < until)).values(covered_until=until))
            have: set[str] = set()
            for batch in _batches(names):
                have.update(conn.execute(sa.select(marks.c.report).where(marks.c.report.in_(batch))).scalars())
            missing = [{"report": n, "covered_until": until} for n in names if n not in have]
            if missing:
                # A concurrent dispatcher may insert the same report first; its mark is at least as far.
                conn.execute(self._insert_ignore_into(marks), missing)

    def take_lease(self, name: str, holder: str, seconds: float) -> bool:
        """Hold lease NAME as HOLDER for SECONDS from now, if it is free, expired or already HOLDER's.

        One conditional UPDATE (atomic like `claim`: PostgreSQL re-checks the condition on the row a
        concurrent UPDATE wrote, SQLite serialises writers); an INSERT when there is no row yet, where
        the primary key lets exactly one of two racing inserts win. Expiry is judged by this process's
        clock on both sides, as for claims (docs/reliability.md, "Clock skew")."""
        stamp = now()
        until = stamp + timedelta(seconds=seconds)
        row = (leases.c.name == name) & ((leases.c.holder == holder) | (leases.c.expires_at < stamp))
        with self.engine.begin() as conn:
            if conn.execute(leases.update().where(row).values(holder=holder, expires_at=until)).rowcount:
                return True
            if conn.execute(sa.select(leases.c.name).where(leases.c.name == name)).first() is not None:
                return False
            try:
                with conn.begin_nested():
                    conn.execute(leases.insert().values(name=name, holder=holder, expires_at=until))
            except IntegrityError:
                return False  # another holder inserted it first
            return True

    def renew_lease(self, name: str, holder: str, seconds: float) -> bool:
        """Extend HOLDER's unexpired lease NAME by SECONDS from now; False if it is not HOLDER's any more."""
        stamp = now()
        mine = (leases.c.name == name) & (leases.c.holder == holder) & (leases.c.expires_at >= stamp)
        with self.engine.begin() as conn:
            return bool(conn.execute(leases.update().where(mine).values(expires_at=stamp + timedelta(seconds=seconds))).rowcount)

    def drop_lease(self, name: str, holder: str) -> bool:
        """Give lease NAME up if HOLDER holds it."""
        with self.engine.begin() as conn:
            return bool(conn.execute(leases.delete().where((leases.c.name == name) & (leases.c.holder == holder))).rowcount)

    def lease_holder(self, name: str) -> str | None:
        """The holder of lease NAME if it has not expired."""
        with self.engine.connect() as conn:
            found = conn.execute(sa.select(leases.c.holder).where((leases.c.name == name) & (leases.c.expires_at >= now()))).scalar()
        return None if found is None else str(found)

    def remember_config(self, version: str, source: str) -> None:
        """Note that configuration VERSION (content SOURCE) was loaded from its file now."""
        stamp = now()
        with self.engine.begin() as conn:
            if conn.execute(config_versions.update().where(config_versions.c.version == version).values(seen_at=stamp)).rowcount:
                return
            try:
                with conn.begin_nested():
                    conn.execute(config_versions.insert().values(version=version, seen_at=stamp, source=source))
            except IntegrityError:
                pass  # another process stored it at the same moment

    def config_seen(self, *versions: str) -> dict[str, datetime]:
        """When each of VERSIONS was last loaded from its file (versions never stored are left out)."""
        query = sa.select(config_versions.c.version, config_versions.c.seen_at).where(config_versions.c.version.in_(versions))
        with self.engine.connect() as conn:
            return {r.version: r.seen_at for r in conn.execute(query)}

    def config_source(self, version: str) -> str | None:
        """The stored content of configuration VERSION, or None."""
        with self.engine.connect() as conn:
            found = conn.execute(sa.select(config_versions.c.source).where(config_versions.c.version == version)).scalar()
        return None if found is None else str(found)

    def record_evaluation(self, found: Evaluation) -> Evaluation:
        """Record FOUND unless (report, slot) already has an evaluation; return the one recorded first.

        Insert-if-absent on the primary key: of two executions evaluating one slot at once, one
        insert wins and both go on with its decision."""
        row = {
            "report": found.report,
            "slot": found.slot,
            "held": found.held,
            "value": to_json(found.value),
            "rows": to_json(found.rows),
            "row_count": found.row_count,
            "capped": found.capped,
            "decision": found.decision,
            "reason": found.reason,
            "held_since": found.held_since,
            "last_alert": found.last_alert,
            "evaluated_at": now(),
        }
        with self.engine.begin() as conn:
            try:
                with conn.begin_nested():
                    conn.execute(evaluations.insert().values(row))
            except IntegrityError:
                pass  # recorded before (a retry, a redelivery) or by a concurrent execution: that one stands
        recorded = self.evaluation(found.report, found.slot)
        assert recorded is not None
        return recorded

    def evaluation(self, report: str, slot: datetime) -> Evaluation | None:
        """The recorded evaluation of (REPORT, SLOT), or None."""
        query = sa.select(evaluations).where((evaluations.c.report == report) & (evaluations.c.slot == slot))
        with self.engine.connect() as conn:
            found = conn.execute(query).first()
        return None if found is None else _evaluation(found)

    def previous_evaluation(self, report: str, before: datetime) -> Evaluation | None:
        """The latest recorded evaluation of REPORT for a slot before BEFORE, or None."""
        query = (
            sa.select(evaluations)
            .where((evaluations.c.report == report) & (evaluations.c.slot < before))
            .order_by(evaluations.c.slot.desc())
            .limit(1)
        )
        with self.engine.connect() as conn:
            found = conn.execute(query).first()
        return None if found is None else _evaluation(found)

    def marks(self) -> dict[str, datetime]:
        """Each report's dispatch watermark."""
        with self.engine.connect() as conn:
            return {r.report: r.covered_until for r in conn.execute(sa.select(marks))}

    def prune(self, older_than: datetime) -> int:
        """Delete rows created before OLDER_THAN that are final, and configuration versions no process
        has loaded since then and no remaining row was sent under; return how many rows."""
        with self.engine.begin() as conn:
            result = conn.execute(deliveries.delete().where((deliveries.c.created_at < older_than) & deliveries.c.status.in_(FINAL)))
            used = sa.select(deliveries.c.config_version).where(deliveries.c.config_version.is_not(None))
            conn.execute(config_versions.delete().where((config_versions.c.seen_at < older_than) & config_versions.c.version.not_in(used)))
            # An alert's latest evaluation stays, however old: the next slot's `previous` (notify: change).
            newer = evaluations.alias("newer")
            later = sa.exists().where((newer.c.report == evaluations.c.report) & (newer.c.slot > evaluations.c.slot))
            conn.execute(evaluations.delete().where((evaluations.c.evaluated_at < older_than) & later))
            return result.rowcount or 0

    # ----------------------------------------------------------------- reading

    def rows(
        self,
        report: str | None = None,
        slot: datetime | None = None,
        status: str | None = None,
        limit: int | None = None,
        until: datetime | None = None,
    ) -> list[Row]:
        """Rows, newest slot first; with UNTIL, only slots at or before it."""
        query = sa.select(deliveries).order_by(deliveries.c.slot.desc(), deliveries.c.report, deliveries.c.recipient)
        if report is not None:
            query = query.where(deliveries.c.report == report)
        if slot is not None:
            query = query.where(deliveries.c.slot == slot)
        if status is not None:
            query = query.where(deliveries.c.status == status)
        if until is not None:
            query = query.where(deliveries.c.slot <= until)
        if limit is not None:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            return [Row(**{k: v for k, v in r._mapping.items() if k != "claim_token" and k != "task_id"}) for r in conn.execute(query)]

    def slots_with_rows(self, report: str, start: datetime, end: datetime) -> dict[datetime, set[str]]:
        """For each slot of REPORT in [START, END) that has rows: the statuses present."""
        query = sa.select(deliveries.c.slot, deliveries.c.status).where(
            (deliveries.c.report == report) & (deliveries.c.slot >= start) & (deliveries.c.slot < end)
        )
        out: dict[datetime, set[str]] = {}
        with self.engine.connect() as conn:
            for slot, status in conn.execute(query):
                out.setdefault(slot, set()).add(status)
        return out

    def slot_statuses(self, reports: Sequence[str], start: datetime, end: datetime) -> dict[tuple[str, datetime], set[str]]:
        """For each (report, slot) of REPORTS with a slot in [START, END) that has rows: the statuses
        present. One query per batch of names, each answered from the (report, slot, recipient) index."""
        out: dict[tuple[str, datetime], set[str]] = {}
        with self.engine.connect() as conn:
            for batch in _batches(list(dict.fromkeys(reports))):
                query = (
                    sa.select(deliveries.c.report, deliveries.c.slot, deliveries.c.status)
                    .distinct()
                    .where(deliveries.c.report.in_(batch) & (deliveries.c.slot >= start) & (deliveries.c.slot < end))
                )
                for report, slot, status in conn.execute(query):
                    out.setdefault((report, slot), set()).add(status)
        return out

    def dispose(self) -> None:
        self.engine.dispose()


def _evaluation(row: Any) -> Evaluation:
    return Evaluation(
        report=row.report,
        slot=row.slot,
        held=bool(row.held),
        value=from_json(row.value),
        rows=from_json(row.rows),
        row_count=row.row_count,
        capped=bool(row.capped),
        decision=row.decision,
        reason=row.reason,
        held_since=row.held_since,
        last_alert=row.last_alert,
        evaluated_at=row.evaluated_at,
    )

"""Bursting: one report slot, one email per reader, each rendered with that reader's own parameters.

A burst report's readers are the rows of its `burst:` query or data function: the `address` column,
and every other column a parameter of the reader's slice. Dispatch cannot know them (beat never
queries a warehouse), so a burst slot starts as one ledger row, the planning row (`audience.BURST_KEY`).
The send that claims it **plans**:

1. runs the burst query and checks each row: an address, a valid one, not one an earlier row gave;
2. inserts one queued row per reader carrying its parameters (JSON), and one `failed` row per malformed
   row with the reason (insert-if-absent: a row that exists keeps its params and its status);
3. enqueues the readers not yet done in **pieces** (`piece_plan`): ordinary `email_reports.send` tasks
   with `only=` their keys, each small enough to finish well inside the soft time limit at the rate
   limit, and staggered so that pieces on several workers do not spend their limit waiting on it (but
   starting within the dispatcher's longest ETA, which the broker's visibility timeout outlasts);
4. marks the planning row `planned`, with a summary ("50 readers in 2 piece(s); 3 malformed row(s)").

A **piece** claims its rows as any send does, reads their parameters from the ledger, renders once per
parameter set (`slices`) and sends each reader its message (`group: true`: one message per parameter
set to all its readers). Every invariant of `deliver.ClaimedSlot` holds for it unchanged. A piece
that shares the rate limit or renders slowly hands the messages it has not sent, past PIECE_DEADLINE of
its soft time limit, to a fresh piece rather than run into the limit and spend a retry (nor an attempt:
the rows handed on are not counted as tried).

**Losing `burst:`.** A live edit can leave a slot's pieces queued for a report that no longer has
`burst:`: the plain send path hands the rows a planning made to `unplanned_rows`, which records them
`not-sent`, so a reader never gets the whole report (a row left `sending` says it may have been delivered).

**Crash safety.** The ledger key stays (report, slot, recipient), so a reader gets one email per slot.
Planning killed midway: its row goes stale and the sweep (or a redelivery) plans again, which is
idempotent: rows already made keep their params, sent rows are final, and enqueueing a piece twice is
harmless because claims are atomic. A piece killed midway: its rows are reclaimed later as any send's.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from reporter import defaults
from reporter.audience import BURST_KEY, Audience, key_of
from reporter.config import Config, Report, bind_names, normalize_address, reads_reader
from reporter.data import Table
from reporter.deliver import ClaimedSlot, Mailing, SendResult, send_message
from reporter.errors import RenderError, TransientDeliveryError
from reporter.ledger import FINAL, SENDING
from reporter.observers import Delivery
from reporter.render import Rendered, Renderer
from reporter.runtime import Runtime

MAX_PIECE = 100
"""Readers per piece at most, however fast the rate limit: a piece killed midway redoes little."""

PIECE_SHARE = 0.4
"""The share of the soft time limit a piece may spend waiting on the rate limit; the rest is for rendering
and SMTP transactions."""

PIECE_DEADLINE = 0.7
"""The share of the soft time limit after which a piece sends no further message: it hands the rest to a
fresh piece (other traffic on the rate limit, slow renders) instead of running into the limit and
spending a retry. The 0.3 left covers the render and SMTP transaction under way when it passes."""

MAY_HAVE_BEEN_DELIVERED = (
    "may have been delivered before burst: was removed; not sent again, as the report no longer has burst: (configuration {version})"
)
"""Why a burst reader's row left `sending` (its piece died after the message's DATA, maybe delivered) gets
nothing more once its report lost `burst:`."""

NO_LONGER_BURST = (
    "planned as a burst reader's slice, and the report is no longer a burst report (configuration {version}): "
    "a reader never gets the whole report"
)
"""Why a row a burst planning made gets nothing once its report lost `burst:` (the reader's row, the planning row)."""


# --------------------------------------------------------------------------- pure parts


@dataclass(frozen=True)
class Reader:
    """One well-formed burst row: a reader's ledger key, address and parameters."""

    key: str
    address: str
    params: dict[str, Any]
    row: int
    """The row's number in the burst query's result, from 1."""

    def as_dict(self) -> dict[str, Any]:
        """What the templates see as `reader`: the address and every parameter."""
        return {**self.params, "address": self.address}

    def stored(self) -> str:
        """The reader as the ledger's params column keeps it."""
        return json.dumps(self.as_dict(), sort_keys=True, ensure_ascii=False)


@dataclass(frozen=True)
class Malformed:
    """A burst row no reader can be made of, and why; recorded as its own `failed` row."""

    key: str
    row: int
    error: str


@dataclass(frozen=True)
class Piece:
    """One send task's share of a burst: its readers' keys, and when it may start (seconds from now)."""

    keys: tuple[str, ...]
    countdown: float
    runs: float | None = None
    """When it is expected to really run (seconds from now): past the cap on countdowns, pieces start
    together and wait behind each other on the rate limit. None: at its countdown."""


@dataclass(frozen=True)
class Slice:
    """Readers that share one render: their keys, each one's address for the header, and the `reader`
    the templates see."""

    keys: tuple[str, ...]
    addresses: dict[str, str]
    reader: dict[str, Any]


def plain(value: Any) -> Any:
    """VALUE as JSON keeps it and a database takes it back as a bound parameter."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, (date, datetime)):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def malformed_key(row: int) -> str:
    """The ledger key of malformed burst row ROW (never an address, so never a reader's)."""
    return f"(burst row {row})"


def readers_of(table: Table, column: str) -> tuple[list[Reader], list[Malformed]]:
    """The readers in TABLE (the burst query's rows, addresses in COLUMN), and the rows that are not.

    A row is malformed when its address is missing, invalid, or a reader an earlier row already gave:
    that reader gets one slice, the first row's."""
    if column not in table.columns:
        raise RenderError(f"burst: the readers have no column {column!r} for the address (columns: {', '.join(table.columns) or 'none'})")
    readers: list[Reader] = []
    bad: list[Malformed] = []
    seen: dict[str, Reader] = {}
    for number, values in enumerate(table.rows, 1):
        row = dict(zip(table.columns, values, strict=True))
        raw = row.pop(column)
        written = raw.strip() if isinstance(raw, str) else raw
        if written is None or written == "":
            bad.append(Malformed(malformed_key(number), number, f"burst row {number}: no address in column {column!r}"))
            continue
        try:
            address = normalize_address(str(written))
        except ValueError as exc:
            bad.append(Malformed(malformed_key(number), number, f"burst row {number}: {exc}"))
            continue
        key = key_of(address)
        first = seen.get(key)
        if first is not None:
            why = f"burst row {number}: duplicate of {first.key} (row {first.row}), which gets its own slice once"
            bad.append(Malformed(malformed_key(number), number, why))
            continue
        reader = Reader(key, address, {str(k): plain(v) for k, v in row.items()}, number)
        seen[key] = reader
        readers.append(reader)
    return readers, bad


def piece_size(soft_time_limit: float, rate: float, cap: int = MAX_PIECE) -> int:
    """Readers per piece: as many as the rate limit lets through in PIECE_SHARE of the soft time limit
    (RATE: emails per second), at least one and at most CAP."""
    return max(1, min(cap, math.floor(soft_time_limit * rate * PIECE_SHARE)))


def piece_plan(
    readers: Sequence[Reader], soft_time_limit: float, rate: float, cap: int = MAX_PIECE, latest: float = math.inf
) -> list[Piece]:
    """READERS in pieces of `piece_size`, ordered by their parameters (readers that share them land in
    one piece and share its render); piece i starts i * size / RATE seconds from now, when the rate
    limit has let the earlier pieces' emails through, but no later than LATEST seconds from now (a
    message waiting longer than the broker's visibility timeout is handed to a second worker): pieces
    past it start together and share the rate limit, each handing what it cannot send in time to a
    fresh piece (`send_piece`'s deadline); each still `runs` when the rate limit reaches it."""
    size = piece_size(soft_time_limit, rate, cap)
    ordered = sorted(readers, key=lambda r: (json.dumps(r.params, sort_keys=True, ensure_ascii=False), r.key))
    return [
        Piece(tuple(r.key for r in ordered[start : start + size]), min(start / rate, latest), start / rate)
        for start in range(0, len(ordered), size)
    ]


def shadowed(sql: str, params: Mapping[str, Any], columns: Sequence[str]) -> list[str]:
    """The names SQL binds that both a reader's parameter (COLUMNS) and a static query param (PARAMS, one
    that does not read `reader`) give: the param wins, so every reader binds the same value."""
    return sorted(k for k in bind_names(sql) & set(params) & set(columns) if not reads_reader(params[k]))


def reader_use_problems(sql: str, params: Mapping[str, Any], columns: Sequence[str]) -> list[str]:
    """Why a burst report's query (SQL, its own PARAMS) cannot take its readers' parameters (COLUMNS, the
    burst rows' columns but the address): names it binds that no column gives, and, when static params
    hide every bound reader's parameter (params win), that no reader's data is used at all. Some names
    shadowed while others still come from the reader is no problem (see `shadowed`)."""
    problems = []
    bound = bind_names(sql)
    missing = sorted(bound - set(params) - set(columns))
    if missing:
        problems.append(
            f"the report's query binds {', '.join(':' + m for m in missing)}, which the burst rows do not give "
            f"(their parameters: {', '.join(columns) or 'none'})"
        )
    hidden = shadowed(sql, params, columns)
    from_reader = [k for k in bound if (k in params and reads_reader(params[k])) or (k not in params and k in columns)]
    if hidden and not from_reader:
        for key in hidden:
            problems.append(
                f"query.params.{key} replaces every reader's own {key!r} with the same value (query.params win over "
                f"the reader's parameters); remove it, or compute it from `reader`"
            )
    return problems


def slices(stored: Mapping[str, str], group: bool, per_reader: bool) -> list[Slice]:
    """The renders that deliver the readers of STORED (ledger key -> its params column) once each.

    Readers with identical parameters share one render, unless PER_READER (the report shows a reader
    their own address). With GROUP, each parameter set is one message to all its readers, and `reader.address`
    lists them all. Ordered as the readers come."""
    parts: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for key, text in stored.items():
        reader = json.loads(text)
        params = {k: v for k, v in reader.items() if k != "address"}
        shared = json.dumps(params, sort_keys=True, ensure_ascii=False)
        parts.setdefault(shared if group or not per_reader else f"{shared}\n{key}", []).append((key, reader))
    out = []
    for members in parts.values():
        # `send --to X --as Y` keeps Y's reader under X's key: the header names X, the render is Y's.
        addresses = {key: str(r["address"]) if key_of(str(r["address"])) == key else key for key, r in members}
        reader = dict(members[0][1])
        if group:
            reader["address"] = ", ".join(addresses.values())
        out.append(Slice(tuple(addresses), addresses, reader))
    return out


_READER_USE = re.compile(r"\breader\b(?:\s*\.\s*(\w+)|\s*\[\s*['\"](\w+)['\"]\s*\])?")


def shows_address(texts: Sequence[str]) -> bool:
    """Whether any of TEXTS (a report's subject, templates, query parameters) may show `reader.address`
    or the whole `reader`: then each reader needs a render of their own."""
    for text in texts:
        for match in _READER_USE.finditer(text):
            attribute = match.group(1) or match.group(2)
            if attribute in (None, "address", "items", "values", "get"):
                return True
    return False


def per_reader(config: Config, report: Report) -> bool:
    """Whether REPORT must render each reader on their own: its data function gets the whole reader,
    or its subject, query parameters or any template may show the reader's address."""
    if report.function is not None:
        return True
    params = [str(v) for v in report.query.params.values()] if report.query is not None else []
    return shows_address([report.subject, *params, *config.templates.values()])


# --------------------------------------------------------------------------- planning and pieces


def fetch_readers(renderer: Renderer, name: str, slot_utc: datetime) -> Table:
    """The rows of report NAME's burst query or function for SLOT_UTC."""
    config = renderer.config
    report = config.reports[name]
    assert report.burst is not None
    slot = slot_utc.astimezone(config.zone(report))
    try:
        if report.burst.query is not None:
            where = ("reports", name, "burst", "query")
            context = {"slot": slot, "report": renderer.meta(name)}
            return renderer.datasources.run_query(name, report, report.burst.query, where, context, {})
        assert report.burst.function is not None
        return renderer.datasources.call_function(name, report.burst.function, slot)
    except RenderError as exc:
        raise type(exc)(f"burst: {exc}") from None


def readers(renderer: Renderer, name: str, slot_utc: datetime) -> tuple[list[Reader], list[Malformed]]:
    """Report NAME's readers for SLOT_UTC, and its malformed burst rows."""
    report = renderer.config.reports[name]
    assert report.burst is not None
    return readers_of(fetch_readers(renderer, name, slot_utc), report.burst.address)


def listing_order(key: str) -> tuple[int, int, str]:
    """Sort key for a burst slot's rows: the planning row, the readers by address, the malformed rows by number."""
    if key == BURST_KEY:
        return (0, 0, "")
    if (found := re.fullmatch(r"\(burst row (\d+)\)", key)) is not None:
        return (2, int(found.group(1)), "")
    return (1, 0, key)


def not_a_reader(address: str, report: str, found: Sequence[Reader], advice: bool = False) -> str:
    """Why ADDRESS gets no slice of REPORT, naming a few of the FOUND readers; with ADVICE, how to send
    a reader's slice to it anyway."""
    examples = ", ".join(r.address for r in found[:3]) + (", …" if len(found) > 3 else "")
    text = f"{address} is not a reader of {report} ({len(found)} readers" + (f", e.g. {examples})" if found else ")")
    if advice and found:
        text += f"; to send {found[0].address}'s slice to {address}: --to {address} --as {found[0].address}"
    return text


class Planning(ClaimedSlot):
    """The claimed planning row of a burst slot."""

    def planned(self, summary: str) -> None:
        """The readers' rows are made and enqueued: the planning row is final, with SUMMARY."""
        self.ledger.mark_planned(self.token, self.report, self.slot, [BURST_KEY], summary)
        self._settled([BURST_KEY])


def send_burst(
    rt: Runtime,
    name: str,
    slot: datetime,
    only: Sequence[str] | None = None,
    trigger: str = "schedule",
    task_id: str | None = None,
    enqueue: Callable[[Piece], None] | None = None,
) -> SendResult:
    """deliver.send_slot for burst report NAME: plan the slot (no ONLY, or ONLY holds the planning row),
    or send the readers ONLY names. ENQUEUE publishes a piece (default: a send task on the queue TRIGGER
    belongs on)."""
    publish = enqueue or _publisher(rt, name, slot, trigger)
    if only is None or BURST_KEY in only:
        return plan(rt, name, slot, trigger, task_id, publish)
    deadline = time.monotonic() + PIECE_DEADLINE * rt.time_limits(name)[0]
    return send_piece(rt, name, slot, only, task_id, deadline=deadline, enqueue=publish)


def _publisher(rt: Runtime, name: str, slot: datetime, trigger: str) -> Callable[[Piece], None]:
    from reporter.dispatch import Due
    from reporter.tasks import enqueue_send  # the tasks call this module through deliver

    queue = defaults.QUEUE_URGENT if trigger == "manual" else defaults.QUEUE_SCHEDULED

    def publish(piece: Piece) -> None:
        enqueue_send(rt, Due(name, slot), queue=queue, only=list(piece.keys), trigger=trigger, countdown=piece.countdown)

    return publish


def plan(rt: Runtime, name: str, slot: datetime, trigger: str, task_id: str | None, enqueue: Callable[[Piece], None]) -> SendResult:
    """Claim the planning row of (NAME, SLOT); if this execution holds it, make the readers' rows and
    ENQUEUE them in pieces (see the module's docstring)."""
    report = rt.config.report(name)
    assert report.burst is not None
    result = SendResult(name, slot)
    rt.ledger.ensure(name, slot, [BURST_KEY], trigger)
    claim = rt.ledger.claim(name, slot, [BURST_KEY], rt.stale_after, task_id, config_version=rt.config.version)
    result.already = list(claim.done)
    result.busy, result.busy_until = list(claim.busy), claim.busy_until
    if not claim.mine:
        return result
    held = Planning(rt.ledger, rt.observers, result, claim.token, claim.mine)
    with held:
        try:
            found, malformed = readers(rt.renderer, name, slot)
        except RenderError as exc:
            held.failed([BURST_KEY], str(exc))
            return result
        except TransientDeliveryError as exc:
            held.retry([BURST_KEY], f"burst: {exc}")
            return result
        hidden: list[str] = []
        if report.query is not None and found:
            columns = list(dict.fromkeys(p for r in found for p in r.params))
            problems = reader_use_problems(report.query.sql, report.query.params, columns)
            if problems:
                held.failed([BURST_KEY], "burst: " + "; ".join(problems))
                return result
            hidden = shadowed(report.query.sql, report.query.params, columns)
        errors = {m.key: m.error for m in malformed}
        # Only rows this planning recorded: a second planning does not tell the owners again.
        for key in rt.ledger.record_failed(name, slot, errors, trigger):
            result.failed[key] = errors[key]
            rt.observers.delivered(Delivery(name, slot, key, "failed", 0.0, None, None, errors[key]))
        rt.ledger.ensure_readers(name, slot, {r.key: r.stored() for r in found}, trigger)
        statuses = rt.ledger.statuses(name, slot)
        todo = [r for r in found if statuses.get(r.key) not in FINAL]
        pieces = piece_plan(todo, rt.time_limits(name)[0], rt.config.rate_of(report), latest=latest_start(rt))
        _enqueue_all(rt, name, slot, pieces, enqueue)
        summary = f"{len(found)} readers in {len(pieces)} piece(s)"
        if len(todo) < len(found):
            summary += f" ({len(found) - len(todo)} already done)"
        if malformed:
            summary += f"; {len(malformed)} malformed row(s)"
        if hidden:
            summary += f"; query.params give every reader the same {', '.join(hidden)} (the readers' own are not used)"
        held.planned(summary)
    return result


def _enqueue_all(rt: Runtime, name: str, slot: datetime, pieces: Sequence[Piece], enqueue: Callable[[Piece], None]) -> None:
    """ENQUEUE each piece, its rows first marked as waiting for its start (so the sweep does not take a
    piece that waits for its turn for a lost one, and send it at once in one big task)."""
    started = datetime.now(UTC)
    for piece in pieces:
        # When it really runs, not its (capped) countdown: a piece waiting behind others on the rate
        # limit is not lost, and the sweep must not re-enqueue it every grace period meanwhile.
        runs = piece.countdown if piece.runs is None else max(piece.runs, piece.countdown)
        rt.ledger.expect(name, slot, piece.keys, started + timedelta(seconds=runs))
        enqueue(piece)


def requeue(
    rt: Runtime,
    name: str,
    slot: datetime,
    keys: Sequence[str],
    enqueue: Callable[[Piece], None] | None = None,
    trigger: str = "schedule",
) -> None:
    """The sweep's re-enqueue of burst report NAME's lost or abandoned rows KEYS: the planning row as
    a planning, the readers in pieces as planning makes them (never one task for all of them).
    ENQUEUE publishes a piece (default: a send task on the queue the rows' TRIGGER belongs on)."""
    publish = enqueue or _publisher(rt, name, slot, trigger)
    # Dead rows (claimed by an execution that died) first go back to queued, so that `expect` stamps them
    # with their piece's start and the next sweep does not take them again and send them in a piece of its own.
    rt.ledger.requeue_dead(name, slot, keys, datetime.now(UTC) - timedelta(seconds=rt.stale_after))
    if BURST_KEY in keys:
        publish(Piece((BURST_KEY,), 0.0))
    stored = rt.ledger.params_of(name, slot, [k for k in keys if k != BURST_KEY])
    # Ordered by their parameters as planning orders them; a row without any still gets its piece (and fails there).
    found = [Reader(k, k, {p: v for p, v in json.loads(text or "{}").items() if p != "address"}, 0) for k, text in stored.items()]
    report = rt.config.report(name)
    pieces = piece_plan(found, rt.time_limits(name)[0], rt.config.rate_of(report), latest=latest_start(rt))
    _enqueue_all(rt, name, slot, pieces, publish)


def latest_start(rt: Runtime) -> float:
    """Seconds from now a piece may wait at most: the longest ETA the dispatcher itself gives, which the
    broker's visibility timeout outlasts (reporter.app), so a waiting piece is never handed to a second worker."""
    from reporter.beat import longest_eta

    return float(longest_eta(rt.config, datetime.now(UTC)))


def unplanned_rows(
    rt: Runtime, name: str, slot: datetime, only: Sequence[str], result: SendResult, task_id: str | None = None
) -> list[str]:
    """ONLY (a send's addresses for report NAME, which has no `burst:`) without the rows a burst planning
    made: the planning row and readers' rows with parameters, left queued or in flight by a configuration
    that had `burst:`. Those are claimed and recorded `not-sent` (NO_LONGER_BURST; MAY_HAVE_BEEN_DELIVERED
    for a row left `sending`, whose slice the reader may have), never sent the whole report; what is left
    is returned."""
    keyed = {a: a if a.startswith("(") else key_of(a) for a in only}
    stored = rt.ledger.params_of(name, slot, [k for k in keyed.values() if k != BURST_KEY])
    sliced = [k for k in dict.fromkeys(keyed.values()) if k == BURST_KEY or stored.get(k)]
    if not sliced:
        return list(only)
    # Read before the claim turns them `rendering`: only a stale claim is taken, so a `sending` row stays so.
    before = rt.ledger.statuses(name, slot)
    claim = rt.ledger.claim(name, slot, sliced, rt.stale_after, task_id, config_version=rt.config.version)
    result.already.extend(claim.done)
    result.busy.extend(claim.busy)
    result.busy_until = claim.busy_until
    if claim.mine:
        held = ClaimedSlot(rt.ledger, rt.observers, result, claim.token, claim.mine)
        maybe = [k for k in claim.mine if before.get(k) == SENDING]
        if maybe:
            held.not_sent(maybe, MAY_HAVE_BEEN_DELIVERED.format(version=rt.config.version))
        rest = [k for k in claim.mine if k not in maybe]
        if rest:
            held.not_sent(rest, NO_LONGER_BURST.format(version=rt.config.version))
    return [a for a, k in keyed.items() if k not in sliced]


def send_piece(
    rt: Runtime,
    name: str,
    slot: datetime,
    only: Sequence[str],
    task_id: str | None = None,
    deadline: float | None = None,
    enqueue: Callable[[Piece], None] | None = None,
) -> SendResult:
    """Deliver the burst readers ONLY names, each their own slice, exactly once each.

    Past DEADLINE (time.monotonic()), checked before each message, the rows not sent yet (the rest of the
    slice under way too) are handed back and ENQUEUEd as a fresh piece (not a retry, nor an attempt: no
    try is spent on waiting) and this one returns; the first message is always tried, so every piece gets
    somewhere."""
    report = rt.config.report(name)
    keys = list(dict.fromkeys(key_of(a) for a in only))
    result = SendResult(name, slot)
    claim = rt.ledger.claim(name, slot, keys, rt.stale_after, task_id, config_version=rt.config.version)
    result.already = list(claim.done)
    result.busy, result.busy_until = list(claim.busy), claim.busy_until
    if not claim.mine:
        return result
    # However this block is left (soft time limit, shutdown), what was never tried is handed back.
    with ClaimedSlot(rt.ledger, rt.observers, result, claim.token, claim.mine) as held:
        stored = rt.ledger.params_of(name, slot, held.pending)
        unplanned = [k for k in held.pending if not stored.get(k)]
        if unplanned:
            held.failed(unplanned, "no burst parameters recorded for this reader: its row was not made by planning the slot")
        parts = slices({k: str(stored[k]) for k in held.pending}, report.group, per_reader(rt.config, report))
        mailer = rt.transport()
        try:
            for number, part in enumerate(parts):
                if number and deadline is not None and time.monotonic() > deadline:
                    _hand_on(rt, held, enqueue or _publisher(rt, name, slot, "schedule"))
                    return result
                rendered = _render(rt, held, part)
                if rendered is None:
                    continue
                mailing = Mailing.of(rt, name, report, rendered, Audience(part.addresses, {}, {}), part.keys)
                for index in range(len(mailing.messages)):
                    # One slice may be most of the piece (readers sharing parameters, one message each):
                    # the rest of it goes too, and the fresh piece renders it again.
                    if (number or index) and deadline is not None and time.monotonic() > deadline:
                        _hand_on(rt, held, enqueue or _publisher(rt, name, slot, "schedule"))
                        return result
                    if not send_message(rt, held, mailer, mailing, index):
                        # The server or the network is in trouble: the slices not tried yet go back for the retry too.
                        rest = [k for k in held.pending if k not in held.in_flight]
                        if rest:
                            held.retry(rest, next(iter(result.retry.values()), "interrupted"))
                        return result
        finally:
            mailer.close()
    return result


def _hand_on(rt: Runtime, held: ClaimedSlot, enqueue: Callable[[Piece], None]) -> None:
    """Hand HELD's rows not tried yet back (queued) and enqueue them as a fresh piece that starts now."""
    rest = tuple(k for k in held.pending if k not in held.in_flight)
    # Not a try: the fresh piece's claim counts the attempt, so waiting never reaches the sweep's give-up.
    held.hand_back("the piece ran out of time before this message: handed to a fresh piece")
    if rest:
        _enqueue_all(rt, held.report, held.slot, [Piece(rest, 0.0)], enqueue)


def _render(rt: Runtime, held: ClaimedSlot, part: Slice) -> Rendered | None:
    """PART's slice rendered once for its readers; None if it cannot be (recorded for each)."""
    started = time.monotonic()
    try:
        rendered = rt.renderer.render(held.report, held.slot, reader=part.reader)
    except RenderError as exc:
        held.failed(list(part.keys), str(exc))
        return None
    except TransientDeliveryError as exc:
        held.retry(list(part.keys), str(exc))
        return None
    held.result.rendered = True
    rt.observers.rendered(held.report, held.slot, time.monotonic() - started, rendered.row_count)
    return rendered

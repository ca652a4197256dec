"""A report's data: a SQL query through SQLAlchemy with bound parameters, or a Python function.

A query runs under the report's `query_timeout` where the database lets us stop it (PostgreSQL's
statement_timeout, SQLite's progress handler). Errors never show a datasource's password.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import sqlalchemy as sa
from jinja2.sandbox import SandboxedEnvironment
from sqlalchemy import exc as sa_exc

from reporter.config import Config, Datasource, Query, Report
from reporter.errors import INTERRUPTS, DataError, TransientDeliveryError
from reporter.settings import mask_url, scrub
from reporter.yamldoc import Path_


@dataclass(frozen=True)
class Table:
    """Rows with named columns: what every report renders."""

    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]

    def dicts(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]

    @classmethod
    def from_any(cls, value: Any) -> Table:
        """A Table from a function's return: a Table, (columns, rows), or an iterable of mappings."""
        if isinstance(value, Table):
            return value
        if isinstance(value, tuple) and len(value) == 2 and not isinstance(value[0], Mapping):
            columns, rows = value
            table = cls(tuple(str(c) for c in columns), tuple(tuple(r) for r in rows))
            for number, row in enumerate(table.rows, 1):
                if len(row) != len(table.columns):
                    raise DataError(f"row {number} has {len(row)} values for {len(table.columns)} columns")
            return table
        if isinstance(value, Iterable) and not isinstance(value, (str, bytes, Mapping)):
            items = list(value)
            if not items:
                return cls((), ())
            if all(isinstance(i, Mapping) for i in items):
                columns = tuple(str(k) for k in items[0])
                return cls(columns, tuple(tuple(i.get(c) for c in columns) for i in items))
        raise DataError(f"a data function must return a list of mappings or (columns, rows), not {type(value).__name__}")


_params_env = SandboxedEnvironment(undefined=jinja2.StrictUndefined)


def render_params(params: Mapping[str, Any], context: Mapping[str, Any]) -> dict[str, Any]:
    """Evaluate each '{{ expr }}' parameter; a value that is one expression keeps its type."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, str) and "{{" in value:
            stripped = value.strip()
            if stripped.startswith("{{") and stripped.endswith("}}") and stripped.count("{{") == 1:
                out[key] = _params_env.compile_expression(stripped[2:-2])(**context)
            else:
                out[key] = _params_env.from_string(value).render(**context)
        else:
            out[key] = value
    return out


def params_problem(value: Any) -> str | None:
    """Why the query parameter VALUE would not compile as render_params evaluates it, or None."""
    if not isinstance(value, str) or "{{" not in value:
        return None
    stripped = value.strip()
    try:
        if stripped.startswith("{{") and stripped.endswith("}}") and stripped.count("{{") == 1:
            _params_env.compile_expression(stripped[2:-2])
        else:
            _params_env.from_string(value)
    except jinja2.TemplateSyntaxError as exc:
        return f"template syntax error: {exc.message}"
    return None


def import_function(spec: str, folder: Path, reader: bool = False) -> Any:
    """The function 'module:name' names, importable from FOLDER (beside schedules.yaml) too.

    Raises ValueError with one line saying why not: the module does not import (and its error),
    has no such name, or the name cannot be called as name(slot=..., report=...) (with READER, as
    name(slot=..., report=..., reader=...): a burst report's data function).
    """
    module_name, _, attr = spec.partition(":")
    where = str(folder.resolve())
    if where not in sys.path:
        sys.path.append(where)  # data functions may live beside schedules.yaml
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import module {module_name}: {_one_line(exc)}") from None
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - user code failing at import, however it fails, is the config's problem
        raise ValueError(f"module {module_name} failed to import: {type(exc).__name__}: {_one_line(exc)}") from None
    func: Any = module
    for part in attr.split("."):
        if not hasattr(func, part):
            raise ValueError(f"module {module_name} has no function {attr!r}")
        func = getattr(func, part)
    if not callable(func):
        raise ValueError(f"{spec} is not a function (it is a value of type {type(func).__name__})")
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return func  # a builtin or extension without a signature: it will tell at call time
    try:
        signature.bind(slot=None, report=None, **({"reader": None} if reader else {}))
    except TypeError as exc:
        if reader:
            raise ValueError(
                f"{spec} cannot be called as {attr}(slot=..., report=..., reader=...): {exc}; "
                "a burst report's data function gets each reader's row as reader="
            ) from None
        raise ValueError(f"{spec} cannot be called as {attr}(slot=..., report=...): {exc}") from None
    return func


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


_OWN_TRANSACTION = re.compile(r"^\s*(BEGIN|COMMIT|END)\b", re.IGNORECASE | re.MULTILINE)


class Datasources:
    """SQLAlchemy engines, one per datasource, created on first use in this process."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._engines: dict[str, sa.Engine] = {}

    def engine(self, name: str) -> sa.Engine:
        if name not in self._engines:
            source = self._config.datasources[name]
            try:
                url = sa.make_url(source.url)
                if source.seed and url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
                    Path(url.database).parent.mkdir(parents=True, exist_ok=True)
                engine = sa.create_engine(source.url, pool_pre_ping=True)
            except (sa_exc.ArgumentError, sa_exc.NoSuchModuleError, ImportError) as exc:
                raise DataError(f"datasource {name!r} ({mask_url(source.url)}): {_scrub(str(exc), source.url)}") from None
            self._seed(engine, name, source)
            self._engines[name] = engine
        return self._engines[name]

    def _seed(self, engine: sa.Engine, name: str, source: Datasource) -> None:
        seed = self._config.seed_path(source)
        if seed is None or sa.inspect(engine).get_table_names():
            return
        script = seed.read_text()
        raw = engine.raw_connection()
        try:
            cursor = raw.cursor()
            try:
                if engine.dialect.name != "sqlite":
                    cursor.execute(script)
                elif _OWN_TRANSACTION.search(script):
                    cursor.executescript(script)
                else:
                    # One transaction, so a worker seeding beside this one sees no tables or all of them.
                    cursor.executescript(f"BEGIN IMMEDIATE;\n{script}\n;COMMIT;")
                raw.commit()
            except Exception:
                raw.rollback()
                if not sa.inspect(engine).get_table_names():
                    raise
                # another process seeded it first
        finally:
            raw.close()

    def fetch(
        self, report_name: str, report: Report, slot: datetime, meta: Mapping[str, Any], reader: Mapping[str, Any] | None = None
    ) -> Table:
        """Run the report's query or function for SLOT (aware, in the report's zone); for a burst
        report, for READER (its address and parameters, which the query gets as bound parameters)."""
        if report.query is not None:
            return self._query(report_name, report, slot, meta, reader)
        if report.function is not None:
            return self._function(report_name, report, slot, reader)
        return Table((), ())

    def run_query(
        self, report_name: str, report: Report, query: Query, where: Path_, context: Mapping[str, Any], bound: Mapping[str, Any]
    ) -> Table:
        """QUERY (of REPORT, written at WHERE in the config) with BOUND parameters and its own params
        evaluated over CONTEXT; its own win over BOUND."""
        params: dict[str, Any] = dict(bound)
        for key, value in query.params.items():
            try:
                params.update(render_params({key: value}, context))
            except INTERRUPTS:
                raise
            except Exception as exc:  # noqa: BLE001 - any template error in a parameter is the config's fault
                line = self._config.line_of(*where, "params", key)
                at = f"{self._config.source}:{line}" if line else str(self._config.source)
                message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
                raise DataError(f"{at}: {'.'.join(map(str, where))}.params.{key}: {message}") from None
        source = query.datasource
        url = self._config.datasources[source].url
        timeout = self._config.query_timeout_of(report)
        try:
            with self.engine(source).connect() as conn, _time_limit(conn, timeout) as timed_out:
                try:
                    result = conn.execute(sa.text(query.sql), params)
                    return Table(tuple(result.keys()), tuple(tuple(r) for r in result))
                except sa_exc.DBAPIError as exc:
                    if timed_out(exc):
                        raise DataError(
                            f"report {report_name!r}: the query ran longer than query_timeout ({timeout:g} s) and was stopped; "
                            "make it faster, or raise query_timeout for this report"
                        ) from None
                    raise
        except (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError) as exc:
            if not _unavailable(exc):
                # SQLite reports a typo in the SQL or a missing table as an OperationalError too.
                raise DataError(f"report {report_name!r}: query failed: {_first_line(exc, url)}") from None
            # The warehouse being down, restarting or locked is worth another try later.
            raise TransientDeliveryError(f"report {report_name!r}: datasource {source!r}: {_first_line(exc, url)}") from None
        except sa_exc.SQLAlchemyError as exc:
            raise DataError(f"report {report_name!r}: query failed: {_first_line(exc, url)}") from None

    def _query(self, report_name: str, report: Report, slot: datetime, meta: Mapping[str, Any], reader: Mapping[str, Any] | None) -> Table:
        assert report.query is not None
        context: dict[str, Any] = {"slot": slot, "report": meta}
        bound: dict[str, Any] = {}
        if reader is not None:
            context["reader"] = dict(reader)
            bound = {k: v for k, v in reader.items() if k != "address"}
        return self.run_query(report_name, report, report.query, ("reports", report_name, "query"), context, bound)

    def _function(self, report_name: str, report: Report, slot: datetime, reader: Mapping[str, Any] | None = None) -> Table:
        assert report.function is not None
        return self.call_function(report_name, report.function, slot, **({"reader": dict(reader)} if reader is not None else {}))

    def call_function(self, report_name: str, spec: str, slot: datetime, **extra: Any) -> Table:
        """The data function SPEC called with SLOT, REPORT_NAME and EXTRA, as a Table."""
        try:
            func = import_function(spec, self._config.source.parent, reader="reader" in extra)
        except ValueError as exc:
            raise DataError(f"report {report_name!r}: cannot use {spec!r}: {exc}") from None
        try:
            value = func(slot=slot, report=report_name, **extra)
        except INTERRUPTS:
            raise
        except Exception as exc:  # noqa: BLE001 - user code; report it, don't crash the worker
            raise DataError(f"report {report_name!r}: {spec} raised {type(exc).__name__}: {exc}") from None
        return Table.from_any(value)

    def dispose(self) -> None:
        for engine in self._engines.values():
            engine.dispose()
        self._engines.clear()


@contextmanager
def _time_limit(conn: sa.Connection, seconds: float) -> Iterator[Any]:
    """Stop a query on CONN after SECONDS where the dialect allows; yields `timed_out(exc) -> bool`."""
    dialect = conn.dialect.name
    if dialect == "postgresql":
        # Local to this transaction, which ends when the connection goes back to the pool.
        conn.execute(sa.text("SELECT set_config('statement_timeout', :ms, true)"), {"ms": str(max(1, int(seconds * 1000)))})
        yield lambda exc: getattr(exc.orig, "sqlstate", None) == "57014" or getattr(exc.orig, "pgcode", None) == "57014"
        return
    if dialect == "sqlite":
        driver: Any = conn.connection.driver_connection
        deadline = time.monotonic() + seconds
        stopped: list[bool] = []

        def past_deadline() -> int:
            if time.monotonic() > deadline:
                stopped.append(True)
                return 1  # non-zero makes SQLite interrupt the statement
            return 0

        driver.set_progress_handler(past_deadline, 10_000)
        try:
            yield lambda exc: bool(stopped)
        finally:
            driver.set_progress_handler(None, 0)
        return
    yield lambda exc: False


def db_error(exc: BaseException, url: str | None = None) -> str:
    """The first line of a database error, with URL's password masked wherever it appears."""
    return _first_line(exc, url)


def _first_line(exc: BaseException, url: str | None = None) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig or exc).strip()
    return _scrub(text.splitlines()[0], url) if text else type(exc).__name__


def _scrub(text: str, url: str | None) -> str:
    """TEXT with URL's password (as written and as decoded) replaced by '***': drivers may quote it."""
    if not url:
        return text
    try:
        password = sa.make_url(url).password
    except (sa_exc.ArgumentError, ValueError):
        password = None
    written = url.partition("://")[2].partition("@")[0].partition(":")[2]
    return scrub(text.replace(url, mask_url(url)), str(password) if password else None, written)


_UNAVAILABLE = (
    "connect",
    "connection",
    "timeout",
    "timed out",
    "locked",
    "busy",
    "unable to open",
    "server closed",
    "terminat",
    "shutting down",
    "starting up",
    "too many clients",
)
"""Words in a driver's error that mean the database is unreachable or busy, not the query wrong."""


def _unavailable(exc: sa_exc.SQLAlchemyError) -> bool:
    """Is this the database being unreachable or busy (retry), rather than the query being wrong?"""
    if isinstance(exc, (sa_exc.InterfaceError, sa_exc.TimeoutError)) or getattr(exc, "connection_invalidated", False):
        return True
    text = str(getattr(exc, "orig", None) or exc).lower()
    return any(word in text for word in _UNAVAILABLE)

"""A report's data: a SQL query through SQLAlchemy with bound parameters, or a Python function."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from jinja2.sandbox import SandboxedEnvironment
from sqlalchemy import exc as sa_exc

from reporter.config import Config, Datasource, Report
from reporter.errors import INTERRUPTS, DataError, TransientDeliveryError
from reporter.settings import mask_url


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
            return cls(tuple(str(c) for c in columns), tuple(tuple(r) for r in rows))
        if isinstance(value, Iterable) and not isinstance(value, (str, bytes, Mapping)):
            items = list(value)
            if not items:
                return cls((), ())
            if all(isinstance(i, Mapping) for i in items):
                columns = tuple(str(k) for k in items[0])
                return cls(columns, tuple(tuple(i.get(c) for c in columns) for i in items))
        raise DataError(f"a data function must return a list of mappings or (columns, rows), not {type(value).__name__}")


_params_env = SandboxedEnvironment()


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
                raise DataError(f"datasource {name!r} ({mask_url(source.url)}): {exc}") from None
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
            if engine.dialect.name == "sqlite":
                cursor.executescript(script)
            else:
                cursor.execute(script)
            raw.commit()
        finally:
            raw.close()

    def fetch(self, report_name: str, report: Report, slot: datetime, meta: Mapping[str, Any]) -> Table:
        """Run the report's query or function for SLOT (aware, in the report's zone)."""
        if report.query is not None:
            return self._query(report_name, report, slot, meta)
        if report.function is not None:
            return self._function(report_name, report, slot)
        return Table((), ())

    def _query(self, report_name: str, report: Report, slot: datetime, meta: Mapping[str, Any]) -> Table:
        assert report.query is not None
        try:
            params = render_params(report.query.params, {"slot": slot, "report": meta})
        except INTERRUPTS:
            raise
        except Exception as exc:  # noqa: BLE001 - any template error in a parameter is the config's fault
            raise DataError(f"report {report_name!r}: query parameter: {exc}") from None
        try:
            with self.engine(report.query.datasource).connect() as conn:
                result = conn.execute(sa.text(report.query.sql), params)
                return Table(tuple(result.keys()), tuple(tuple(r) for r in result))
        except (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError) as exc:
            # The warehouse being down or locked is worth another try later.
            raise TransientDeliveryError(f"report {report_name!r}: datasource {report.query.datasource!r}: {_first_line(exc)}") from None
        except sa_exc.SQLAlchemyError as exc:
            raise DataError(f"report {report_name!r}: query failed: {_first_line(exc)}") from None

    def _function(self, report_name: str, report: Report, slot: datetime) -> Table:
        assert report.function is not None
        module_name, _, attr = report.function.partition(":")
        folder = str(self._config.source.parent.resolve())
        if folder not in sys.path:
            sys.path.append(folder)  # data functions may live beside schedules.yaml
        try:
            func: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                func = getattr(func, part)
        except (ImportError, AttributeError) as exc:
            raise DataError(f"report {report_name!r}: cannot import {report.function!r}: {exc}") from None
        try:
            value = func(slot=slot, report=report_name)
        except INTERRUPTS:
            raise
        except Exception as exc:  # noqa: BLE001 - user code; report it, don't crash the worker
            raise DataError(f"report {report_name!r}: {report.function} raised {type(exc).__name__}: {exc}") from None
        return Table.from_any(value)

    def dispose(self) -> None:
        for engine in self._engines.values():
            engine.dispose()
        self._engines.clear()


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    return str(orig or exc).strip().splitlines()[0] if str(orig or exc).strip() else type(exc).__name__

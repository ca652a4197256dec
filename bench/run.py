"""Run the figures and print the table: `python -m bench [--quick] [--only NAME]… [--json FILE]`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

from bench.figures import FIGURES, Context
from bench.parts import private_redis, smtp_sink
from bench.table import Row, render

QUICK_SKIPS = {"latency": "needs minutes of wall-clock time (one sample per report per minute); run it with --only latency"}
"""Figures a --quick run leaves out unless named with --only."""


def main(argv: list[str] | None = None) -> int:
    """Run the chosen figures; print the table (and write JSON); exit 1 if a figure could not be measured."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes: the whole suite in about two minutes")
    parser.add_argument(
        "--only", action="append", choices=sorted(FIGURES), metavar="NAME", help=f"run only this figure (repeatable): {', '.join(FIGURES)}"
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the rows as JSON, to compare runs")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (projects, worker logs)")
    args = parser.parse_args(argv)

    # A plain `kill` (or a batch job's timeout) still stops the workers, Redis and the PostgreSQL database it made.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # Reporter's own logging (a line per delivery) would drown the table.
    logging.basicConfig(level=logging.WARNING)
    names = args.only or [n for n in FIGURES if not (args.quick and n in QUICK_SKIPS)]
    skipped = [] if args.only else [f"{n}: {why}" for n, why in QUICK_SKIPS.items() if args.quick]
    folder = Path(tempfile.mkdtemp(prefix="reporter-bench-"))
    rows: list[Row] = []
    failures: list[str] = []
    timings: dict[str, float] = {}
    began = time.perf_counter()
    with private_redis(folder) as redis_url, smtp_sink() as sink:
        # Celery reads the broker when reporter.celery_app is first imported: point it at ours first.
        os.environ["REPORTER_BROKER_URL"] = redis_url
        ctx = Context(folder, redis_url, sink, args.quick, log=lambda m: print(m, file=sys.stderr, flush=True))
        for name in names:
            print(f"{name} …", file=sys.stderr, flush=True)
            started = time.perf_counter()
            try:
                found = FIGURES[name](ctx)
            except Exception as exc:  # noqa: BLE001 - one broken figure must not lose the others' numbers
                failures.append(f"{name}: {type(exc).__name__}: {exc}")
                traceback.print_exc()
                continue
            finally:
                timings[name] = time.perf_counter() - started
            rows += found
            print(render(found), file=sys.stderr, flush=True)
    total = time.perf_counter() - began
    print()
    print(render(rows))
    print()
    print(
        f"{'quick' if args.quick else 'full'} run of {', '.join(names)} in {total:.0f} s on {os.cpu_count()} CPUs ({platform.platform()})"
    )
    print("seconds per figure: " + ", ".join(f"{n} {t:.0f}" for n, t in timings.items()))
    for note in [*ctx.notes, *skipped]:
        print(f"note: {note}")
    for failure in failures:
        print(f"FAILED {failure}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "when": datetime.now(UTC).isoformat(timespec="seconds"),
                    "quick": args.quick,
                    "figures": names,
                    "seconds": round(total, 1),
                    "cpus": os.cpu_count(),
                    "rows": [r.as_dict() for r in rows],
                    "failures": failures,
                    "notes": ctx.notes,
                },
                indent=2,
            )
        )
    if args.keep:
        print(f"kept {folder}")
    else:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    return 1 if failures else 0

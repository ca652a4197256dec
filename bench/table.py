"""One measured figure, its baseline and target, and the printed table."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Target:
    """At most LIMIT, on the ratio to the baseline or on the value itself."""

    limit: float
    on: str = "ratio"
    """ratio or value"""

    def text(self, unit: str) -> str:
        return f"≤ {self.limit:g}×" if self.on == "ratio" else f"< {self.limit:g} {unit}"


@dataclass(frozen=True)
class Row:
    """One line of the table: a figure, what it is measured against in the same run, and the target."""

    figure: str
    """which benchmark (the --only name)"""
    what: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_what: str = ""
    higher_is_better: bool = False
    """Rates: the ratio is baseline ÷ value, so a ratio above 1 always means "costlier than the baseline"."""
    target: Target | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or self.baseline == 0 or self.value == 0:
            return None
        return self.baseline / self.value if self.higher_is_better else self.value / self.baseline

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        measured = self.ratio if self.target.on == "ratio" else self.value
        return None if measured is None else measured <= self.target.limit

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["target"] = (
            None if self.target is None else {"limit": self.target.limit, "on": self.target.on, "text": self.target.text(self.unit)}
        )
        out["ratio"] = self.ratio
        out["met"] = self.met
        return out


def number(value: float, unit: str) -> str:
    """VALUE with a sensible number of digits and its unit."""
    digits = 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 2 if abs(value) >= 1 else 3
    return f"{value:,.{digits}f} {unit}".strip()


def render(rows: Sequence[Row]) -> str:
    """The rows as a Markdown table (readable in a terminal, pastable into the README)."""
    head = ["figure", "measured", "baseline (same run)", "ratio", "target", ""]
    lines = [head]
    for row in rows:
        base = f"{number(row.baseline, row.unit)}: {row.baseline_what}" if row.baseline is not None else row.baseline_what or "—"
        ratio = f"{row.ratio:.2f}×" if row.ratio is not None else "—"
        target = row.target.text(row.unit) if row.target is not None else ""
        verdict = {True: "met", False: "NOT MET", None: ""}[row.met]
        what = row.what + (f" ({row.note})" if row.note else "")
        lines.append([what, number(row.value, row.unit), base, ratio, target, verdict])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) + " |" for line in lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)

"""The benchmark harness still runs end to end (its cheapest figure), so it cannot rot silently.

Not a benchmark: nothing here is timed or compared with a limit; it checks that a run produces a row
with a measured value and a baseline, and writes the JSON that before/after comparisons read.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_quick_small_figure_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "small", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    found = json.loads(out.read_text())
    assert found["failures"] == []
    (row,) = found["rows"]
    assert row["figure"] == "small"
    assert row["value"] > 0 and row["baseline"] > 0 and row["ratio"] > 0
    assert "one small HTML report" in done.stdout  # the printed table

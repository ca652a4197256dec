"""The schedules.yaml keys of what recipients get (csv_bom, unsubscribe_url, charts…): file:line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from reporter.config import load
from reporter.errors import ConfigError
from tests.test_config import BASE, write_project


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(write_project(tmp_path, text), {})
    return [str(p) for p in caught.value.problems]


def test_csv_bom_and_unsubscribe_url_are_read_with_defaults(tmp_path: Path) -> None:
    text = "defaults:\n  csv_bom: false\n  unsubscribe_url: https://example.com/u\n" + BASE + "    csv_bom: true\n"
    config = load(write_project(tmp_path, text), {})
    report = config.reports["r1"]
    assert config.csv_bom_of(report) is True and config.defaults.csv_bom is False
    assert config.unsubscribe_url_of(report) == "https://example.com/u"


@pytest.mark.parametrize("url", ["http://example.com/u", "mailto:a@example.com", "https://", "https://example.com/a b"])
def test_unsubscribe_url_must_be_https(tmp_path: Path, url: str) -> None:
    found = problems(tmp_path, BASE + f'    unsubscribe_url: "{url}"\n')
    why = f"{url!r} is not an https:// URL; one-click unsubscribe (RFC 8058) needs https"
    assert found == [f"{tmp_path}/schedules.yaml:7: reports.r1.unsubscribe_url: {why}"]

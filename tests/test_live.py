"""Live configuration (live.py): a process follows edits of schedules.yaml and its templates, applies
only versions that pass every check, never half-applies one, and renders a send with the version it
was dispatched under or a newer one."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from reporter.config import Config, load
from reporter.errors import ConfigError
from reporter.ledger import Ledger, config_versions
from reporter.live import Live, describe_change, load_checked, newly_due
from reporter.render import Renderer
from reporter.settings import Settings
from tests.conftest import Project


def settings_for(project: Project) -> Settings:
    return Settings.from_env(project.env())


def edit(project: Project, old: str, new: str) -> None:
    text = project.config.read_text()
    assert old in text, f"{old!r} not in the config"
    project.config.write_text(text.replace(old, new))


@pytest.fixture
def follow(make_project: Callable[..., Project]) -> Callable[..., tuple[Project, Live, Ledger]]:
    """A project and a Live over it (interval 0: every refresh looks at the files)."""
    made: list[Ledger] = []

    def make(**kwargs: object) -> tuple[Project, Live, Ledger]:
        project = make_project(**kwargs)
        settings = settings_for(project)
        ledger = Ledger.from_url(project.db_url)
        made.append(ledger)
        return project, Live(settings, load_checked(settings), ledger, interval=0), ledger

    yield make
    for ledger in made:
        ledger.dispose()


def test_an_edit_is_applied_whole_and_its_version_is_the_content_hash(follow: Callable[..., tuple[Project, Live, Ledger]]) -> None:
    project, live, ledger = follow()
    first = live.config.version
    assert live.refresh() is False, "nothing changed yet"
    edit(project, "Regional {{", "Regional report {{")
    assert live.refresh() is True
    assert live.config.version != first
    assert live.config.version == load(project.config, settings_for(project).variables).version
    assert live.config.reports["regional"].subject.startswith("Regional report")
    # Saving the same content again is no new version; undoing the edit is.
    project.config.write_text(project.config.read_text())
    assert live.refresh() is False
    edit(project, "Regional report {{", "Regional {{")
    assert live.refresh() is True and live.config.version == first
    # Both versions are in the ledger, with their content.
    assert set(ledger.config_seen(first, live.config.version)) == {first}
    assert "Regional {{" in (ledger.config_source(first) or "")


def test_an_invalid_edit_is_never_applied_and_logged_once_then_the_fix_applies(
    follow: Callable[..., tuple[Project, Live, Ledger]], caplog: pytest.LogCaptureFixture
) -> None:
    project, live, _ = follow()
    good = live.config
    states: list[tuple[str, int]] = []
    live.on_state = lambda version, problems: states.append((version, problems))
    edit(project, "    schedule:", "    schedul:")
    edit(project, "    template: simple.html", "    template: missing.html")
    with caplog.at_level(logging.ERROR, logger="reporter.live"):
        assert live.refresh() is False
        assert live.refresh(force=True) is False
    assert live.config is good, "the last good version keeps running"
    shown = [str(p) for p in live.problems]
    assert any("reports.regional.schedule: is required but missing" in p for p in shown), shown
    assert any("reports.regional.schedul: unknown key" in p for p in shown), shown
    assert any("template 'missing.html' not found" in p for p in shown), shown
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, "the same broken version is logged once"
    assert f"still running {good.version}" in errors[0].getMessage() and "schedules.yaml:" in errors[0].getMessage()
    assert states == [(good.version, len(shown))]
    edit(project, "    schedul:", "    schedule:")
    edit(project, "    template: missing.html", "    template: simple.html")
    assert live.refresh() is False, "the fixed file is the running version again"
    assert live.problems == () and live.bad_version is None


def test_a_broken_template_keeps_the_previous_templates_too(follow: Callable[..., tuple[Project, Live, Ledger]]) -> None:
    project, live, _ = follow()
    template = project.root / "templates" / "simple.html"
    before = template.read_text()
    template.write_text(before + "{% for x in rows %}\n")  # an unclosed block
    assert live.refresh() is False
    assert any("simple.html" in str(p) and "template syntax error" in str(p) for p in live.problems), live.problems
    # Rendering still uses the template as it was when the running version was loaded, not the file.
    renderer = Renderer(live.config)
    source, filename, _ = renderer.html_env.loader.get_source(renderer.html_env, "simple.html")  # type: ignore[union-attr]
    assert source == before and filename == str(template)


def test_a_send_dispatched_under_a_newer_version_adopts_it_from_the_ledger(
    follow: Callable[..., tuple[Project, Live, Ledger]],
) -> None:
    project, stale, ledger = follow()
    old = stale.config.version
    # Another process (beat, say) loads an edit and dispatches under it...
    edit(project, "Regional {{", "Newer {{")
    other = Live(settings_for(project), load_checked(settings_for(project)), ledger, interval=0)
    newer = other.config.version
    # ...then the file gets a broken edit before this process looked: it cannot load NEWER from disk.
    edit(project, "    subject:", "    subjekt:")
    assert stale.at_least(newer).version == newer
    assert stale.config.reports["regional"].subject.startswith("Newer")
    # A process that runs a version loaded after the dispatched one keeps its own (it is newer).
    edit(project, "    subjekt:", "    subject:")
    edit(project, "Newer {{", "Newest {{")
    assert other.refresh() is True
    assert other.at_least(old).version == other.config.version != old


def test_a_config_changed_back_after_a_version_is_the_newest_again(follow: Callable[..., tuple[Project, Live, Ledger]]) -> None:
    project, live, ledger = follow()
    first = live.config.version
    edit(project, "Regional {{", "Second {{")
    assert live.refresh()
    second = live.config.version
    edit(project, "Second {{", "Regional {{")  # undone: the first version is loaded from the file again
    assert live.refresh() and live.config.version == first
    assert live.at_least(second).version == first, "the version loaded last from the file is the newest"
    seen = ledger.config_seen(first, second)
    assert seen[first] > seen[second]


def test_changes_are_described_and_new_or_reenabled_reports_are_due_now(tmp_path: Path, make_project: Callable[..., Project]) -> None:
    project = make_project()
    old = load(project.config, {})
    text = project.config.read_text()
    added = text + text[text.index("  regional:") :].replace("  regional:", "  weekly-ops:", 1)
    project.config.write_text(added.replace("Regional {{", "Changed {{", 1))
    new = load(project.config, {})
    assert describe_change(old, new) == "reports added: weekly-ops; changed: regional"
    assert newly_due(old, new) == ["weekly-ops"]
    assert newly_due(new, old) == []
    assert describe_change(old, old) == "no report changed (other settings or templates)"


def test_load_checked_finds_template_errors_with_the_schema(make_project: Callable[..., Project]) -> None:
    project = make_project()
    (project.root / "templates" / "simple.html").write_text("{% if %}")
    with pytest.raises(ConfigError) as raised:
        load_checked(settings_for(project))
    assert any("simple.html" in str(p) for p in raised.value.problems)


def test_an_older_ledger_gets_the_new_columns(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        # The deliveries table as the first release created it, with one row.
        conn.execute(
            sa.text(
                "CREATE TABLE deliveries (id INTEGER PRIMARY KEY, report VARCHAR(200) NOT NULL, slot DATETIME NOT NULL, "
                'recipient VARCHAR(320) NOT NULL, status VARCHAR(16) NOT NULL, "trigger" VARCHAR(16) NOT NULL, attempts INTEGER NOT NULL, '
                "message_id VARCHAR(400), error TEXT, claim_token VARCHAR(64), task_id VARCHAR(64), created_at DATETIME NOT NULL, "
                "updated_at DATETIME NOT NULL, claimed_at DATETIME, sent_at DATETIME, duration_ms INTEGER, size_bytes INTEGER, "
                "CONSTRAINT uq_delivery_key UNIQUE (report, slot, recipient))"
            )
        )
        conn.execute(
            sa.text(
                'INSERT INTO deliveries (report, slot, recipient, status, "trigger", attempts, created_at, updated_at) '
                "VALUES ('r', '2026-01-01 07:00:00', 'a@example.com', 'sent', 'schedule', 1, '2026-01-01 07:00:00', '2026-01-01 07:00:00')"
            )
        )
    engine.dispose()
    ledger = Ledger.from_url(url)
    Ledger.from_url(url).dispose()  # a second process finds them there
    (row,) = ledger.rows()
    assert (row.recipient, row.status, row.wait_ms, row.config_version) == ("a@example.com", "sent", None, None)
    ledger.dispose()


def test_a_config_built_from_stored_content_renders_with_its_own_templates(make_project: Callable[..., Project]) -> None:
    project = make_project()
    settings = settings_for(project)
    config: Config = load_checked(settings)
    from reporter.live import content, from_content

    stored = content(config)
    (project.root / "templates" / "simple.html").write_text("<p>changed on disk</p>")
    again = from_content(settings, stored)
    assert again.version == config.version
    assert again.templates["simple.html"] == config.templates["simple.html"] != "<p>changed on disk</p>"


def test_prune_keeps_versions_in_use_or_loaded_lately(tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    ledger = Ledger.from_url(f"sqlite:///{tmp_path / 'l.db'}")
    for version in ("old-unused", "old-in-use", "recent"):
        ledger.remember_config(version, "{}")
    slot = datetime(2026, 1, 1, 7, tzinfo=UTC)
    ledger.ensure("r", slot, ["a@example.com"])
    claim = ledger.claim("r", slot, ["a@example.com"], 60, config_version="old-in-use")
    assert claim.mine == ("a@example.com",)
    ledger.remember_config("recent", "{}")
    cutoff = datetime.now(UTC) + timedelta(seconds=1)  # everything is older than this...
    with ledger.engine.begin() as conn:  # ...but "recent" was loaded after it
        conn.execute(config_versions.update().where(config_versions.c.version == "recent").values(seen_at=cutoff + timedelta(hours=1)))
    ledger.prune(cutoff)
    assert set(ledger.config_seen("old-unused", "old-in-use", "recent")) == {"old-in-use", "recent"}
    ledger.dispose()


def test_the_metrics_say_which_version_runs_and_how_many_problems_the_files_have() -> None:
    from prometheus_client import REGISTRY, generate_latest

    from reporter.metrics import PrometheusObserver

    observer = PrometheusObserver()
    observer.configured("aaaaaaaaaaaa", 0)
    observer.configured("aaaaaaaaaaaa", 3)  # an edit with three problems: the version stays
    scraped = generate_latest(REGISTRY).decode()
    assert "reporter_config_problems 3.0" in scraped
    assert 'reporter_config_version_info{version="aaaaaaaaaaaa"} 1.0' in scraped
    observer.configured("bbbbbbbbbbbb", 0)  # fixed, and a new version applied
    scraped = generate_latest(REGISTRY).decode()
    assert "reporter_config_problems 0.0" in scraped
    assert 'reporter_config_version_info{version="bbbbbbbbbbbb"} 1.0' in scraped
    assert 'reporter_config_version_info{version="aaaaaaaaaaaa"} 0.0' in scraped


def test_a_config_a_forked_child_inherits_does_not_count_as_loaded_now(follow: Callable[..., tuple[Project, Live, Ledger]]) -> None:
    project, parent, ledger = follow()
    inherited = parent.config
    # Beat loads an edit and dispatches under it; then the file gets a broken edit.
    edit(project, "Regional {{", "Newer {{")
    newer = Live(settings_for(project), load_checked(settings_for(project)), ledger, interval=0).config.version
    edit(project, "    subject:", "    subjekt:")
    # A pool child forked from the parent starts with the parent's (older) config...
    child = Live(settings_for(project), inherited, ledger, interval=0, loaded=False)
    # ...which must not look newer than the dispatched version because the child started later.
    assert child.at_least(newer).version == newer

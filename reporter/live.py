"""Live configuration: every process follows an edited schedules.yaml (and its templates), safely.

A process runs the last configuration that passed every check. At most every REPORTER_RELOAD_INTERVAL seconds
it looks at the files (a `stat` of each; nothing is read while nothing changed). When their content
hash, the version, differs from the one it runs, it loads the files and checks them like
`reporter validate`; only if every check passes is the new version applied, whole: the config and the
templates read with it (rendering uses those copies, never the files). A version that fails is never
applied: its problems are logged once, and kept for `reporter status`.

Every version a process loads is stored in the ledger (`config_versions`) with the time it was last
loaded. A send carries the version it was dispatched under; a worker that runs an older one looks at
the files at once and, if they do not give that version or a newer one (a broken edit since, or this
host's copy lags behind), takes the dispatched version from the ledger. So a send is rendered with the
configuration it was dispatched under or a newer one, never an older one.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from reporter import config as config_mod
from reporter.config import Config
from reporter.errors import ConfigError, Problem
from reporter.ledger import Ledger
from reporter.settings import Settings

log = logging.getLogger(__name__)

Fingerprint = tuple[tuple[str, int, int], ...]


def fingerprint(config_path: Path, templates_dir: Path) -> Fingerprint:
    """(name, mtime_ns, size) of the config file and of every file under the templates folder: cheap to
    take, and different whenever an editor saves one of them."""
    out: list[tuple[str, int, int]] = []
    for path in (config_path, *(sorted(templates_dir.rglob("*")) if templates_dir.is_dir() else ())):
        try:
            st = path.stat()
        except OSError:
            out.append((str(path), -1, -1))
            continue
        if path == config_path or path.is_file():
            out.append((str(path), st.st_mtime_ns, st.st_size))
    return tuple(out)


def content(config: Config) -> str:
    """What the ledger stores of a version: the file's text and the templates, as JSON."""
    return json.dumps({"file": config.text, "templates": dict(config.templates)}, sort_keys=True)


def load_checked(settings: Settings) -> Config:
    """The configuration on disk, only if it passes every check `reporter validate` makes; ConfigError
    listing every problem otherwise."""
    from reporter import checks

    return checks.load_checked(settings.config_path, settings.variables, settings.templates_dir)


def from_content(settings: Settings, stored: str) -> Config:
    """A stored version (see `content`) as a checked Config, read with this process's environment."""
    from reporter import checks

    data = json.loads(stored)
    draft = config_mod.draft(data["file"], str(settings.config_path), settings.variables, settings.templates_dir, data["templates"])
    return checks.checked(draft)


class Live:
    """The configuration this process runs, kept up to date with the files.

    `config` is always a version that passed every check. `problems` are those of the files on disk
    when they hold a version that did not (empty otherwise).
    """

    def __init__(
        self,
        settings: Settings,
        config: Config,
        ledger: Ledger | None = None,
        interval: float | None = None,
        on_change: Callable[[Config, Config], None] | None = None,
        on_state: Callable[[str, int], None] | None = None,
        loaded: bool = True,
    ) -> None:
        """LOADED: CONFIG was just loaded from the files (False: inherited from a parent process), so it
        is stored as the newest version; an inherited one must not look newer than it is."""
        self.settings = settings
        self.config = config
        self.since = datetime.now(UTC)
        self.ledger = ledger
        self.interval = settings.reload_interval if interval is None else interval
        self.on_change = on_change
        self.on_state = on_state
        """Told (running version, problems of the files) after each version applied or refused: metrics."""
        self.problems: tuple[Problem, ...] = ()
        self.bad_version: str | None = None
        # Unknown: the first look compares the files' content with CONFIG (which a forked child may
        # have inherited from before an edit).
        self._fingerprint: Fingerprint | None = None
        self._looked_at = float("-inf")
        if loaded:
            self._remember(config)

    def refresh(self, force: bool = False) -> bool:
        """Look at the files (if INTERVAL has passed, or FORCE); apply a new version that passes every
        check. True if a new version was applied."""
        now = time.monotonic()
        if not force and now - self._looked_at < self.interval:
            return False
        self._looked_at = now
        settings = self.settings
        seen = fingerprint(settings.config_path, settings.templates_dir)
        if seen == self._fingerprint and not force:  # FORCE reads them anyway: two saves within one mtime tick look alike
            return False
        self._fingerprint = seen
        try:
            raw = settings.config_path.read_bytes()
        except OSError as exc:
            return self._refuse(f"unreadable:{exc.errno}", [Problem(str(settings.config_path), None, "", f"cannot read: {exc.strerror}")])
        version = config_mod.version_of(raw, config_mod.read_templates(settings.templates_dir))
        if version == self.config.version:
            self.problems, self.bad_version = (), None  # an edit undone, or a save without a change
            return False
        if version == self.bad_version:
            return False
        try:
            loaded = load_checked(settings)
        except ConfigError as exc:
            return self._refuse(version, exc.problems)
        if loaded.version == self.config.version:
            return False  # changed back while we read it
        self._apply(loaded)
        self._remember(loaded)
        return True

    def at_least(self, version: str | None) -> Config:
        """The config to render a send dispatched under VERSION: this process's, if it is VERSION or
        newer, else VERSION itself from the ledger. Raises ConfigError if VERSION cannot be had."""
        if not version or version == self.config.version:
            return self.config
        self.refresh(force=True)
        if version == self.config.version or self.ledger is None:
            return self.config
        seen = self.ledger.config_seen(version, self.config.version)
        if version not in seen or (self.config.version in seen and seen[self.config.version] >= seen[version]):
            return self.config  # ours was loaded from the files after VERSION was: it is newer
        stored = self.ledger.config_source(version)
        if stored is None:
            return self.config
        adopted = from_content(self.settings, stored)
        log.warning(
            "configuration %s: this process's files give %s (older), so it runs %s as dispatched, from the ledger",
            version,
            self.config.version,
            version,
        )
        self._apply(adopted)
        return adopted

    def _apply(self, new: Config) -> None:
        old = self.config
        self.config, self.since, self.problems, self.bad_version = new, datetime.now(UTC), (), None
        log.info("configuration %s applied (was %s): %s", new.version, old.version, describe_change(old, new))
        if self.on_change is not None:
            self.on_change(old, new)
        if self.on_state is not None:
            self.on_state(new.version, 0)

    def _refuse(self, version: str, problems: list[Problem]) -> bool:
        if version != self.bad_version:
            listed = "\n".join(f"  {p}" for p in problems)
            log.error(
                "configuration: %s has %d problem(s); still running %s (from %s):\n%s",
                self.settings.config_path,
                len(problems),
                self.config.version,
                self.since.isoformat(timespec="seconds"),
                listed,
            )
        self.bad_version, self.problems = version, tuple(problems)
        if self.on_state is not None:
            self.on_state(self.config.version, len(problems))
        return False

    def _remember(self, config: Config) -> None:
        if self.ledger is None:
            return
        try:
            self.ledger.remember_config(config.version, content(config))
        except Exception as exc:  # noqa: BLE001 - a ledger hiccup must not stop a process from following its files
            log.warning("configuration %s: could not store it in the ledger: %s", config.version, exc)


def describe_change(old: Config, new: Config) -> str:
    """'reports added: a; removed: b; changed: c' (or 'no report changed')."""
    added = sorted(set(new.reports) - set(old.reports))
    removed = sorted(set(old.reports) - set(new.reports))
    changed = sorted(n for n in set(old.reports) & set(new.reports) if old.reports[n] != new.reports[n])
    parts = [f"{what}: {', '.join(names)}" for what, names in (("added", added), ("removed", removed), ("changed", changed)) if names]
    return "reports " + "; ".join(parts) if parts else "no report changed (other settings or templates)"


def newly_due(old: Config, new: Config) -> list[str]:
    """Reports that the dispatcher's current window knows nothing of: added, or enabled again."""
    return sorted(n for n, r in new.reports.items() if r.enabled and (n not in old.reports or not old.reports[n].enabled))

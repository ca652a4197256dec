"""Who gets one report slot, and in which messages: To, Cc and Bcc, each address exactly once.

Every address, whatever its role, is one ledger row (report, slot, address), so Cc and Bcc readers
are claimed, sent and recorded like any recipient, and get one copy per slot. With `group: false`
each To address gets its own message; the claimed Cc and Bcc addresses ride on the first of those
messages (or, when no To address is left to send to, on a message of their own). Headers name only
who receives that very message, and never a Bcc address.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import parseaddr

from reporter.config import NAMED_ADDRESS_RE, PLAIN_ADDRESS_RE, Report, normalize_address

BURST_KEY = "(burst)"
"""The ledger key of a burst slot's planning row: dispatch cannot know the readers (beat never queries a
warehouse), so this is the one row it records for the slot; the send that claims it plans (reporter.burst)."""

UNDISCLOSED = "undisclosed-recipients:;"
"""The To header of a message that goes only to Cc or Bcc readers (RFC 5322 empty group)."""


@functools.lru_cache(maxsize=1 << 18)
def key_of(address: str) -> str:
    """The ledger key of an address: bare, normalised, lower case."""
    normalized = normalize_address(address)
    # The shapes the header parser returns as written (config.py): skip it, as normalisation does.
    if PLAIN_ADDRESS_RE.fullmatch(normalized):
        return normalized.lower()
    if named := NAMED_ADDRESS_RE.fullmatch(normalized):
        return named.group(2).lower()
    return parseaddr(normalized)[1].lower()


def _keyed(values: Sequence[str], taken: set[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values:
        key = key_of(value)
        if key not in taken:
            out[key] = normalize_address(value)
            taken.add(key)
    return out


@dataclass(frozen=True)
class Audience:
    """Ledger key -> address as written for the header, per role; no address in two roles."""

    to: dict[str, str]
    cc: dict[str, str]
    bcc: dict[str, str]

    def keys(self) -> list[str]:
        """Every address of the slot, To first: the ledger rows to ensure and claim."""
        return [*self.to, *self.cc, *self.bcc]


def audience(report: Report, only: Sequence[str] | None = None) -> Audience:
    """Who gets REPORT: its To, Cc and Bcc, or just ONLY (a retry's or `send --to`'s addresses).

    An address listed in two roles is sent once, in the more visible one (To, then Cc, then Bcc).
    An address in ONLY keeps the role the report gives it; any other address in ONLY is a To.
    """
    if report.burst is not None:
        # The planning row, or readers' keys (a piece, a retry, `send --to`): every one a To.
        if only is None:
            return Audience({BURST_KEY: BURST_KEY}, {}, {})
        planning = {BURST_KEY: BURST_KEY} if BURST_KEY in only else {}
        return Audience(planning | {key_of(a): normalize_address(a) for a in only if a != BURST_KEY}, {}, {})
    taken: set[str] = set()
    full = Audience(_keyed(report.recipients, taken), _keyed(report.cc, taken), _keyed(report.bcc, taken))
    if only is None:
        return full
    # Roles as in the full audience, so a retry of some rows treats each address as the first run did.
    wanted = {key_of(a) for a in only}
    cc = {k: v for k, v in full.cc.items() if k in wanted}
    bcc = {k: v for k, v in full.bcc.items() if k in wanted}
    return Audience(_keyed([a for a in only if key_of(a) not in cc and key_of(a) not in bcc], set()), cc, bcc)


_KEYS: dict[int, tuple[Report, tuple[str, ...]]] = {}
"""id(report) -> (report, its audience's keys). Reports are immutable, so the keys never change."""


def keys_of(report: Report) -> tuple[str, ...]:
    """`audience(report).keys()`, worked out once per Report object: a dispatcher with thousands of
    reports does not validate and normalise every address again on every dispatch."""
    found = _KEYS.get(id(report))
    if found is not None and found[0] is report:  # the same object, not one that reuses a dead one's id
        return found[1]
    if len(_KEYS) >= 100_000:
        _KEYS.clear()  # configs replaced by live reloads leave their reports behind
    keys = tuple(audience(report).keys())
    _KEYS[id(report)] = (report, keys)
    return keys


@dataclass(frozen=True)
class Envelope:
    """One message: the ledger keys it is sent to, by role."""

    to: tuple[str, ...]
    cc: tuple[str, ...] = ()
    bcc: tuple[str, ...] = ()

    @property
    def rows(self) -> list[str]:
        """Every ledger key this message delivers, in SMTP envelope order."""
        return [*self.to, *self.cc, *self.bcc]

    def id_key(self, group: bool) -> str:
        """What the message's deterministic Message-ID is derived from."""
        if not self.to:
            return "cc+bcc:" + ",".join(sorted([*self.cc, *self.bcc]))
        return ",".join(sorted(self.to)) if group else self.to[0]


def envelopes(who: Audience, mine: Sequence[str], group: bool) -> list[Envelope]:
    """The messages that deliver the claimed keys MINE once each."""
    claimed = set(mine)
    to = tuple(k for k in who.to if k in claimed)
    cc = tuple(k for k in who.cc if k in claimed)
    bcc = tuple(k for k in who.bcc if k in claimed)
    if not to:
        return [Envelope((), cc, bcc)] if cc or bcc else []
    if group:
        return [Envelope(to, cc, bcc)]
    return [Envelope(to[:1], cc, bcc), *(Envelope((k,)) for k in to[1:])]

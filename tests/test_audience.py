"""Cc and Bcc: one copy per (report, slot) each, recorded in the ledger, Bcc never in a header or file."""

from __future__ import annotations

import mailbox
import os
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from reporter.audience import Audience, Envelope, audience, envelopes
from reporter.config import Report
from reporter.ledger import Ledger
from tests.conftest import Inbox, Project, run_cli


def report(**extra: Any) -> Report:
    fields: dict[str, Any] = {"schedule": "0 7 * * *", "subject": "s", "template": "t.html", "recipients": ["a@x.com", "B <b@x.com>"]}
    return Report.model_validate({**fields, **extra})


# --------------------------------------------------------------------------- who, pure


def test_audience_keys_every_role_once_in_the_most_visible_role() -> None:
    who = audience(report(cc=["Boss <boss@x.com>", "a@x.com"], bcc=["audit@x.com", "BOSS@x.com", "b@x.com"]))
    assert who == Audience(
        to={"a@x.com": "a@x.com", "b@x.com": "B <b@x.com>"},
        cc={"boss@x.com": "Boss <boss@x.com>"},
        bcc={"audit@x.com": "audit@x.com"},
    )
    assert who.keys() == ["a@x.com", "b@x.com", "boss@x.com", "audit@x.com"]


@pytest.mark.parametrize(
    ("only", "to", "cc", "bcc"),
    [
        (["b@x.com"], ["b@x.com"], [], []),
        (["boss@x.com", "audit@x.com"], [], ["boss@x.com"], ["audit@x.com"]),  # a retry keeps the roles
        (["new@x.com", "AUDIT@x.com"], ["new@x.com"], [], ["audit@x.com"]),
        (["a@x.com"], ["a@x.com"], [], []),  # a To address also listed as Cc stays a To, as in the first run
    ],
)
def test_audience_of_only_keeps_each_addresses_role(only: list[str], to: list[str], cc: list[str], bcc: list[str]) -> None:
    who = audience(report(cc=["boss@x.com", "a@x.com"], bcc=["audit@x.com"]), only)
    assert (list(who.to), list(who.cc), list(who.bcc)) == (to, cc, bcc)


WHO = Audience({"a": "a", "b": "b", "c": "c"}, {"cc": "cc"}, {"bcc": "bcc"})


@pytest.mark.parametrize(
    ("mine", "group", "expected"),
    [
        (["a", "b", "c", "cc", "bcc"], False, [Envelope(("a",), ("cc",), ("bcc",)), Envelope(("b",)), Envelope(("c",))]),
        (["a", "b", "c", "cc", "bcc"], True, [Envelope(("a", "b", "c"), ("cc",), ("bcc",))]),
        (["b", "c", "bcc"], False, [Envelope(("b",), (), ("bcc",)), Envelope(("c",))]),
        (["cc", "bcc"], False, [Envelope((), ("cc",), ("bcc",))]),  # the To rows were done earlier
        (["bcc"], True, [Envelope((), (), ("bcc",))]),
        (["b"], False, [Envelope(("b",))]),
        ([], False, []),
    ],
)
def test_envelopes_deliver_each_claimed_key_once(mine: list[str], group: bool, expected: list[Envelope]) -> None:
    found = envelopes(WHO, mine, group)
    assert found == expected
    rows = [r for e in found for r in e.rows]
    assert sorted(rows) == sorted(mine)


def test_message_ids_differ_for_every_envelope() -> None:
    keys = [e.id_key(False) for e in envelopes(WHO, ["a", "b", "c", "cc", "bcc"], False)]
    keys += [Envelope((), ("cc",), ("bcc",)).id_key(False), Envelope(("a", "b")).id_key(True)]
    assert len(set(keys)) == len(keys)


# --------------------------------------------------------------------------- a real send


def with_cc_bcc(make_project: Callable[..., Project], group: bool = False) -> Project:
    project = make_project(recipients=["ann@example.com", "ben@example.com"])
    document = yaml.safe_load(project.config.read_text())
    document["reports"]["regional"].update(cc=["Boss <boss@example.com>"], bcc=["audit@example.com"], group=group)
    project.config.write_text(yaml.safe_dump(document, sort_keys=False))
    return project


@pytest.mark.parametrize("group", [False, True])
@pytest.mark.slow
def test_cc_and_bcc_get_one_email_per_slot_recorded_in_the_ledger(make_project: Callable[..., Project], inbox: Inbox, group: bool) -> None:
    project = with_cc_bcc(make_project, group)
    env = project.env(REPORTER_SMTP_URL=inbox.url)
    for _ in range(2):  # the second send of the slot finds every row sent
        done = run_cli("send", "regional", "--sync", "--slot", "2026-07-01T07:00", env=env)
        assert done.returncode == 0, done.stdout + done.stderr

    per_address = Counter(r for _, rcpts in inbox.envelopes for r in rcpts)
    assert per_address == {"ann@example.com": 1, "ben@example.com": 1, "boss@example.com": 1, "audit@example.com": 1}
    assert len(inbox.messages) == (1 if group else 2)
    assert len({m["Message-ID"] for m in inbox.messages}) == len(inbox.messages)
    for msg in inbox.messages:
        assert b"audit@example.com" not in msg.as_bytes()  # in no header, in no part
    [copied] = inbox.to("boss@example.com")
    assert copied["Cc"] == "Boss <boss@example.com>"
    assert inbox.to("audit@example.com") == [copied]  # Bcc rides on the copy the Cc reader gets

    rows = Ledger.from_url(project.db_url).rows(report="regional")
    assert sorted((r.recipient, r.status) for r in rows) == [
        ("ann@example.com", "sent"),
        ("audit@example.com", "sent"),
        ("ben@example.com", "sent"),
        ("boss@example.com", "sent"),
    ]


@pytest.mark.slow
def test_cc_and_bcc_left_over_after_the_to_rows_get_a_message_of_their_own(make_project: Callable[..., Project], inbox: Inbox) -> None:
    project = with_cc_bcc(make_project)
    env = project.env(REPORTER_SMTP_URL=inbox.url)
    slot = ["--slot", "2026-07-01T07:00"]
    first = run_cli("send", "regional", "--sync", *slot, "--to", "ann@example.com", "--to", "ben@example.com", env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert inbox.to("boss@example.com") == [] and inbox.to("audit@example.com") == []
    # The slot's full send finds the To rows sent; only the Cc and Bcc readers are left.
    rest = run_cli("send", "regional", "--sync", *slot, env=env)
    assert rest.returncode == 0, rest.stdout + rest.stderr
    per_address = Counter(r for _, rcpts in inbox.envelopes for r in rcpts)
    assert per_address == {"ann@example.com": 1, "ben@example.com": 1, "boss@example.com": 1, "audit@example.com": 1}
    [msg] = inbox.to("boss@example.com")
    assert inbox.to("audit@example.com") == [msg]
    assert msg["To"] == "undisclosed-recipients:;"
    assert msg["Cc"] == "Boss <boss@example.com>"
    assert b"audit@example.com" not in msg.as_bytes()


@pytest.mark.slow
def test_maildir_never_stores_the_bcc_address(make_project: Callable[..., Project]) -> None:
    project = with_cc_bcc(make_project)
    done = run_cli("send", "regional", "--sync", "--slot", "2026-07-01T07:00", env=project.env())
    assert done.returncode == 0, done.stdout + done.stderr
    box = mailbox.Maildir(str(project.root / "outbox"), create=False)
    raw = [box.get_bytes(key) for key in box.keys()]
    assert len(raw) == 2
    assert all(b"audit@example.com" not in data for data in raw)
    envelope_to = sorted(box[key]["X-Reporter-Envelope-To"] for key in box.keys())
    assert envelope_to == ["ann@example.com, boss@example.com", "ben@example.com"]
    assert sorted(str(box[key]["X-Reporter-Bcc-Count"]) for key in box.keys()) == ["1", "None"]
    assert not any(name.startswith("audit") for name in os.listdir(project.root / "outbox" / "new"))

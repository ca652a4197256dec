"""Beat's lease in the ledger database (reporter.lease.LedgerLease, beat's Leader over it), in-process
against a real SQLite file and a real PostgreSQL database. The PostgreSQL cases skip on a laptop without
it and fail in CI.

Expiry is produced by moving the row's `expires_at` into the past, as the Redis tests delete the key:
no test waits for a clock."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from reporter import defaults
from reporter.beat import Leader, leader_lease
from reporter.lease import LedgerLease
from reporter.ledger import Ledger, leases, now
from reporter.lock import RedisLock
from tests.conftest import PG_ADMIN_URL

NAME = defaults.BEAT_LEADER_KEY


def expire(ledger: Ledger, name: str = NAME) -> None:
    """As if the holder had stopped renewing a lease's worth of time ago."""
    with ledger.engine.begin() as conn:
        conn.execute(leases.update().where(leases.c.name == name).values(expires_at=now() - timedelta(seconds=1)))


def test_one_holder_gets_the_lease_and_the_other_waits(open_ledger: Callable[[], Ledger]) -> None:
    a = LedgerLease(NAME, 30, ledger=open_ledger(), owner="host-a:11:aaaa")
    b = LedgerLease(NAME, 30, ledger=open_ledger(), owner="host-b:22:bbbb")
    assert a.acquire() is True
    assert b.acquire() is False
    assert b.holder() == {"id": "host-a:11:aaaa", "host": "host-a", "pid": "11", "since": (a.holder() or {})["since"]}
    assert a.acquire() is True  # its own lease: taking it again extends it
    assert b.renew() is False  # renewing a lease one does not hold fails ...
    assert (b.holder() or {})["id"] == "host-a:11:aaaa"  # ... and changes nothing
    assert a.renew() is True


def test_expiry_hands_the_lease_over_and_the_old_holder_can_neither_renew_nor_release(open_ledger: Callable[[], Ledger]) -> None:
    ledger = open_ledger()
    old = LedgerLease(NAME, 30, ledger=ledger)
    new = LedgerLease(NAME, 30, ledger=open_ledger())
    assert old.acquire()
    expire(ledger)
    assert old.holder() is None  # an expired lease has no holder
    assert new.acquire() is True
    assert old.renew() is False
    assert old.release() is False
    assert old.acquire() is False
    assert (old.holder() or {})["id"] == new.owner


def test_an_expired_lease_is_not_renewed_even_by_its_holder(open_ledger: Callable[[], Ledger]) -> None:
    ledger = open_ledger()
    lease = LedgerLease(NAME, 30, ledger=ledger)
    assert lease.acquire()
    expire(ledger)
    # Another beat may have seen it expired and be about to take it: renewal must not revive it.
    assert lease.renew() is False


def test_release_frees_the_lease_at_once(open_ledger: Callable[[], Ledger]) -> None:
    a = LedgerLease(NAME, 30, ledger=open_ledger())
    b = LedgerLease(NAME, 30, ledger=open_ledger())
    assert a.acquire() and not b.acquire()
    assert a.release() is True
    assert a.release() is False
    assert a.holder() is None
    assert b.acquire() is True


def test_leases_of_different_names_are_independent(open_ledger: Callable[[], Ledger]) -> None:
    ledger = open_ledger()
    assert LedgerLease("one", 30, ledger=ledger).acquire()
    assert LedgerLease("two", 30, ledger=ledger).acquire()


@pytest.mark.parametrize("existing", [False, True], ids=["no-row-yet", "expired-row"])
def test_eight_contenders_at_once_one_wins(open_ledger: Callable[[], Ledger], existing: bool) -> None:
    """The race the lease exists for: contenders with their own connections, all at the same instant,
    on a missing row (the INSERT race) and on an expired one (the UPDATE race)."""
    if existing:
        first = open_ledger()
        assert LedgerLease(NAME, 30, ledger=first).acquire()
        expire(first)
    contenders = [LedgerLease(NAME, 30, ledger=open_ledger()) for _ in range(8)]
    start = threading.Barrier(len(contenders))
    won: list[bool] = [False] * len(contenders)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            start.wait()
            won[i] = contenders[i].acquire()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(contenders))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert won.count(True) == 1
    winner = contenders[won.index(True)]
    assert (contenders[0].holder() or {})["id"] == winner.owner


def test_beats_over_the_ledger_lease_lead_one_at_a_time(open_ledger: Callable[[], Ledger]) -> None:
    ledger = open_ledger()
    a = Leader(LedgerLease(NAME, 30, ledger=ledger, owner="a:1:x"), where="the ledger")
    b = Leader(LedgerLease(NAME, 30, ledger=open_ledger(), owner="b:2:y"), where="the ledger")
    assert a.tick({"config": "v1"}) == (True, True)
    assert b.tick() == (False, False)
    assert a.tick() == (True, False)  # renewed: no second catch-up
    expire(ledger)  # a died (SIGKILL): nobody renews
    assert b.tick() == (True, True)
    assert a.tick() == (False, False)  # a comes back: it finds its lease lost and stands by
    assert a.leading is False
    b.resign()
    assert a.tick() == (True, True)


def test_beat_starts_as_a_standby_while_the_ledger_is_down_and_leads_once_it_answers(pg_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """PostgreSQL answers but the ledger's database does not exist yet (as while it is being restored):
    beat waits, says so once, and takes the lease on the first tick after it is there."""
    name = f"{sa.make_url(pg_url).database}_late"
    url = sa.make_url(pg_url).set(database=name).render_as_string(hide_password=False)
    lease = LedgerLease(NAME, 30, url=url)
    leader = Leader(lease, where="the ledger database")
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with caplog.at_level(logging.WARNING, logger="reporter.beat"):
            assert leader.tick() == (False, False)
            assert leader.tick() == (False, False)
        said = [r.getMessage() for r in caplog.records if "does not answer" in r.getMessage()]
        assert len(said) == 1, said
        assert "standing by" in said[0] and name in said[0]
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        assert leader.tick() == (True, True)
        assert (lease.holder() or {})["id"] == lease.owner
    finally:
        lease.close()
        with admin.connect() as conn:
            conn.execute(sa.text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


def test_beat_picks_the_lease_by_broker(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/l.db"
    redis_lock, where = leader_lease("redis://127.0.0.1:6379/0", url, 30)
    assert isinstance(redis_lock, RedisLock) and where == "Redis"
    for broker in ("amqp://guest:guest@127.0.0.1:5672//", "pyamqp://127.0.0.1//"):
        lease, where = leader_lease(broker, url, 30)
        assert isinstance(lease, LedgerLease) and lease.url == url and "ledger database" in where
    assert not (tmp_path / "l.db").exists()  # nothing is opened before beat's first tick


def test_the_lease_table_comes_with_the_ledger(tmp_path: Path) -> None:
    ledger = Ledger.from_url(f"sqlite:///{tmp_path}/{uuid.uuid4().hex}.db")
    try:
        assert "leases" in sa.inspect(ledger.engine).get_table_names()
    finally:
        ledger.dispose()

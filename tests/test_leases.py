"""The beat lease (RedisLock, beat's Leader) and the shared rate limit, in-process against the real Redis at
127.0.0.1:6379: each test uses its own key prefix and deletes what it wrote. Without that Redis the tests
skip on a laptop and fail in CI."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from reporter.beat import Leader
from reporter.errors import TransientDeliveryError
from reporter.lock import RedisLock
from reporter.ratelimit import MARGIN, LocalLimiter, RedisLimiter, for_broker
from reporter.runner import free_port
from tests.conftest import need

REDIS_URL = os.environ.get("REPORTER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
def client() -> Iterator[Any]:
    import redis

    conn = redis.Redis.from_url(REDIS_URL, socket_timeout=5, socket_connect_timeout=5)
    try:
        conn.ping()
    except redis.RedisError as exc:
        need("Redis", f"{REDIS_URL}: {exc}")
    yield conn
    conn.close()


@pytest.fixture
def prefix(client: Any) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    name = f"reporter-test:{uuid.uuid4().hex[:10]}:"
    yield name
    for key in client.scan_iter(match=f"{name}*"):
        client.delete(key)


def dead_client() -> Any:
    import redis

    return redis.Redis(host="127.0.0.1", port=free_port(), socket_timeout=1, socket_connect_timeout=1)


# ----------------------------------------------------------------------------- RedisLock


def test_one_owner_holds_the_lock_and_says_who_it_is(client: Any, prefix: str) -> None:
    first = RedisLock(client, prefix + "leader", 30, owner="host-a:11:aaaa")
    second = RedisLock(client, prefix + "leader", 30, owner="host-b:22:bbbb")
    assert first.acquire() is True
    assert second.acquire() is False
    assert second.holder() == {"id": "host-a:11:aaaa", "host": "host-a", "pid": "11", "since": first.holder()["since"]}  # type: ignore[index]
    assert 0 < client.pttl(prefix + "leader") <= 30_000


def test_renewal_keeps_the_lease_and_a_lost_lease_is_not_renewed(client: Any, prefix: str) -> None:
    lock = RedisLock(client, prefix + "leader", 30)
    assert lock.acquire()
    client.pexpire(prefix + "leader", 50)  # as if the leader had stalled near the end of its lease
    assert lock.renew() is True
    assert client.pttl(prefix + "leader") > 1000
    client.delete(prefix + "leader")  # the lease ran out
    assert lock.renew() is False
    assert lock.holder() is None


def test_a_stalled_leader_can_neither_renew_nor_release_its_successors_lock(client: Any, prefix: str) -> None:
    old = RedisLock(client, prefix + "leader", 30)
    new = RedisLock(client, prefix + "leader", 30)
    assert old.acquire()
    client.delete(prefix + "leader")  # old's lease expired while it stalled
    assert new.acquire()
    assert old.renew() is False
    assert old.release() is False
    assert (new.holder() or {})["id"] == new.owner
    assert new.release() is True
    assert new.holder() is None


# ----------------------------------------------------------------------------- beat's leader election


def test_one_beat_leads_a_second_stands_by_and_takes_over_when_the_lease_ends(client: Any, prefix: str) -> None:
    key, tick = prefix + "leader", prefix + "tick"
    a = Leader(RedisLock(client, key, 30, owner="a:1:x"), tick_key=tick)
    b = Leader(RedisLock(client, key, 30, owner="b:2:y"), tick_key=tick)
    assert a.tick({"config": "v1"}) == (True, True)  # leads, and has just become leader: catch up now
    assert b.tick() == (False, False)
    assert a.tick() == (True, False)  # renewed: still leading, no second catch-up
    assert json.loads(client.get(tick))["id"] == "a:1:x"
    client.delete(key)  # a died: its lease ran out without renewal
    assert b.tick() == (True, True)
    assert json.loads(client.get(tick))["id"] == "b:2:y"
    assert a.tick() == (False, False)  # a comes back: the lock is b's, a stands by
    assert a.leading is False and b.leading is True


def test_a_leader_that_resigns_hands_over_at_once(client: Any, prefix: str) -> None:
    a = Leader(RedisLock(client, prefix + "leader", 30), tick_key=prefix + "tick")
    b = Leader(RedisLock(client, prefix + "leader", 30), tick_key=prefix + "tick")
    assert a.tick()[0] and not b.tick()[0]
    a.resign()
    a.resign()  # Celery may close a scheduler twice
    assert b.tick() == (True, True)


def test_a_beat_that_cannot_reach_redis_sends_nothing() -> None:
    leader = Leader(RedisLock(dead_client(), "reporter-test:unreachable", 30))
    leader.leading = True
    assert leader.tick() == (False, False)
    assert leader.leading is False


def test_without_a_lock_the_only_beat_leads() -> None:
    leader = Leader(None)
    assert leader.tick() == (True, True)
    assert leader.tick() == (True, False)


# ----------------------------------------------------------------------------- the rate limit


def test_the_redis_limiter_spaces_sends_of_a_bucket_and_keeps_buckets_apart(client: Any, prefix: str) -> None:
    one, other = RedisLimiter(client, prefix=prefix), RedisLimiter(client, prefix=prefix)  # two processes' limiters
    rate = 4.0  # one send per 0.26 s: wide enough that a busy machine's pause between two calls cannot hide the wait
    assert one.acquire("sales", rate) == 0  # an idle bucket: at once
    # The reservations are shared: the other limiter's next send is pushed past the first.
    assert other.acquire("sales", rate) > 0
    assert one.acquire("signups", rate) == 0
    reserved_us = int(client.get(prefix + "sales"))
    (seconds, micros) = client.time()
    assert reserved_us > seconds * 1_000_000 + micros - 60_000_000  # on Redis' clock, not the worker's
    assert 0 < client.pttl(prefix + "sales") <= 60_000 + 1000 * MARGIN / rate + 1


def test_an_unreachable_limiter_is_a_transient_failure() -> None:
    with pytest.raises(TransientDeliveryError, match=r"rate limiter unavailable \(Redis\)"):
        RedisLimiter(dead_client()).acquire("sales", 1.0)


def test_the_limiter_is_shared_on_a_redis_broker_and_local_otherwise() -> None:
    assert isinstance(for_broker(REDIS_URL), RedisLimiter)
    assert isinstance(for_broker("amqp://guest@127.0.0.1//"), LocalLimiter)
    assert isinstance(for_broker(None), LocalLimiter)

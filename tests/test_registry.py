"""The registry: registration events, refusals and deadline-driven expiry on a fake clock."""

from __future__ import annotations

import logging
import struct

import pytest

from pgwfwd.errors import ConfigError
from pgwfwd.registry import MAX_PGWS, Event, EventKind, Refusal, Refused, Registry


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def registry(clock: FakeClock) -> Registry:
    return Registry("veth0", expiry=3.0, clock=clock, broadcast="198.18.0.255")


def weight(value: int) -> bytes:
    return struct.pack("!I", value)


def test_join_refresh_weight_change_and_leave(registry: Registry) -> None:
    source = ("198.18.1.2", 40000)

    joined = registry.handle_datagram(weight(10), source)
    assert isinstance(joined, Event) and joined.kind is EventKind.JOIN
    assert joined.entry.index == 0 and joined.entry.weight == 10

    refreshed = registry.handle_datagram(weight(10) + b"ignored tail", source)
    changed = registry.handle_datagram(weight(50), source)
    left = registry.handle_datagram(weight(0), source)

    assert isinstance(refreshed, Event) and refreshed.kind is EventKind.REFRESH
    assert isinstance(changed, Event) and changed.kind is EventKind.WEIGHT_CHANGE
    assert changed.old_weight == 10 and changed.entry.weight == 50
    assert isinstance(left, Event) and left.kind is EventKind.LEAVE
    assert len(registry) == 0
    assert registry.counters["joins"] == 1 and registry.counters["leaves"] == 1
    assert registry.counters["weight_changes"] == 1 and registry.counters["refreshes"] == 1


def test_identity_is_address_and_port(registry: Registry) -> None:
    first = registry.register("198.18.1.2", 40000, 1)
    second = registry.register("198.18.1.2", 40001, 1)

    assert isinstance(first, Event) and isinstance(second, Event)
    assert second.kind is EventKind.JOIN
    assert {entry.key for entry in registry} == {("198.18.1.2", 40000), ("198.18.1.2", 40001)}


def test_full_weight_range_is_kept(registry: Registry) -> None:
    event = registry.handle_datagram(b"\xff\xff\xff\xff", ("198.18.1.2", 1))

    assert isinstance(event, Event) and event.entry.weight == 2**32 - 1


@pytest.mark.parametrize("data", [b"", b"\x00", b"\x00\x00\x01"])
def test_short_datagram_is_not_a_registration(registry: Registry, data: bytes) -> None:
    result = registry.handle_datagram(data, ("198.18.1.2", 40000))

    assert isinstance(result, Refused) and result.reason is Refusal.SHORT
    assert len(registry) == 0
    assert registry.counters["refused_short"] == 1
    assert registry.counters["registrations"] == 0


@pytest.mark.parametrize("addr", ["0.0.0.0", "224.0.0.1", "239.1.2.3", "255.255.255.255",
                                  "198.18.0.255", "127.0.0.1", "240.0.0.1"])
def test_non_unicast_source_is_refused(registry: Registry, addr: str) -> None:
    result = registry.register(addr, 40000, 10)

    assert isinstance(result, Refused) and result.reason is Refusal.NOT_UNICAST
    assert len(registry) == 0
    assert registry.counters["refused_not_unicast"] == 1


def test_port_zero_is_refused(registry: Registry) -> None:
    result = registry.register("198.18.1.2", 0, 10)

    assert isinstance(result, Refused) and result.reason is Refusal.NOT_UNICAST


def test_weight_zero_from_unknown_pgw_is_counted(registry: Registry) -> None:
    result = registry.register("198.18.1.2", 40000, 0)

    assert isinstance(result, Refused) and result.reason is Refusal.UNKNOWN_LEAVE
    assert len(registry) == 0


def test_full_registry_refuses_and_reuses_lowest_free_index(clock: FakeClock) -> None:
    registry = Registry("veth0", clock=clock)
    for n in range(MAX_PGWS):
        event = registry.register(f"198.18.{n // 250 + 1}.{n % 250 + 1}", 2152, 1)
        assert isinstance(event, Event) and event.entry.index == n

    refused = registry.register("198.19.0.1", 2152, 1)
    registry.register("198.18.1.8", 2152, 0)
    registry.register("198.18.1.4", 2152, 0)
    rejoined = registry.register("198.19.0.1", 2152, 1)

    assert isinstance(refused, Refused) and refused.reason is Refusal.FULL
    assert registry.counters["refused_full"] == 1
    assert isinstance(rejoined, Event) and rejoined.entry.index == 3


def test_expires_exactly_at_deadline_not_before(registry: Registry, clock: FakeClock) -> None:
    registry.register("198.18.1.2", 40000, 10)
    clock.now += 1.0
    registry.register("198.18.1.2", 40000, 10)
    refreshed_at = clock.now

    assert registry.next_deadline() == pytest.approx(refreshed_at + 3.0)
    assert registry.expire(refreshed_at + 3.0 - 1e-6) == []
    assert len(registry) == 1

    expired = registry.expire(refreshed_at + 3.0)

    assert [event.entry.key for event in expired] == [("198.18.1.2", 40000)]
    assert expired[0].kind is EventKind.EXPIRY
    assert len(registry) == 0
    assert registry.next_deadline() is None
    assert registry.counters["expiries"] == 1


def test_weight_change_also_refreshes(registry: Registry, clock: FakeClock) -> None:
    registry.register("198.18.1.2", 40000, 10)
    clock.now += 2.5
    registry.register("198.18.1.2", 40000, 20)

    assert registry.expire(clock.now + 2.9) == []
    assert len(registry.expire(clock.now + 3.0)) == 1


def test_next_deadline_follows_the_earliest_pgw(registry: Registry, clock: FakeClock) -> None:
    registry.register("198.18.1.2", 1, 1)
    clock.now += 0.5
    registry.register("198.18.1.3", 1, 1)
    clock.now += 0.5
    registry.register("198.18.1.2", 1, 1)

    assert registry.next_deadline() == pytest.approx(1000.5 + 3.0)
    assert [e.entry.addr for e in registry.expire(1003.5)] == ["198.18.1.3"]
    assert registry.next_deadline() == pytest.approx(1001.0 + 3.0)


def test_expired_pgw_rejoins(registry: Registry, clock: FakeClock) -> None:
    registry.register("198.18.1.2", 40000, 10)
    registry.expire(clock.now + 3.0)
    clock.now += 10

    event = registry.register("198.18.1.2", 40000, 10)

    assert isinstance(event, Event) and event.kind is EventKind.JOIN


def test_many_refreshes_do_not_grow_the_deadline_heap(registry: Registry,
                                                       clock: FakeClock) -> None:
    for _ in range(10_000):
        clock.now += 0.001
        registry.register("198.18.1.2", 40000, 10)

    assert len(registry._deadlines) < 200


def test_one_log_line_per_join_change_leave_expiry(registry: Registry, clock: FakeClock,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pgwfwd.registry")

    registry.register("198.18.1.2", 1, 10)
    registry.register("198.18.1.2", 1, 10)
    registry.register("198.18.1.2", 1, 20)
    registry.register("198.18.1.3", 1, 20)
    registry.register("198.18.1.3", 1, 0)
    registry.expire(clock.now + 3.0)

    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 5
    assert all(message.startswith("veth0: ") for message in messages)
    assert all(message == message.lower() for message in messages)


def test_bad_expiry_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        Registry("veth0", expiry=0)

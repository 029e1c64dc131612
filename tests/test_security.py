"""Registration security without root: allow-lists, max-pgws, the rate limit and
authenticated registrations, on fake clocks."""

from __future__ import annotations

import logging
import socket
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

from pgwfwd.auth import (AUTH_REGISTRATION_SIZE, AllowList, Authenticator, AuthFailure,
                         RateLimiter, load_key, sign_registration)
from pgwfwd.cli import format_status, main
from pgwfwd.distributor import Distributor
from pgwfwd.errors import ConfigError
from pgwfwd.registry import Event, EventKind, Refusal, Refused, Registry
from pgwfwd.sim import PgwSimulator

KEY = b"k" * 32
WALL = 1_800_000_000.0    # the distributor's wall clock, in seconds
PGW = ("198.18.0.11", 40000)


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def weight(value: int) -> bytes:
    return struct.pack("!I", value)


def signed(value: int, offset: float = 0.0, key: bytes = KEY, nonce: bytes | None = None,
           ) -> bytes:
    return sign_registration(key, value, int((WALL + offset) * 1000), nonce)


def refusal(result: Event | Refused) -> Refusal | None:
    return result.reason if isinstance(result, Refused) else None


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1000.0)


@pytest.fixture
def wall() -> FakeClock:
    return FakeClock(WALL)


@pytest.fixture
def authenticated(clock: FakeClock, wall: FakeClock) -> Registry:
    return Registry("veth0", clock=clock, authenticator=Authenticator(KEY, wall_clock=wall))


# Allow-list and max-pgws.


def test_allow_list_refuses_and_counts_sources_outside_it(clock: FakeClock) -> None:
    registry = Registry("veth0", clock=clock,
                        allow=AllowList(["198.18.0.0/28", "198.18.1.7"]))

    results = [registry.handle_datagram(weight(1), (addr, 40000))
               for addr in ("198.18.0.11", "198.18.0.16", "198.18.1.7", "198.18.1.8")]

    assert [refusal(result) for result in results] == [
        None, Refusal.NOT_ALLOWED, None, Refusal.NOT_ALLOWED]
    assert {entry.addr for entry in registry} == {"198.18.0.11", "198.18.1.7"}
    assert registry.counters["refused_not_allowed"] == 2


@pytest.mark.parametrize("networks, message", [
    (["198.18.0.5/24"], "host bits set"),
    (["not-a-network"], "not-a-network"),
    (["2001:db8::/32"], "2001:db8::/32"),
    ([], "empty"),
])
def test_bad_allow_list_is_a_config_error(networks: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        AllowList(networks)


def test_distributor_allows_the_interface_subnets_by_default() -> None:
    assert [str(n) for n in Distributor("lo").allow.networks] == ["127.0.0.0/8"]
    distributor = Distributor("lo", allow=["198.18.0.0/24", "198.19.0.1/32"])
    assert distributor.status()["registration"]["allow"] == ["198.18.0.0/24", "198.19.0.1/32"]


def test_max_pgws_caps_the_table(clock: FakeClock) -> None:
    registry = Registry("veth0", clock=clock, max_pgws=2)
    results = [registry.register(f"198.18.0.{host}", 40000, 1) for host in (11, 12, 13)]

    assert [refusal(result) for result in results] == [None, None, Refusal.FULL]
    assert registry.counters["refused_full"] == 1


@pytest.mark.parametrize("max_pgws", [0, 1025])
def test_max_pgws_beyond_the_native_limit_is_a_config_error(max_pgws: int) -> None:
    with pytest.raises(ConfigError, match="max_pgws"):
        Distributor("lo", max_pgws=max_pgws)


# Rate limit.


def test_rate_limit_allows_a_burst_then_the_rate(clock: FakeClock) -> None:
    registry = Registry("veth0", clock=clock, rate_limiter=RateLimiter(rate=20, burst=40))
    # Each datagram from a new port: joins, which are never exempt.
    burst = [registry.handle_datagram(weight(1), ("198.18.0.11", port))
             for port in range(1000, 1045)]
    clock.now += 0.1   # two tokens more
    later = [registry.handle_datagram(weight(1), ("198.18.0.11", port))
             for port in range(2000, 2003)]
    other_address = registry.handle_datagram(weight(1), ("198.18.0.12", 1000))

    assert [refusal(r) for r in burst] == [None] * 40 + [Refusal.RATE_LIMITED] * 5
    assert [refusal(r) for r in later] == [None, None, Refusal.RATE_LIMITED]
    assert refusal(other_address) is None
    assert registry.counters["refused_rate_limited"] == 6


def test_refresh_every_second_is_never_limited(clock: FakeClock) -> None:
    registry = Registry("veth0", clock=clock, rate_limiter=RateLimiter(rate=20, burst=40))
    assert isinstance(registry.handle_datagram(weight(5), PGW), Event)

    for second in range(10):
        # Its address's bucket emptied by a flood from other ports of the same address.
        clock.now += 1.0
        for port in range(100):
            registry.handle_datagram(weight(0), (PGW[0], 50000 + port))
        refreshed = registry.handle_datagram(weight(5), PGW)
        assert isinstance(refreshed, Event) and refreshed.kind is EventKind.REFRESH, second
        # ... but a flood from the PGW's own identity is limited all the same.
        assert refusal(registry.handle_datagram(weight(5), PGW)) is Refusal.RATE_LIMITED

    assert registry.get(PGW) is not None


def test_rate_limiter_memory_is_bounded() -> None:
    limiter = RateLimiter(rate=1, burst=2, max_buckets=4)
    for host in range(4):
        assert limiter.admit(f"198.18.0.{host}", 0.0)
    # The table is full of busy addresses: the next ones share one bucket.
    assert [limiter.admit(f"198.18.1.{host}", 0.5) for host in range(3)] == [True, True, False]
    assert len(limiter) == 4
    # Once the old buckets could have filled up again, they make room.
    assert limiter.admit("198.18.2.1", 3.0)
    assert len(limiter) == 1


# Authenticated registration.


def test_authenticated_registration_joins_refreshes_and_leaves(authenticated: Registry,
                                                              wall: FakeClock) -> None:
    joined = authenticated.handle_datagram(signed(10), PGW)
    wall.now += 1
    refreshed = authenticated.handle_datagram(signed(10, offset=1), PGW)
    left = authenticated.handle_datagram(signed(0, offset=1), PGW)

    assert len(signed(10)) == AUTH_REGISTRATION_SIZE == 52
    assert isinstance(joined, Event) and joined.kind is EventKind.JOIN
    assert joined.entry.weight == 10
    assert isinstance(refreshed, Event) and refreshed.kind is EventKind.REFRESH
    assert isinstance(left, Event) and left.kind is EventKind.LEAVE


def test_wire_format_is_weight_timestamp_nonce_hmac() -> None:
    import hashlib
    import hmac

    data = sign_registration(KEY, 7, 1_800_000_000_123, b"12345678")

    assert data[:4] == b"\x00\x00\x00\x07"
    assert data[4:12] == (1_800_000_000_123).to_bytes(8, "big")
    assert data[12:20] == b"12345678"
    assert data[20:] == hmac.new(KEY, data[:20], hashlib.sha256).digest()


@pytest.mark.parametrize("data, reason", [
    (weight(10), Refusal.UNAUTHENTICATED),
    (weight(10) + bytes(40), Refusal.UNAUTHENTICATED),
    (signed(10, key=b"w" * 32), Refusal.BAD_HMAC),
    (b"\x00\x00\x00\x63" + signed(10)[4:], Refusal.BAD_HMAC),   # weight changed in flight
    (signed(10)[:51] + bytes([signed(10, nonce=b"n" * 8)[51] ^ 1]), Refusal.BAD_HMAC),
    (signed(10, offset=-30.001), Refusal.BAD_TIMESTAMP),
    (signed(10, offset=+30.001), Refusal.BAD_TIMESTAMP),
    (b"\x00\x01", Refusal.SHORT),
])
def test_unauthenticated_forged_and_stale_registrations_are_refused(
        authenticated: Registry, data: bytes, reason: Refusal) -> None:
    result = authenticated.handle_datagram(data, PGW)

    assert refusal(result) is reason
    assert len(authenticated) == 0
    assert authenticated.counters[f"refused_{reason.value}"] == 1


def test_timestamps_within_the_window_either_way_are_accepted(authenticated: Registry) -> None:
    assert isinstance(authenticated.handle_datagram(signed(1, offset=-29.9), PGW), Event)
    assert isinstance(authenticated.handle_datagram(signed(1, offset=29.9), PGW), Event)


def test_replays_are_refused_from_any_source(authenticated: Registry, wall: FakeClock) -> None:
    data = signed(10)
    first = authenticated.handle_datagram(data, PGW)
    wall.now += 20
    again = authenticated.handle_datagram(data, PGW)
    elsewhere = authenticated.handle_datagram(data, ("198.18.0.66", 40000))

    assert isinstance(first, Event)
    assert refusal(again) is refusal(elsewhere) is Refusal.REPLAY
    assert authenticated.counters["refused_replay"] == 2
    assert {entry.key for entry in authenticated} == {PGW}


def test_nonce_memory_forgets_what_the_window_refuses_anyway(wall: FakeClock) -> None:
    authenticator = Authenticator(KEY, wall_clock=wall)
    for n in range(100):
        assert authenticator.verify(signed(1, offset=-29)) == 1
    assert len(authenticator) == 100

    wall.now += 2
    assert authenticator.verify(signed(1)) == 1
    assert len(authenticator) == 1


def test_nonce_memory_is_bounded_and_fails_closed(wall: FakeClock) -> None:
    authenticator = Authenticator(KEY, wall_clock=wall, max_nonces=3)
    oldest = signed(1, offset=-5)
    assert authenticator.verify(oldest) == 1
    for offset in (-4, -3, -2):
        assert authenticator.verify(signed(1, offset=offset)) == 1

    # oldest was forgotten: replaying it, or anything as old, is refused all the same.
    assert len(authenticator) == 3
    assert authenticator.verify(oldest) is AuthFailure.BAD_TIMESTAMP
    assert authenticator.verify(signed(1, offset=-5)) is AuthFailure.BAD_TIMESTAMP
    assert authenticator.verify(signed(1)) == 1


def test_key_file_errors(tmp_path: Path) -> None:
    short = tmp_path / "short.key"
    short.write_bytes(b"x" * 15)
    good = tmp_path / "good.key"
    good.write_bytes(KEY)
    good.chmod(0o600)

    assert load_key(str(good)) == KEY
    with pytest.raises(ConfigError, match="holds 15 bytes, at least 16"):
        load_key(str(short))
    with pytest.raises(ConfigError, match="cannot read the auth key file"):
        load_key(str(tmp_path / "missing.key"))
    with pytest.raises(ConfigError, match="either auth_key or auth_key_file"):
        Distributor("lo", auth_key=KEY, auth_key_file=str(good))
    with pytest.raises(ConfigError, match="at least 16"):
        Distributor("lo", auth_key=b"short")
    assert Distributor("lo", auth_key_file=str(good)).status()["registration"]["authenticated"]


def test_key_readable_by_others_is_warned_about(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "open.key"
    path.write_bytes(KEY)
    path.chmod(0o644)

    with caplog.at_level(logging.WARNING, logger="pgwfwd.auth"):
        load_key(str(path))
    assert "accessible to others" in caplog.text


# What the operator sees.


def test_refusals_are_logged_at_a_limited_rate(caplog: pytest.LogCaptureFixture) -> None:
    distributor = Distributor("lo", allow=["198.18.0.0/24"], auth_key=KEY)
    with caplog.at_level(logging.WARNING, logger="pgwfwd.distributor"):
        for port in range(1000, 1100):
            distributor._apply(distributor.registry.handle_datagram(weight(1),
                                                                    ("198.18.0.11", port)))
            distributor._apply(distributor.registry.handle_datagram(weight(1),
                                                                    ("198.18.1.11", port)))

    lines = [record.getMessage() for record in caplog.records]
    assert lines == ["lo: ignored registration from 198.18.0.11:1000: unauthenticated",
                     "lo: ignored registration from 198.18.1.11:1000: not allowed",
                     "lo: ignored registration from 198.18.0.11:1040: rate limited"]
    counters = distributor.counters()["registration"]
    assert counters["refused_unauthenticated"] == 40   # then the rate limit
    assert counters["refused_rate_limited"] == 60
    assert counters["refused_not_allowed"] == 100


def test_status_shows_the_settings_and_every_refusal() -> None:
    status = Distributor("lo", allow=["198.18.0.0/24"], max_pgws=16, auth_key=KEY).status()
    status["counters"] = {"rx_packets": 0, "tx_packets": 0, "drops": {}, "xdp": {},
                          "gtp_slowpath": 0,
                          "registration": {"joins": 1, "refused_bad_hmac": 3,
                                           "refused_replay": 2}}

    lines = format_status(status).splitlines()

    assert ("registration: from 198.18.0.0/24, at most 16 PGWs, 20/s per address "
            "(burst 40), authenticated only") in lines
    assert "refused registrations: bad_hmac 3, replay 2" in lines


@pytest.mark.parametrize("args, message", [
    (["--auth-key-file", "/nonexistent/pgwfwd.key"], "cannot read the auth key file"),
    (["--allow", "198.18.0.5/24"], "host bits set"),
    (["--max-pgws", "1025"], "1025"),
    (["--max-pgws", "0"], "0"),
])
def test_run_with_bad_security_settings_exits_2(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["run", "--iface", "lo", *args])

    assert result.exit_code == 2
    assert message in result.stderr


def test_short_key_file_exits_2_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "short.key"
    path.write_bytes(b"0123456789")

    result = CliRunner().invoke(main, ["run", "--iface", "lo", "--auth-key-file", str(path)])

    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"Error: the auth key file {path} holds 10 bytes, at least 16 are needed"]


def test_simulated_pgw_registers_authenticated() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as distributor_side:
        distributor_side.bind(("127.0.0.1", 0))
        distributor_side.settimeout(5)
        port = distributor_side.getsockname()[1]
        with PgwSimulator("127.0.0.1", [("127.0.0.1", 25)], reg_port=port, auth_key=KEY):
            data, _ = distributor_side.recvfrom(100)

    assert Authenticator(KEY).verify(data) == 25

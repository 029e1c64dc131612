"""Parts of the distributor that need no root: settings checks, log rate limiting, and the
control thread's table work and policy switch against a recording stand-in of the data
plane."""

from __future__ import annotations

import errno
import io
import json
import logging
import threading
from typing import Any

import numpy as np
import pytest

from pgwfwd import ConfigError, Distributor, RuntimeFailure
from pgwfwd.distributor import _RateLimitedLog, rx_queue_count
from pgwfwd.tables import TeidTable


@pytest.mark.parametrize("kwargs, message", [
    ({"iface": "doesnotexist"}, "interface doesnotexist does not exist"),
    ({"iface": "lo", "vip": "198.18.0.1"}, "198.18.0.1 is not an address of interface lo"),
    ({"iface": "lo", "vip": "1.2.3"}, "1.2.3 is not an IPv4 address"),
    ({"iface": "lo", "gtp_port": 3000}, "the gtp port and the registration port must differ"),
    ({"iface": "lo", "reg_port": 0}, "registration port must be 1..65535, not 0"),
    ({"iface": "lo", "expiry": 0}, "expiry must be positive, not 0"),
    ({"iface": "lo", "queues": 65}, "interface lo has"),
])
def test_bad_settings_are_config_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        Distributor(**kwargs)  # type: ignore[arg-type]

    assert str(error.value).startswith(message)
    assert isinstance(error.value, ValueError)


def test_defaults_on_loopback() -> None:
    distributor = Distributor("lo")

    assert distributor.vip == "127.0.0.1"
    assert distributor.n_queues == rx_queue_count("lo") == 1
    assert not distributor.running
    distributor.stop()   # never started: nothing to do, no error


def test_refusals_are_logged_at_a_limited_rate(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    limited = _RateLimitedLog(10.0, lambda: now[0])
    caplog.set_level(logging.WARNING, logger="pgwfwd.distributor")

    for _ in range(5):
        limited.warning("short", "veth0: ignored registration: %s", "short")
        now[0] += 1.0
    now[0] = 10.0
    limited.warning("short", "veth0: ignored registration: %s", "short")
    limited.warning("other", "veth0: ignored registration: %s", "other")

    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        "veth0: ignored registration: short",
        "veth0: ignored registration: short (4 more since the last report)",
        "veth0: ignored registration: other",
    ]


class FakeShared:
    """Records what the control thread publishes, as native.SharedState.publish takes it."""

    def __init__(self) -> None:
        self.published: list[dict[str, Any]] = []

    def publish(self, pgws: np.ndarray, slots: np.ndarray, n_queues: int,
                timeout: float = 1.0, *, policy: str = "wrr",
                fine_slots: np.ndarray | None = None) -> int:
        self.published.append({"pgws": pgws.copy(), "slots": slots.copy(), "policy": policy,
                               "fine_slots": None if fine_slots is None else fine_slots.copy()})
        return len(self.published)


class FakeNeighbours:
    """Every PGW's next hop resolved, but for the addresses in unresolved."""

    def __init__(self) -> None:
        self.unresolved: set[str] = set()

    def mac(self, key: tuple[str, int]) -> bytes | None:
        return None if key[0] in self.unresolved else bytes.fromhex("020000000001")


@pytest.fixture
def control_plane() -> tuple[Distributor, FakeShared, FakeNeighbours]:
    """A distributor on lo whose data plane is a recorder: the control thread's table
    work runs for real, without root."""
    distributor = Distributor("lo")
    shared, neighbours = FakeShared(), FakeNeighbours()
    distributor._shared = shared
    distributor._neighbours = neighbours
    return distributor, shared, neighbours


def register(distributor: Distributor, pgws: dict[tuple[str, int], int]) -> None:
    for (addr, port), weight in pgws.items():
        distributor.registry.register(addr, port, weight)


PGWS = {("198.18.0.11", 40000): 10, ("198.18.0.12", 40000): 50,
        ("198.18.0.13", 40000): 30}


def test_unknown_policy_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown policy 'rr'; known: wrr, teid"):
        Distributor("lo", policy="rr")
    distributor = Distributor("lo", policy="teid")
    assert distributor.policy == "teid"
    with pytest.raises(ConfigError):
        distributor.set_policy("maglev")
    assert distributor.policy == "teid"


def test_wrr_publication(control_plane: tuple[Distributor, FakeShared, FakeNeighbours]) -> None:
    distributor, shared, _ = control_plane
    register(distributor, PGWS)

    distributor._publish()

    table = shared.published[-1]
    assert table["policy"] == "wrr"
    assert sorted(np.bincount(table["slots"]).tolist()) == [1, 3, 5]
    assert table["fine_slots"] is not None and table["fine_slots"].size == 0
    shares = {(view.addr, view.port): view.share for view in distributor.pgws()}
    assert shares == {key: pytest.approx(weight / 90) for key, weight in PGWS.items()}


def test_wrr_publication_with_huge_weights_has_fine_slots(
        control_plane: tuple[Distributor, FakeShared, FakeNeighbours]) -> None:
    distributor, shared, _ = control_plane
    register(distributor, {("198.18.0.11", 1): 4_000_000_000, ("198.18.0.12", 1): 1})

    distributor._publish()

    assert shared.published[-1]["fine_slots"].size > 0
    small = [view.share for view in distributor.pgws() if view.weight == 1]
    assert small == [pytest.approx(1 / 4_000_000_001, rel=0.1)]


def test_policy_switch_is_one_publication_of_the_teid_table(
        control_plane: tuple[Distributor, FakeShared, FakeNeighbours],
        caplog: pytest.LogCaptureFixture) -> None:
    distributor, shared, neighbours = control_plane
    caplog.set_level(logging.INFO, logger="pgwfwd.distributor")
    neighbours.unresolved.add("198.18.0.13")
    register(distributor, PGWS)
    distributor._publish()

    # Not running: the switch waits for nothing, the next publication carries it out.
    distributor.set_policy("teid")
    distributor._publish()

    table = shared.published[-1]
    assert (len(shared.published), table["policy"], table["fine_slots"]) == (2, "teid", None)
    # The teid table holds the forwardable PGWs only, by identity: as if built from scratch.
    entries = {entry.key: entry for entry in distributor.registry}
    expected = TeidTable.build({key: (entries[key].index, weight)
                                for key, weight in PGWS.items() if key[0] != "198.18.0.13"})
    assert np.array_equal(table["slots"], expected.slots())
    shares = {view.addr: view.share for view in distributor.pgws()}
    assert shares["198.18.0.13"] == 0
    assert shares["198.18.0.11"] + shares["198.18.0.12"] == 1
    assert shares["198.18.0.12"] == pytest.approx(50 / 60, abs=0.02)
    assert distributor.status()["policy"] == "teid"
    assert [r.getMessage() for r in caplog.records
            if "policy" in r.getMessage()] == ["lo: policy wrr -> teid"]


def test_teid_table_follows_changes_under_wrr(
        control_plane: tuple[Distributor, FakeShared, FakeNeighbours]) -> None:
    distributor, shared, neighbours = control_plane
    register(distributor, PGWS)
    distributor._publish()

    # Changes while wrr is live: a weight change, a leave, a MAC resolved, a join.
    distributor.registry.register("198.18.0.11", 40000, 70)
    distributor.registry.register("198.18.0.12", 40000, 0)
    neighbours.unresolved.clear()
    distributor.registry.register("198.18.0.14", 40000, 20)
    distributor._publish()
    distributor.set_policy("teid")
    distributor._publish()

    entries = {entry.key: (entry.index, entry.weight) for entry in distributor.registry}
    assert np.array_equal(shared.published[-1]["slots"], TeidTable.build(entries).slots())


def test_set_policy_while_running_waits_for_the_publication(
        control_plane: tuple[Distributor, FakeShared, FakeNeighbours]) -> None:
    distributor, shared, _ = control_plane
    register(distributor, PGWS)
    distributor._started = True   # as if running: a stand-in control thread publishes
    control = threading.Timer(0.05, distributor._publish)
    control.start()

    distributor.set_policy("teid")

    assert shared.published and shared.published[-1]["policy"] == "teid"
    control.join()


def test_set_policy_while_running_times_out_without_a_control_thread(
        control_plane: tuple[Distributor, FakeShared, FakeNeighbours]) -> None:
    distributor, shared, _ = control_plane
    distributor._started = True

    with pytest.raises(RuntimeFailure) as error:
        distributor.set_policy("teid", timeout=0.05)

    assert isinstance(error.value, OSError) and error.value.errno == errno.ETIMEDOUT
    assert distributor.policy == "teid" and not shared.published


def test_control_socket_policy_command(
        control_plane: tuple[Distributor, FakeShared, FakeNeighbours]) -> None:
    distributor, _, _ = control_plane

    def ask(request: dict[str, Any]) -> Any:
        out = io.BytesIO()
        distributor._answer(io.BytesIO(json.dumps(request).encode() + b"\n"), out)
        return json.loads(out.getvalue())

    assert ask({"cmd": "policy", "policy": "teid"}) == {"ok": True, "policy": "teid",
                                                       "iface": "lo"}
    assert ask({"cmd": "policy", "policy": "rr"}) == {
        "error": "unknown policy 'rr'; known: wrr, teid"}
    assert ask({"cmd": "policy"}) == {"error": "policy must be one of wrr, teid"}
    assert distributor.policy == "teid"


class FakeQueue:
    def __init__(self, echo_replies: int, not_gtpu: int) -> None:
        self.pgw_packets = np.zeros(1024, dtype=np.uint64)
        self.pgw_bytes = np.zeros(1024, dtype=np.uint64)
        self._stats = {"rx_packets": 10, "rx_bytes": 1000, "tx_packets": 9, "tx_bytes": 900,
                       "tx_kicks": 1, "echo_replies": echo_replies, "not_gtpu": not_gtpu,
                       "drops": {"no_pgw": 1, "echo_response": 2}}

    def stats(self) -> dict[str, Any]:
        return self._stats

    def frames(self) -> dict[str, int]:
        return {"n_frames": 4096}

    def kernel_stats(self) -> dict[str, int]:
        return {"rx_dropped": 0}


def test_counters_total_echo_replies_and_not_gtpu(
        control_plane: tuple[Distributor, FakeShared, FakeNeighbours]) -> None:
    distributor, _, _ = control_plane
    distributor._queues = [FakeQueue(1, 5), FakeQueue(2, 0)]

    counters = distributor.counters()

    assert (counters["echo_replies"], counters["not_gtpu"]) == (3, 5)
    assert counters["drops"] == {"echo_response": 4, "no_pgw": 2}

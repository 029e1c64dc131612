"""The simulators on their own: packets checked against scapy, and a PGW/SGW round trip
over loopback through a tiny relay that plays the distributor (no root needed)."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator

import pytest
from scapy.contrib.gtp import GTP_U_Header
from scapy.packet import Raw

from pgwfwd.sim import (
    MIN_DATAGRAM_SIZE,
    DatagramBuilder,
    PgwSimulator,
    SgwSimulator,
    datagram_intact,
    datagram_seq,
    gtpu_header,
)


@pytest.mark.parametrize("teid", [0, 1, 0x1234_5678, 0xFFFF_FFFF])
@pytest.mark.parametrize("size", [MIN_DATAGRAM_SIZE, 64, 1400])
def test_builder_matches_scapy_gtp_u(teid: int, size: int) -> None:
    data = DatagramBuilder(size).build(teid=teid, source=3, seq=77)

    # What scapy builds from the same payload is byte-for-byte what we send.
    payload = data[8:]
    reference = bytes(GTP_U_Header(teid=teid, gtp_type=255) / Raw(payload))
    assert data == reference

    # And scapy reads our header as a version-1 G-PDU with the right length and TEID.
    parsed = GTP_U_Header(data)
    assert (parsed.version, parsed.PT, parsed.E, parsed.S, parsed.PN) == (1, 1, 0, 0, 0)
    assert parsed.gtp_type == 255
    assert parsed.length == size - 8
    assert parsed.teid == teid
    assert len(data) == size


def test_gtpu_header_matches_scapy() -> None:
    header = gtpu_header(teid=0xABCDEF01, payload_length=100)
    reference = bytes(GTP_U_Header(teid=0xABCDEF01, gtp_type=255, length=100))
    assert header == reference[:8]


def test_datagram_check_catches_any_changed_byte() -> None:
    data = DatagramBuilder(64).build(teid=9, source=2, seq=123456)
    assert datagram_intact(data)
    assert datagram_seq(data) == (2, 123456)

    for offset in range(len(data)):
        corrupted = bytearray(data)
        corrupted[offset] ^= 0x01
        assert not datagram_intact(bytes(corrupted)), offset
    assert not datagram_intact(data[:-1])
    assert not datagram_intact(data + b"\0")


def test_builder_rejects_sizes_that_cannot_hold_a_check() -> None:
    with pytest.raises(ValueError):
        DatagramBuilder(MIN_DATAGRAM_SIZE - 1)


class LoopbackRelay:
    """A stand-in distributor on 127.0.0.1: remembers registrations and forwards each
    GTP-U datagram round-robin by weight, from its registration socket."""

    def __init__(self) -> None:
        self.reg = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.reg.bind(("127.0.0.1", 0))
        self.gtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.gtp.bind(("127.0.0.1", 0))
        self.gtp.settimeout(0.05)
        self.reg.settimeout(0.05)
        self.weights: dict[tuple[str, int], int] = {}
        self.stopping = threading.Event()
        self.threads = [
            threading.Thread(target=self._registrations, daemon=True),
            threading.Thread(target=self._forward, daemon=True),
        ]

    @property
    def reg_port(self) -> int:
        return int(self.reg.getsockname()[1])

    @property
    def gtp_port(self) -> int:
        return int(self.gtp.getsockname()[1])

    def _registrations(self) -> None:
        while not self.stopping.is_set():
            try:
                data, source = self.reg.recvfrom(64)
            except TimeoutError:
                continue
            if len(data) >= 4:
                self.weights[source] = struct.unpack("!I", data[:4])[0]

    def _forward(self) -> None:
        sent = 0
        while not self.stopping.is_set():
            try:
                data = self.gtp.recv(65535)
            except TimeoutError:
                continue
            slots = [pgw for pgw, weight in sorted(self.weights.items()) for _ in range(weight)]
            if slots:
                self.reg.sendto(data, slots[sent % len(slots)])
                sent += 1

    def __enter__(self) -> LoopbackRelay:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join()
        self.reg.close()
        self.gtp.close()


@pytest.fixture
def relay() -> Iterator[LoopbackRelay]:
    with LoopbackRelay() as relay:
        yield relay


def test_pgw_and_sgw_simulators_round_trip(relay: LoopbackRelay) -> None:
    pgws = [("127.0.0.1", 1), ("127.0.0.1", 3)]
    with PgwSimulator("127.0.0.1", pgws, reg_port=relay.reg_port, record_arrivals=True) as sim:
        first, second = sim.pgws
        _wait(lambda: len(relay.weights) == 2)
        assert relay.weights == {first.identity: 1, second.identity: 3}

        with SgwSimulator.with_sources(
            "127.0.0.1", 3, ["127.0.0.1"], gtp_port=relay.gtp_port
        ) as sgw:
            result = sgw.send(400, rate=20_000)
        assert (result.sent, result.failed) == (400, 0)
        assert sim.wait_for(400, timeout=10) == 400

        assert (first.received, second.received) == (100, 300)
        assert first.corrupt == second.corrupt == 0
        assert first.received_bytes == 100 * 64
        seqs = sorted(seq for pgw in sim.pgws for _t, _src, seq in pgw.arrivals)
        assert seqs == list(range(400))

        # A PGW that leaves is told to the relay as weight 0.
        sim.leave(first)
        _wait(lambda: relay.weights[first.identity] == 0)
        assert not first.refreshing


def test_pgw_simulator_refreshes_until_told_to_stop(relay: LoopbackRelay) -> None:
    with PgwSimulator(
        "127.0.0.1", [("127.0.0.1", 5)], reg_port=relay.reg_port, refresh_interval=0.05
    ) as sim:
        (pgw,) = sim.pgws
        _wait(lambda: pgw.last_refresh is not None)
        first_refresh = pgw.last_refresh
        _wait(lambda: pgw.last_refresh != first_refresh)

        sim.stop_refreshing(pgw)
        stopped_at = pgw.last_refresh
        threading.Event().wait(0.2)
        assert pgw.last_refresh == stopped_at


def _wait(condition: object, timeout: float = 5.0) -> None:
    event = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if condition():  # type: ignore[operator]
            return
        event.wait(0.01)
    raise AssertionError("condition not met in time")

"""The slow path's decisions, checked against the C per-frame path on the same tables: a
datagram that reaches the kernel (reassembled from fragments) must go where the same
datagram would have gone through AF_XDP."""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest
from scapy.contrib.gtp import GTP_U_Header, GTPEchoRequest, GTPHeader, GTPPDUSessionContainer
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from pgwfwd import tables
from pgwfwd.native import FrameCursor, SharedState, process_frame
from pgwfwd.slowpath import Drop, Forward, Reply, SlowPath, parse_gtpu

VIP = "198.18.0.1"
VIP_MAC = bytes.fromhex("020000000001")
SGW = ("198.18.0.101", 40000)
PGWS = [(0, "198.18.0.11", 40001), (1, "198.18.0.12", 40002), (5, "198.18.0.13", 40003)]


def _pgw_array() -> np.ndarray:
    return tables.fill_pgw_array((index, addr, port, bytes([2, 0, 0, 0, 0, index + 1]))
                                 for index, addr, port in PGWS)


def _raw_gtpu(flags: int, body: bytes = b"", length_delta: int = 0, teid: int = 9) -> bytes:
    return struct.pack("!BBHI", flags, 255, len(body) + length_delta, teid) + body


PAYLOADS = [
    bytes(GTP_U_Header(teid=0x1234, gtp_type=255) / (b"x" * 3000)),
    bytes(GTP_U_Header(teid=0xFFFFFFFF, gtp_type=255, S=1, seq=5) / (b"y" * 100)),
    bytes(GTPHeader(teid=77, gtp_type=255, E=1, next_ex=0x85)
          / GTPPDUSessionContainer(type=1, QFI=5) / (b"z" * 2000)),
    _raw_gtpu(0x50, b"v2"),                                      # version 2
    _raw_gtpu(0x20, b"gtp'"),                                    # PT = 0
    _raw_gtpu(0x30, b"long", +1),                                # length past the datagram
    _raw_gtpu(0x34, bytes(3) + b"\x85" + b"\x02" + bytes(3)),    # extension past the end
    _raw_gtpu(0x34, bytes(3) + b"\x85" + b"\x00" + bytes(7)),    # extension of length 0
    b"\x30\xff",
    b"",
    b"not gtp-u at all" * 200,
]


def _c_choices(state: SharedState, sources: list[tuple[str, int]]) -> list[int]:
    cursor = FrameCursor()
    chosen = []
    for (addr, port), payload in zip(sources, PAYLOADS * 20, strict=False):
        frame = (Ether(src="02:00:00:00:01:01", dst=VIP_MAC.hex(":"))
                 / IP(src=addr, dst=VIP, ttl=64) / UDP(sport=port, dport=2152) / payload)
        result = process_frame(state, bytes(frame), cursor, capacity=65536)
        assert result.verdict == "forward"
        chosen.append(result.pgw_index)
    return chosen


def _slow_choices(slow: SlowPath, sources: list[tuple[str, int]]) -> list[int]:
    chosen = []
    for source, payload in zip(sources, PAYLOADS * 20, strict=False):
        verdict = slow.decide(payload, source, 64)
        assert isinstance(verdict, Forward)
        index = {index: (addr, port) for index, addr, port in PGWS}
        assert verdict.destination == index[verdict.index]
        assert verdict.ttl == 63
        chosen.append(verdict.index)
    return chosen


@pytest.mark.parametrize("policy", ["wrr", "teid"])
def test_slow_path_picks_the_pgw_that_the_data_plane_picks(policy: str) -> None:
    if policy == "teid":
        teid_table = tables.TeidTable.build({(addr, port): (index, 10 * (index + 1))
                                             for index, addr, port in PGWS})
        slots, fine = teid_table.slots(), None
    else:
        # Weights far apart, so that the table has fine slots as well.
        wrr = tables.build_wrr([(0, 4_000_000_000), (1, 3), (5, 77_777)])
        slots, fine = wrr.slots, wrr.fine_slots
        assert fine.size
    state = SharedState(VIP, 2152, 3000, VIP_MAC)
    state.publish(_pgw_array(), slots, n_queues=0, policy=policy, fine_slots=fine)
    slow = SlowPath()
    slow.published(policy, _pgw_array(), slots, fine)
    rng = random.Random(5)
    sources = [(f"198.18.0.{rng.randrange(100, 120)}", rng.randrange(1024, 65536))
               for _ in range(len(PAYLOADS) * 20)]

    assert _slow_choices(slow, sources) == _c_choices(state, sources)
    for _ in sources:
        slow.count(Forward(0, ("198.18.0.11", 40001), 63), 10)
    assert slow.forwarded == len(sources) and slow.pgw_packets[0] == len(sources)


def test_echo_ttl_and_empty_table() -> None:
    slow = SlowPath()
    request = bytes(GTPHeader(gtp_type=1, S=1, seq=0x4242) / GTPEchoRequest())

    reply = slow.decide(request, SGW, 64)
    assert isinstance(reply, Reply)
    response = GTPHeader(reply.data)
    assert (response.gtp_type, response.seq, response.teid) == (2, 0x4242, 0)
    assert reply.data.endswith(bytes((14, 0)))   # Recovery IE, restart counter 0
    assert parse_gtpu(reply.data) is not None
    assert slow.decide(reply.data, SGW, 64) == Drop("echo_response")

    assert slow.decide(PAYLOADS[0], SGW, 1) == Drop("ttl")
    assert slow.decide(PAYLOADS[0], SGW, 0) == Drop("ttl")
    assert slow.decide(PAYLOADS[0], SGW, 64) == Drop("no_pgw")
    slow.published("wrr", _pgw_array(), np.array([3], dtype=np.uint16), None)
    assert slow.decide(PAYLOADS[0], SGW, 64) == Drop("no_pgw")   # slot of a vanished PGW
    assert slow.received == 6

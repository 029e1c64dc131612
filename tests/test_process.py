"""The C per-frame path (parse, select, rewrite) on byte buffers.

Each case builds the input frame and the frame that must leave with scapy,
whose checksums are computed independently of ours, and compares bytes.
"""

from __future__ import annotations

import numpy as np
import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import ARP, Ether
from scapy.contrib.gtp import GTP_U_Header
from scapy.utils import checksum

from pgwfwd.native import MAX_PGWS, PGW_DTYPE, SharedState, process_frame

VIP = "198.18.0.1"
VIP_MAC = "02:00:00:00:00:01"
SGW = "198.18.0.101"
SGW_MAC = "02:00:00:00:01:01"
PGWS = [("198.18.0.11", 40001, "02:00:00:00:00:11"),
        ("198.18.0.12", 40002, "02:00:00:00:00:12")]


@pytest.fixture
def shared() -> SharedState:
    state = SharedState(VIP, 2152, 3000, bytes.fromhex(VIP_MAC.replace(":", "")))
    pgws = np.zeros(MAX_PGWS, dtype=PGW_DTYPE)
    for index, (addr, port, mac) in enumerate(PGWS):
        pgws[index]["addr"] = int.from_bytes(bytes(map(int, addr.split("."))), "big")
        pgws[index]["port"] = port
        pgws[index]["mac"] = list(bytes.fromhex(mac.replace(":", "")))
    state.publish(pgws, np.array([0, 1], dtype=np.uint16), n_queues=0)
    return state


def gtpu(teid: int = 0x1234, payload: bytes = b"subscriber data") -> bytes:
    return bytes(GTP_U_Header(teid=teid, gtp_type=255) / payload)


def sgw_frame(payload: bytes, **ip_fields: object) -> Ether:
    fields: dict[str, object] = {"ttl": 64, "id": 7, **ip_fields}
    ip = IP(src=SGW, dst=VIP, **fields)  # type: ignore[arg-type]
    return Ether(src=SGW_MAC, dst=VIP_MAC) / ip / UDP(sport=2152, dport=2152) / payload


def expected(payload: bytes, pgw: int, ttl: int = 63, **ip_fields: object) -> bytes:
    addr, port, mac = PGWS[pgw]
    ip = IP(src=VIP, dst=addr, ttl=ttl, id=7, **ip_fields)  # type: ignore[arg-type]
    return bytes(Ether(src=VIP_MAC, dst=mac) / ip / UDP(sport=3000, dport=port) / payload)


def pseudo_header_sum(frame: Ether) -> int:
    """What a local sender behind veth leaves in the UDP checksum field."""
    ip, udp_len = frame[IP], len(frame[UDP])
    pseudo = bytes(map(int, ip.src.split("."))) + bytes(map(int, ip.dst.split(".")))
    total = sum(int.from_bytes(pseudo[i:i + 2], "big") for i in range(0, 8, 2)) + 17 + udp_len
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def test_forwarded_frame_matches_reference(shared: SharedState) -> None:
    payload = gtpu()
    verdict, pgw, out = process_frame(shared, bytearray(bytes(sgw_frame(payload))))
    assert verdict is None and pgw == 0
    assert out == expected(payload, 0)


def test_partial_udp_checksum_is_completed(shared: SharedState) -> None:
    payload = gtpu(payload=b"odd length!")
    frame = sgw_frame(payload)
    frame[UDP].chksum = pseudo_header_sum(Ether(bytes(frame)))
    verdict, _, out = process_frame(shared, bytearray(bytes(frame)))
    assert verdict is None
    assert out == expected(payload, 0)
    assert checksum(bytes(Ether(out)[IP])[:20]) == 0


def test_zero_udp_checksum_stays_zero(shared: SharedState) -> None:
    payload = gtpu()
    frame = sgw_frame(payload)
    frame[UDP].chksum = 0
    _, _, out = process_frame(shared, bytearray(bytes(frame)))
    assert Ether(out)[UDP].chksum == 0
    reference = Ether(expected(payload, 0))
    reference[UDP].chksum = 0
    assert out == bytes(reference)


def test_ethernet_padding_is_trimmed(shared: SharedState) -> None:
    payload = b"\x30\xff\x00\x00\x00\x00\x00\x01"
    frame = bytes(sgw_frame(payload)) + bytes(20)
    verdict, _, out = process_frame(shared, bytearray(frame))
    assert verdict is None
    assert out == expected(payload, 0)


def test_ip_options_are_kept(shared: SharedState) -> None:
    payload = gtpu()
    options = b"\x94\x04\x00\x00"  # router alert
    verdict, _, out = process_frame(shared, bytearray(bytes(sgw_frame(payload,
                                                                      options=options))))
    assert verdict is None
    assert out == expected(payload, 0, options=options)


def test_slots_are_followed_in_order(shared: SharedState) -> None:
    cursor = [0]
    chosen = [process_frame(shared, bytearray(bytes(sgw_frame(gtpu()))), cursor)[1]
              for _ in range(5)]
    assert chosen == [0, 1, 0, 1, 0]


def test_empty_table_drops_as_no_pgw() -> None:
    state = SharedState(VIP, 2152, 3000, bytes(6))
    verdict, _, _ = process_frame(state, bytearray(bytes(sgw_frame(gtpu()))))
    assert verdict == "no_pgw"


def _truncate(frame: bytes, length: int) -> bytearray:
    return bytearray(frame[:length])


GOOD = bytes(sgw_frame(gtpu()))


def _bad_ip_checksum() -> bytes:
    frame = sgw_frame(gtpu())
    frame[IP].chksum = 0x1234
    return bytes(frame)


def _udp_length(delta: int) -> bytes:
    frame = sgw_frame(gtpu())
    frame[UDP].len = len(frame[UDP]) + delta
    return bytes(frame)


def _ip_length(delta: int) -> bytes:
    frame = sgw_frame(gtpu())
    frame[IP].len = len(frame[IP]) + delta
    return bytes(frame)


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        pytest.param(_truncate(GOOD, 13), "truncated", id="shorter-than-ethernet"),
        pytest.param(_truncate(GOOD, 30), "truncated", id="shorter-than-ipv4"),
        pytest.param(_truncate(GOOD, 38), "truncated", id="shorter-than-udp"),
        pytest.param(_truncate(GOOD, len(GOOD) - 3), "truncated", id="shorter-than-ip-length"),
        pytest.param(_ip_length(+10), "truncated", id="ip-length-past-frame"),
        pytest.param(_ip_length(-3), "bad_length", id="ip-length-short-of-udp"),
        pytest.param(_udp_length(+4), "bad_length", id="udp-length-too-long"),
        pytest.param(_udp_length(-4), "bad_length", id="udp-length-too-short"),
        pytest.param(_bad_ip_checksum(), "bad_ip_csum", id="bad-ip-checksum"),
        pytest.param(bytes(sgw_frame(gtpu(), ttl=1)), "ttl", id="ttl-1"),
        pytest.param(bytes(Ether() / IP(src=SGW, dst="198.18.0.2") / UDP(dport=2152)),
                     "not_gtp", id="other-address"),
        pytest.param(bytes(Ether() / IP(src=SGW, dst=VIP) / UDP(dport=2153)),
                     "not_gtp", id="other-port"),
        pytest.param(bytes(Ether() / IP(src=SGW, dst=VIP, flags="MF") / UDP(dport=2152)),
                     "not_gtp", id="fragment"),
        pytest.param(bytes(Ether() / ARP()), "not_gtp", id="arp"),
    ],
)
def test_bad_frames_are_dropped_with_reason(shared: SharedState, frame: bytes,
                                            reason: str) -> None:
    verdict, _, out = process_frame(shared, bytearray(frame))
    assert verdict == reason
    assert out == bytes(frame)

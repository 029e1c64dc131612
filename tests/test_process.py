"""The C per-frame path (parse, select, rewrite) on byte buffers.

Each case builds the input frame and the frame that must leave with scapy,
whose checksums are computed independently of ours, and compares bytes.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import ARP, Ether
from scapy.contrib.gtp import (IE_Recovery, GTPEchoRequest, GTPEchoResponse, GTPHeader,
                               GTPPDUSessionContainer, GTP_U_Header)
from scapy.packet import Raw
from scapy.utils import checksum

from pgwfwd.native import (DROP_REASONS, MAX_PGWS, MAX_SLOTS, PGW_DTYPE, SLOT_FINE, FrameCursor,
                           SharedState, flow_slot, process_frame, teid_slot)

VIP = "198.18.0.1"
VIP_MAC = "02:00:00:00:00:01"
SGW = "198.18.0.101"
SGW_MAC = "02:00:00:00:01:01"
PGWS = [("198.18.0.11", 40001, "02:00:00:00:00:11"),
        ("198.18.0.12", 40002, "02:00:00:00:00:12")]


def pgw_array() -> np.ndarray:
    pgws = np.zeros(MAX_PGWS, dtype=PGW_DTYPE)
    for index, (addr, port, mac) in enumerate(PGWS):
        pgws[index]["addr"] = int.from_bytes(bytes(map(int, addr.split("."))), "big")
        pgws[index]["port"] = port
        pgws[index]["mac"] = list(bytes.fromhex(mac.replace(":", "")))
    return pgws


def new_shared() -> SharedState:
    return SharedState(VIP, 2152, 3000, bytes.fromhex(VIP_MAC.replace(":", "")))


@pytest.fixture
def shared() -> SharedState:
    state = new_shared()
    state.publish(pgw_array(), np.array([0, 1], dtype=np.uint16), n_queues=0)
    return state


#: A teid table that alternates the two PGWs slot by slot.
ALTERNATING = (np.arange(MAX_SLOTS) % 2).astype(np.uint16)


@pytest.fixture
def teid_shared() -> SharedState:
    state = new_shared()
    state.publish(pgw_array(), ALTERNATING, n_queues=0, policy="teid")
    return state


def gtpu(teid: int = 0x1234, payload: bytes = b"subscriber data") -> bytes:
    return bytes(GTP_U_Header(teid=teid, gtp_type=255) / payload)


def sgw_frame(payload: bytes, **ip_fields: object) -> Ether:
    fields: dict[str, object] = {"src": SGW, "ttl": 64, "id": 7, **ip_fields}
    ip = IP(dst=VIP, **fields)  # type: ignore[arg-type]
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
    verdict, pgw, out, not_gtpu = process_frame(shared, bytes(sgw_frame(payload)))
    assert verdict == "forward" and pgw == 0 and not not_gtpu
    assert out == expected(payload, 0)


def test_partial_udp_checksum_is_completed(shared: SharedState) -> None:
    payload = gtpu(payload=b"odd length!")
    frame = sgw_frame(payload)
    frame[UDP].chksum = pseudo_header_sum(Ether(bytes(frame)))
    verdict, _, out, _ = process_frame(shared, bytes(frame))
    assert verdict == "forward"
    assert out == expected(payload, 0)
    assert checksum(bytes(Ether(out)[IP])[:20]) == 0


def test_zero_udp_checksum_stays_zero(shared: SharedState) -> None:
    payload = gtpu()
    frame = sgw_frame(payload)
    frame[UDP].chksum = 0
    out = process_frame(shared, bytes(frame)).frame
    assert Ether(out)[UDP].chksum == 0
    reference = Ether(expected(payload, 0))
    reference[UDP].chksum = 0
    assert out == bytes(reference)


def test_ethernet_padding_is_trimmed(shared: SharedState) -> None:
    payload = b"\x30\xff\x00\x00\x00\x00\x00\x01"
    frame = bytes(sgw_frame(payload)) + bytes(20)
    verdict, _, out, _ = process_frame(shared, frame)
    assert verdict == "forward"
    assert out == expected(payload, 0)


def test_ip_options_are_kept(shared: SharedState) -> None:
    payload = gtpu()
    options = b"\x94\x04\x00\x00"  # router alert
    verdict, _, out, _ = process_frame(shared, bytes(sgw_frame(payload, options=options)))
    assert verdict == "forward"
    assert out == expected(payload, 0, options=options)


def test_slots_are_followed_in_order(shared: SharedState) -> None:
    cursor = FrameCursor()
    chosen = [process_frame(shared, bytes(sgw_frame(gtpu())), cursor).pgw_index
              for _ in range(5)]
    assert chosen == [0, 1, 0, 1, 0]


def test_fine_slots_are_stepped_through_on_their_own_cursor() -> None:
    state = new_shared()
    state.publish(pgw_array(), np.array([0, SLOT_FINE, 0], dtype=np.uint16), n_queues=0,
                  fine_slots=np.array([1, 0, 1], dtype=np.uint16))
    cursor = FrameCursor()
    chosen = [process_frame(state, bytes(sgw_frame(gtpu())), cursor).pgw_index
              for _ in range(9)]
    assert chosen == [0, 1, 0, 0, 0, 0, 0, 1, 0]


def test_empty_table_drops_as_no_pgw() -> None:
    state = SharedState(VIP, 2152, 3000, bytes(6))
    assert process_frame(state, bytes(sgw_frame(gtpu()))).verdict == "no_pgw"


# Every input class (see the README's counters): its verdict, and what leaves when it is
# forwarded or answered. A drop leaves the frame as it was; the caller counts the reason.

GOOD = bytes(sgw_frame(gtpu()))


class Case(NamedTuple):
    frame: bytes
    verdict: str                  # "forward", "reply" or the drop reason
    leaves: bytes | None = None   # forward: the frame that must leave
    not_gtpu: bool = False        # forward: counted as a payload that is not GTP-U


def _truncate(frame: bytes, length: int) -> bytes:
    return frame[:length]


def _patched(frame: bytes, offset: int, value: bytes, fix_ip_checksum: bool = True) -> bytes:
    """frame with bytes replaced at offset, its IPv4 header checksum made right again."""
    patched = bytearray(frame)
    patched[offset:offset + len(value)] = value
    if fix_ip_checksum:
        header_len = (patched[14] & 0x0F) * 4
        patched[24:26] = bytes(2)
        patched[24:26] = checksum(bytes(patched[14:14 + header_len])).to_bytes(2, "big")
    return bytes(patched)


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


def _udp_checksum_zero() -> Case:
    frame = sgw_frame(gtpu())
    frame[UDP].chksum = 0
    leaves = Ether(expected(gtpu(), 0))
    leaves[UDP].chksum = 0
    return Case(bytes(frame), "forward", bytes(leaves))


def _to_mac(mac: str) -> bytes:
    frame = sgw_frame(gtpu())
    frame[Ether].dst = mac
    return bytes(frame)


def _echo_request(**ip_fields: object) -> bytes:
    return bytes(sgw_frame(bytes(GTPHeader(gtp_type=1, S=1, seq=5) / GTPEchoRequest()),
                           **ip_fields))


def _raw_gtpu(flags: int, length_delta: int = 0, body: bytes = bytes(12)) -> bytes:
    return bytes([flags, 255]) + (len(body) + length_delta).to_bytes(2, "big") + \
        (7).to_bytes(4, "big") + body


def _forwarded_not_gtpu(payload: bytes) -> Case:
    return Case(bytes(sgw_frame(payload)), "forward", expected(payload, 0), True)


OPTIONS = b"\x94\x04\x00\x00"  # router alert
JUMBO = gtpu(payload=bytes(8900))

INPUT_CLASSES = [
    # Too short for a header
    pytest.param(Case(_truncate(GOOD, 13), "truncated"), id="shorter-than-ethernet"),
    pytest.param(Case(_truncate(GOOD, 30), "truncated"), id="shorter-than-ipv4"),
    pytest.param(Case(_truncate(GOOD, 38), "truncated"), id="shorter-than-udp"),
    pytest.param(Case(_patched(GOOD, 14, b"\x4f"), "truncated"), id="ipv4-options-past-frame"),
    pytest.param(Case(_truncate(GOOD, len(GOOD) - 3), "truncated"), id="shorter-than-ip-length"),
    # IPv4 header
    pytest.param(Case(_patched(GOOD, 14, b"\x44"), "bad_length"), id="ihl-below-5"),
    pytest.param(Case(bytes(sgw_frame(gtpu(), options=OPTIONS)), "forward",
                      expected(gtpu(), 0, options=OPTIONS)), id="ipv4-options-kept"),
    pytest.param(Case(_ip_length(+10), "truncated"), id="ip-length-past-frame"),
    pytest.param(Case(GOOD + bytes(20), "forward", expected(gtpu(), 0)),
                 id="ip-length-short-of-frame-padding-trimmed"),
    pytest.param(Case(_ip_length(-3), "bad_length"), id="ip-length-short-of-udp"),
    pytest.param(Case(_patched(GOOD, 16, (27).to_bytes(2, "big")), "bad_length"),
                 id="ip-length-short-of-udp-header"),
    pytest.param(Case(_bad_ip_checksum(), "bad_ip_csum"), id="bad-ip-checksum"),
    pytest.param(Case(bytes(sgw_frame(gtpu(), ttl=0)), "ttl"), id="ttl-0"),
    pytest.param(Case(bytes(sgw_frame(gtpu(), ttl=1)), "ttl"), id="ttl-1"),
    pytest.param(Case(bytes(sgw_frame(gtpu(), ttl=2)), "forward", expected(gtpu(), 0, ttl=1)),
                 id="ttl-2-leaves-as-1"),
    # Fragments: the XDP program gives them to the kernel; should one come, it is no datagram.
    pytest.param(Case(bytes(sgw_frame(gtpu(), flags="MF")), "not_for_us"), id="first-fragment"),
    pytest.param(Case(bytes(sgw_frame(gtpu(), frag=100)), "not_for_us"), id="non-first-fragment"),
    # UDP
    pytest.param(Case(_udp_length(+4), "bad_length"), id="udp-length-past-ip-length"),
    pytest.param(Case(_udp_length(-4), "bad_length"), id="udp-length-short-of-ip-length"),
    pytest.param(_udp_checksum_zero(), id="udp-checksum-0-stays-0"),
    # GTP-U that does not parse is forwarded all the same, counted as not_gtpu.
    pytest.param(_forwarded_not_gtpu(_raw_gtpu(0x50)), id="gtp-version-2"),
    pytest.param(_forwarded_not_gtpu(_raw_gtpu(0x20)), id="gtp-prime-pt-0"),
    pytest.param(_forwarded_not_gtpu(_raw_gtpu(0x30, +1)), id="gtp-length-past-udp"),
    pytest.param(_forwarded_not_gtpu(_raw_gtpu(0x30, -1)), id="gtp-length-short-of-udp"),
    pytest.param(_forwarded_not_gtpu(_raw_gtpu(0x34, body=bytes(3) + b"\x85\x02" + bytes(3))),
                 id="gtp-extension-chain-past-end"),
    pytest.param(_forwarded_not_gtpu(b"\x30\xff"), id="gtp-shorter-than-header"),
    # The UMEM frame limit is the XDP program's (xdp.too_big); a long frame that reaches C
    # anyway (larger UMEM frames) is forwarded whole.
    pytest.param(Case(bytes(sgw_frame(JUMBO)), "forward", expected(JUMBO, 0)),
                 id="jumbo-frame-if-it-fits"),
    # Ethernet destination: multicast or broadcast is not a hop addressed to us.
    pytest.param(Case(_to_mac("01:00:5e:00:00:01"), "bad_dst_mac"), id="multicast-dst-mac"),
    pytest.param(Case(_to_mac("ff:ff:ff:ff:ff:ff"), "bad_dst_mac"), id="broadcast-dst-mac"),
    pytest.param(Case(_to_mac("33:33:00:00:00:01"), "bad_dst_mac"), id="ipv6-multicast-dst-mac"),
    # Sources no SGW can have, also for Echo Requests (no reflection).
    pytest.param(Case(bytes(sgw_frame(gtpu(), src=VIP)), "bad_source"), id="source-vip"),
    pytest.param(Case(bytes(sgw_frame(gtpu(), src="0.0.0.0")), "bad_source"),
                 id="source-0.0.0.0"),
    pytest.param(Case(bytes(sgw_frame(gtpu(), src="224.0.0.1")), "bad_source"),
                 id="source-multicast-low"),
    pytest.param(Case(bytes(sgw_frame(gtpu(), src="239.255.255.255")), "bad_source"),
                 id="source-multicast-high"),
    pytest.param(Case(bytes(sgw_frame(gtpu(), src="255.255.255.255")), "bad_source"),
                 id="source-broadcast"),
    pytest.param(Case(bytes(sgw_frame(gtpu(), src="127.0.0.1")), "bad_source"),
                 id="source-loopback"),
    pytest.param(Case(bytes(sgw_frame(gtpu(), src="223.255.255.255")), "forward",
                      expected(gtpu(), 0)), id="source-just-below-multicast"),
    pytest.param(Case(_echo_request(src="255.255.255.255"), "bad_source"),
                 id="echo-request-from-broadcast"),
    pytest.param(Case(_echo_request(src=VIP), "bad_source"), id="echo-request-from-vip"),
    # Echo is for the distributor itself: answered whatever the TTL.
    pytest.param(Case(_echo_request(), "reply"), id="echo-request"),
    pytest.param(Case(_echo_request(ttl=1), "reply"), id="echo-request-ttl-1"),
    pytest.param(Case(bytes(sgw_frame(bytes(GTPHeader(gtp_type=2, S=1, seq=5)
                                            / GTPEchoResponse(IE_list=[IE_Recovery()])))),
                      "echo_response"), id="echo-response-to-vip"),
    # Not for the GTP-U port at all (the XDP program passes these; C is defensive).
    pytest.param(Case(bytes(Ether(src=SGW_MAC, dst=VIP_MAC) / IP(src=SGW, dst="198.18.0.2")
                            / UDP(dport=2152)), "not_for_us"), id="other-address"),
    pytest.param(Case(bytes(Ether(src=SGW_MAC, dst=VIP_MAC) / IP(src=SGW, dst=VIP)
                            / UDP(dport=2153)), "not_for_us"), id="other-port"),
    pytest.param(Case(bytes(Ether(src=SGW_MAC, dst=VIP_MAC) / ARP()), "not_for_us"), id="arp"),
    pytest.param(Case(bytes(Ether(src=SGW_MAC, dst=VIP_MAC, type=0x86DD) / bytes(60)),
                      "not_for_us"), id="ipv6"),
]


@pytest.mark.parametrize("case", INPUT_CLASSES)
def test_input_class_has_its_fate(shared: SharedState, case: Case) -> None:
    result = process_frame(shared, case.frame, capacity=len(case.frame) + 64)
    assert result.verdict == case.verdict
    if case.verdict == "forward":
        assert result.frame == case.leaves
        assert result.not_gtpu is case.not_gtpu
    elif case.verdict == "reply":
        reply = Ether(result.frame)
        assert (reply[IP].src, reply[IP].dst, reply[UDP].dport) == (VIP, SGW, 2152)
    else:
        assert result.frame == case.frame


def test_every_drop_reason_has_an_input_class() -> None:
    """The table above is the list of fates: a new reason needs a case (tx_full and no_pgw
    come from the ring and the table, and have tests of their own)."""
    covered = {param.values[0].verdict for param in INPUT_CLASSES}
    assert set(DROP_REASONS) - covered == {"tx_full", "no_pgw"}


# GTP-U parsing: what parses picks by TEID, what does not is still forwarded.

def _with_extensions() -> bytes:
    header = GTP_U_Header(teid=0xABCDEF, gtp_type=255, E=1, next_ex=0x85)
    return bytes(header / GTPPDUSessionContainer(type=1, QFI=9) / Raw(b"\x45" + bytes(27)))


@pytest.mark.parametrize(
    ("payload", "parseable"),
    [
        pytest.param(gtpu(), True, id="g-pdu"),
        pytest.param(_with_extensions(), True, id="extension-chain"),
        pytest.param(bytes(GTP_U_Header(teid=5, gtp_type=255, S=1, seq=9) / b"data"), True,
                     id="sequence-number"),
        pytest.param(_raw_gtpu(0x50), False, id="version-2"),
        pytest.param(_raw_gtpu(0x20), False, id="gtp-prime"),
        pytest.param(_raw_gtpu(0x30, +1), False, id="length-past-udp"),
        pytest.param(_raw_gtpu(0x30, -1), False, id="length-short-of-udp"),
        pytest.param(_raw_gtpu(0x34, body=bytes(3) + b"\x85" + b"\x02" + bytes(3)), False,
                     id="extension-past-end"),
        pytest.param(_raw_gtpu(0x34, body=bytes(3) + b"\x85" + b"\x00" + bytes(7)), False,
                     id="extension-length-0"),
        pytest.param(_raw_gtpu(0x32, body=b"\x00"), False, id="optional-word-cut"),
        pytest.param(b"\x30\xff", False, id="shorter-than-header"),
        pytest.param(b"", False, id="empty"),
    ],
)
def test_gtpu_payloads_parse_or_fall_back(teid_shared: SharedState, payload: bytes,
                                          parseable: bool) -> None:
    result = process_frame(teid_shared, bytes(sgw_frame(payload)))
    assert result.verdict == "forward"
    assert result.not_gtpu is not parseable
    assert result.frame == expected(payload, result.pgw_index)


def test_teid_policy_picks_by_teid(teid_shared: SharedState) -> None:
    for teid in (1, 2, 3, 0xFFFFFFFF, 0x12345678):
        for sport in (2152, 40000):
            frame = sgw_frame(gtpu(teid=teid))
            frame[UDP].sport = sport
            pgw = process_frame(teid_shared, bytes(frame)).pgw_index
            assert pgw == ALTERNATING[teid_slot(teid, MAX_SLOTS)]


def test_teid_policy_hashes_other_payloads_by_source(teid_shared: SharedState) -> None:
    for sport in range(40000, 40020):
        frame = sgw_frame(b"not gtp-u at all")
        frame[UDP].sport = sport
        pgw = process_frame(teid_shared, bytes(frame)).pgw_index
        assert pgw == ALTERNATING[flow_slot(SGW, sport, MAX_SLOTS)]


def test_teid_slots_spread_sequential_teids() -> None:
    counts = np.bincount([teid_slot(teid, 16) for teid in range(16_000)], minlength=16)
    assert counts.min() > 900 and counts.max() < 1100


# Echo: the distributor is the SGW's GTP-U peer and answers itself.

@pytest.mark.parametrize("options", [b"", b"\x94\x04\x00\x00"], ids=["plain", "ip-options"])
def test_echo_request_is_answered_to_its_sender(shared: SharedState, options: bytes) -> None:
    request = sgw_frame(bytes(GTPHeader(gtp_type=1, S=1, seq=0x4321) / GTPEchoRequest()),
                        options=options)
    request[UDP].sport = 41000
    result = process_frame(shared, bytes(request))
    assert result.verdict == "reply"

    reply = Ether(result.frame)
    assert (reply.src, reply.dst) == (VIP_MAC, SGW_MAC)
    assert (reply[IP].src, reply[IP].dst) == (VIP, SGW)
    assert (reply[UDP].sport, reply[UDP].dport) == (2152, 41000)
    # scapy binds GTP to UDP only when both ports are 2152: decode the payload explicitly.
    gtp = GTPHeader(bytes(reply[UDP].payload))
    assert (gtp.version, gtp.PT, gtp.gtp_type, gtp.seq, gtp.teid) == (1, 1, 2, 0x4321, 0)
    assert gtp.length == len(bytes(reply[UDP].payload)) - 8
    assert [type(ie) for ie in gtp[GTPEchoResponse].IE_list] == [IE_Recovery]
    # scapy recomputes both checksums from scratch: they must come out the same.
    rebuilt = reply.copy()
    del rebuilt[IP].chksum, rebuilt[UDP].chksum
    assert bytes(Ether(bytes(rebuilt))) == result.frame


def test_echo_response_to_the_vip_is_dropped(shared: SharedState) -> None:
    response = sgw_frame(bytes(GTPHeader(gtp_type=2, S=1, seq=1) / GTPEchoResponse(
        IE_list=[IE_Recovery()])))
    assert process_frame(shared, bytes(response)).verdict == "echo_response"


def test_echo_reply_needs_room(shared: SharedState) -> None:
    request = bytes(sgw_frame(bytes(GTPHeader(gtp_type=1, S=1, seq=1) / GTPEchoRequest())))
    assert len(request) < 56
    assert process_frame(shared, request, capacity=len(request)).verdict == "truncated"


# Inputs the fuzzer (fuzz/fuzz_process.c, `make fuzz`) broke the per-frame path with. Each is
# the harness's input: a control byte (bit 0 teid, bit 1 TTL decrement, bits 2-7 spare room),
# then the frame. They run under the sanitizers in a fresh build of the harness, and through
# the package's own build, where their verdict is checked.

FUZZ_HARNESS = Path(__file__).resolve().parent.parent / "fuzz" / "fuzz_process.c"
FUZZ_FLAGS = ["-g", "-O1", "-fsanitize=fuzzer,address,undefined", "-fno-sanitize-recover=all"]


@pytest.fixture(scope="module")
def fuzz_harness(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The harness built with ASan and UBSan, as `make fuzz` builds it."""
    clang = shutil.which("clang-14") or shutil.which("clang")
    if clang is None:
        pytest.skip("needs clang (make deps installs it)")
    binary = tmp_path_factory.mktemp("fuzz") / "fuzz_process"
    csrc = FUZZ_HARNESS.parent.parent / "csrc"
    build = subprocess.run([clang, *FUZZ_FLAGS, f"-I{csrc}", str(FUZZ_HARNESS),
                            str(csrc / "process.c"), "-o", str(binary)],
                           capture_output=True, text=True)
    if build.returncode != 0 and "libclang_rt.fuzzer" in build.stderr:
        pytest.skip("needs clang's libFuzzer runtime (libclang-rt-14-dev)")
    assert build.returncode == 0, build.stderr
    return binary


def _run_fuzz_input(binary: Path, tmp_path: Path, data: bytes) -> None:
    unit = tmp_path / "unit"
    unit.write_bytes(data)
    run = subprocess.run([str(binary), str(unit)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-3000:]


def test_fuzz_misaligned_ipv4_header(shared: SharedState, fuzz_harness: Path,
                                     tmp_path: Path) -> None:
    """Found by UBSan on the fuzzer's first input: a 34-byte frame, an IPv4 header claiming 43
    bytes. Any frame that reached the IPv4 checks broke the same way: the IPv4 header starts
    14 bytes into a frame, at an address that is 2 modulo 4, and was read through struct iphdr,
    which promises 4-byte alignment (undefined behaviour; the compiler may use loads that need
    it). process.c now reads it through a type aligned to 2. The verdict: truncated."""
    data = bytes.fromhex("ff" "020000000001" "020000000101" "0800"   # control, Ethernet
                         "4500002b000100004011ee36c6120065c6120001")  # IPv4, no more
    _run_fuzz_input(fuzz_harness, tmp_path, data)
    assert process_frame(shared, data[1:], capacity=len(data) + 63).verdict == "truncated"

"""Writes the seed corpus of fuzz/fuzz_process.c: GTP-U frames as an SGW sends them, and one
frame of every input class the data plane has a fate for. Run: make_seeds.py DIRECTORY

Each seed is the harness's control byte (bit 0 policy teid, bit 1 TTL decrement, bits 2-7
spare room in the buffer) followed by an Ethernet frame. Built with scapy at build time, so
the repository holds no binary corpus.
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Iterator
from pathlib import Path

from scapy.contrib.gtp import (IE_Recovery, GTPEchoRequest, GTPEchoResponse, GTPHeader,
                               GTPPDUSessionContainer, GTP_U_Header)
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Packet, Raw

VIP = "198.18.0.1"
SGW = "198.18.0.101"
VIP_MAC = "02:00:00:00:00:01"
SGW_MAC = "02:00:00:00:01:01"
#: wrr with a TTL decrement and room for a reply; teid likewise; wrr with no room to spare.
CONTROL_BYTES = (0x02 | 63 << 2, 0x03 | 63 << 2, 0x02)


def frame(payload: bytes | Packet, mac: str = VIP_MAC, sport: int = 2152, chksum: int | None = None,
          **ip_fields: object) -> bytes:
    fields: dict[str, object] = {"src": SGW, "dst": VIP, "ttl": 64, **ip_fields}
    udp = UDP(sport=sport, dport=2152)
    if chksum is not None:
        udp.chksum = chksum
    packet = Ether(src=SGW_MAC, dst=mac) / IP(**fields) / udp / bytes(payload)  # type: ignore
    return bytes(packet)


def raw_gtpu(flags: int, length_delta: int = 0, body: bytes = bytes(12)) -> bytes:
    return (bytes([flags, 255]) + (len(body) + length_delta).to_bytes(2, "big")
            + (7).to_bytes(4, "big") + body)


def with_ip_checksum(data: bytes) -> bytes:
    """data with its IPv4 header checksum made right (after patching the header)."""
    patched = bytearray(data)
    header_len = (patched[14] & 0x0F) * 4
    patched[24:26] = bytes(2)
    total = sum(int.from_bytes(patched[i:i + 2], "big") for i in range(14, 14 + header_len, 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    patched[24:26] = (~total & 0xFFFF).to_bytes(2, "big")
    return bytes(patched)


def partial_checksum(data: bytes) -> bytes:
    """What a local sender behind veth leaves: only the pseudo-header sum in the field."""
    packet = Ether(data)
    ip, udp_len = packet[IP], len(packet[UDP])
    words = bytes(map(int, ip.src.split("."))) + bytes(map(int, ip.dst.split(".")))
    total = sum(int.from_bytes(words[i:i + 2], "big") for i in range(0, 8, 2)) + 17 + udp_len
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return frame(bytes(packet[UDP].payload), chksum=total)


def frames() -> Iterator[bytes]:
    gpdu = GTP_U_Header(teid=0x1234, gtp_type=255) / IP(src="10.0.0.1", dst="10.9.9.9") / \
        UDP(sport=5000, dport=53) / Raw(b"subscriber")

    # What SGWs send
    for teid in (0, 1, 0xDEADBEEF, 0xFFFFFFFF):
        yield frame(GTP_U_Header(teid=teid, gtp_type=255) / Raw(bytes(range(40))))
    yield frame(gpdu)
    yield frame(gpdu, chksum=0)
    yield partial_checksum(frame(gpdu))
    yield partial_checksum(frame(b"odd length"))
    yield frame(GTP_U_Header(teid=9, gtp_type=255, S=1, seq=77) / Raw(b"seq"))
    yield frame(GTP_U_Header(teid=9, gtp_type=255, PN=1, npdu=3) / Raw(b"npdu"))
    yield frame(GTP_U_Header(teid=9, gtp_type=255, E=1, next_ex=0x85)
                / GTPPDUSessionContainer(type=1, QFI=9) / Raw(b"\x45" + bytes(27)))
    yield frame(GTP_U_Header(teid=9, gtp_type=255, E=1, next_ex=0x85)
                / GTPPDUSessionContainer(type=0, QFI=5, NextExtHdr=0x85)
                / GTPPDUSessionContainer(type=1, QFI=6) / Raw(b"two extensions"))
    yield frame(GTP_U_Header(teid=9, gtp_type=254))                     # End Marker
    yield frame(GTP_U_Header(teid=9, gtp_type=26) / Raw(bytes(8)))     # Error Indication
    yield frame(GTP_U_Header(teid=9, gtp_type=255) / Raw(bytes(1400)))
    yield frame(GTPHeader(gtp_type=1, S=1, seq=0x4321) / GTPEchoRequest())
    yield frame(GTPHeader(gtp_type=1, S=1, seq=1) / GTPEchoRequest(), options=b"\x94\x04\x00\x00")
    yield frame(GTPHeader(gtp_type=1, S=1, seq=1) / GTPEchoRequest(), ttl=1)
    yield frame(GTPHeader(gtp_type=2, S=1, seq=1) / GTPEchoResponse(IE_list=[IE_Recovery()]))
    yield frame(gpdu, options=b"\x94\x04\x00\x00")
    yield frame(gpdu) + bytes(20)                                        # Ethernet padding

    # Every input class of the data plane
    good = frame(GTP_U_Header(teid=5, gtp_type=255) / Raw(b"payload"))
    for length in (0, 6, 13, 14, 20, 33, 34, 41, 42, len(good) - 1):
        yield good[:length]
    yield with_ip_checksum(good[:14] + b"\x44" + good[15:])               # IHL 4
    yield with_ip_checksum(good[:14] + b"\x4f" + good[15:])               # IHL past frame
    for total_len in (0, 27, 28, len(good) - 13):
        yield with_ip_checksum(good[:16] + total_len.to_bytes(2, "big") + good[18:])
    for udp_len in (0, 7, 8, 9, 0xFFFF):
        yield good[:38] + udp_len.to_bytes(2, "big") + good[40:]
    yield good[:24] + b"\x12\x34" + good[26:]                               # bad IPv4 checksum
    for ttl in (0, 1, 2, 255):
        yield frame(gpdu, ttl=ttl)
    yield frame(gpdu, flags="MF")
    yield frame(gpdu, frag=185)
    yield frame(raw_gtpu(0x50))                                             # version 2
    yield frame(raw_gtpu(0x20))                                             # GTP' (PT 0)
    yield frame(raw_gtpu(0x30, +1))
    yield frame(raw_gtpu(0x30, -1))
    yield frame(raw_gtpu(0x34, body=bytes(3) + b"\x85" + b"\x02" + bytes(3)))
    yield frame(raw_gtpu(0x34, body=bytes(3) + b"\x85" + b"\x00" + bytes(7)))
    yield frame(raw_gtpu(0x34, body=bytes(3) + b"\x85" + (b"\x01\x00\x00\x85" * 20)))
    yield frame(raw_gtpu(0x32, body=b"\x00"))
    yield frame(b"\x30\xff")
    yield frame(b"")
    yield frame(GTP_U_Header(teid=1, gtp_type=255) / Raw(bytes(3800)))     # past a UMEM frame
    for mac in ("ff:ff:ff:ff:ff:ff", "01:00:5e:00:00:01", "33:33:00:00:00:01"):
        yield frame(gpdu, mac=mac)
    for source in (VIP, "0.0.0.0", "224.0.0.1", "239.255.255.255", "255.255.255.255",
                   "127.0.0.1"):
        yield frame(gpdu, src=source)
        yield frame(GTPHeader(gtp_type=1, S=1, seq=1) / GTPEchoRequest(), src=source)
    yield frame(gpdu, dst="198.18.0.2")
    yield bytes(Ether(src=SGW_MAC, dst=VIP_MAC) / IP(src=SGW, dst=VIP) / UDP(dport=2153))
    yield bytes(Ether(src=SGW_MAC, dst=VIP_MAC) / ARP())
    yield bytes(Ether(src=SGW_MAC, dst=VIP_MAC) / IPv6() / UDP(dport=2152) / bytes(gpdu))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("directory", type=Path)
    directory = parser.parse_args().directory
    directory.mkdir(parents=True, exist_ok=True)

    count = 0
    for data in frames():
        for control in CONTROL_BYTES:
            seed = bytes([control]) + data
            name = hashlib.sha1(seed).hexdigest()
            (directory / name).write_bytes(seed)
            count += 1
    print(f"{directory}: {count} seeds")


if __name__ == "__main__":
    main()

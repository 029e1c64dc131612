"""End to end in the lab: `pgwfwd run --iface veth0` in its namespace, simulated PGWs and
SGWs in the peers' namespace, checked only by what arrives in their sockets.

A datagram counted by a simulated PGW arrived in a socket connected to VIP:3000, so it
came from VIP:3000, to the PGW's registered address and port, with IPv4 and UDP
checksums that the receiving kernel accepted; its CRC-32 shows the payload unchanged.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from pgwfwd.demo import wait_registered
from pgwfwd.lab import DistributorProcess, Lab, in_netns, package_env
from pgwfwd.sim import DatagramBuilder, PgwSimulator, SgwSimulator, SimPgw
from peer_frames import PeerFrames
from waiting import wait_until

pytestmark = pytest.mark.netns

GTP_PORT = 2152
REG_PORT = 3000
EXPIRY = 3.0
EXPIRY_SLACK = 0.05      # the contract: nothing from the deadline + 50 ms on
SHARE_TOLERANCE = 0.99


# Helpers.


def _sgw(lab: Lab, n_sources: int = 10) -> SgwSimulator:
    return SgwSimulator.with_sources(
        lab.vip, n_sources, lab.config.sgw_addresses, netns=lab.config.peers_netns
    )


def _send(lab: Lab, sim: PgwSimulator, count: int, rate: float = 20_000.0,
          n_sources: int = 10) -> int:
    """Send count datagrams and wait for them; returns how many arrived."""
    sim.reset_counts()
    with _sgw(lab, n_sources) as sgw:
        result = sgw.send(count, rate)
    assert result.failed == 0
    return sim.wait_for(count, timeout=10 + 2 * count / rate)


def _spread(pgws: Sequence[SimPgw]) -> float:
    """min/max of received/weight, the load tester's criterion."""
    ratios = [pgw.received / pgw.weight for pgw in pgws]
    return min(ratios) / max(ratios) if max(ratios) > 0 else 0.0


def _shares(pgws: Sequence[SimPgw]) -> str:
    return ", ".join(f"{pgw.address} w{pgw.weight}: {pgw.received}" for pgw in pgws)




def _status_weights(distributor: DistributorProcess) -> dict[tuple[str, int], int]:
    entries = distributor.status().get("pgws", [])
    assert isinstance(entries, list)
    return {
        (str(entry["addr"]), int(entry["port"])): int(entry["weight"])
        for entry in entries
    }


def _drops(distributor: DistributorProcess, *reasons: str) -> int:
    """Sum of the distributor's drop counters of these reasons, over its queues."""
    counters = distributor.status()["counters"]
    assert isinstance(counters, dict)
    return sum(int(counters["drops"][reason]) for reason in reasons)


@pytest.fixture
def peer_frames(lab: Lab) -> Iterator[PeerFrames]:
    frames = PeerFrames(lab)
    try:
        yield frames
    finally:
        frames.close()


# Registration and forwarding.


def test_registration_then_forwarding_from_vip_3000(
    lab: Lab, distributor: DistributorProcess
) -> None:
    pgw_address = lab.config.pgw_addresses[0]
    with in_netns(lab.config.peers_netns):
        pgw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with pgw:
        # An unconnected PGW socket, so that recvfrom shows where datagrams come from.
        pgw.bind((pgw_address, 0))
        pgw.settimeout(3)
        pgw.sendto((7).to_bytes(4, "big"), (lab.vip, REG_PORT))
        identity = pgw.getsockname()
        wait_until(lambda: identity in _status_weights(distributor), 5, "registered")
        assert _status_weights(distributor)[identity] == 7

        builder = DatagramBuilder(200)
        sent = [builder.build(teid=1000 + i, source=0, seq=i) for i in range(50)]
        with _sgw(lab, 5) as sgw:
            for i, data in enumerate(sent):
                sgw.send_payload(data, source=i % 5)

        received = [pgw.recvfrom(65535) for _ in sent]

    assert [source for _data, source in received] == [(lab.vip, REG_PORT)] * len(sent)
    assert sorted(data for data, _source in received) == sorted(sent)


def test_forwarded_frames_carry_valid_checksums(
    lab: Lab, distributor: DistributorProcess, pgw_sims: Callable[..., PgwSimulator],
    peer_frames: PeerFrames,
) -> None:
    sim = pgw_sims([1])
    (pgw,) = sim.pgws
    wait_registered(distributor, sim.pgws)

    with _sgw(lab, 1) as sgw:
        sgw.send(1)
    frame = peer_frames.receive(
        lambda f: UDP in f and f[IP].src == lab.vip and f[UDP].dport == pgw.port
    )

    assert frame is not None, "no forwarded frame seen on the peers' veth"
    assert frame[Ether].src == peer_frames.ld_mac and frame[Ether].dst == peer_frames.peer_mac
    assert (frame[IP].dst, frame[UDP].sport) == (pgw.address, REG_PORT)
    reference = Ether(bytes(frame))
    del reference[IP].chksum
    reference[UDP].chksum = None
    rebuilt = Ether(bytes(reference))
    assert frame[IP].chksum == rebuilt[IP].chksum
    assert frame[UDP].chksum in (0, rebuilt[UDP].chksum)
    assert sim.wait_for(1) == 1 and pgw.corrupt == 0


def test_shares_follow_weights_within_one_percent(
    lab: Lab, distributor: DistributorProcess, pgw_sims: Callable[..., PgwSimulator]
) -> None:
    sim = pgw_sims([10, 50, 30])
    wait_registered(distributor, sim.pgws)

    received = _send(lab, sim, 12_000)

    assert received == 12_000, _shares(sim.pgws)
    assert sum(pgw.corrupt for pgw in sim.pgws) == 0
    assert _spread(sim.pgws) >= SHARE_TOLERANCE, _shares(sim.pgws)


@pytest.mark.parametrize("distributor", [["--queues", "2"]], indirect=True)
def test_two_queues_forward_with_the_same_shares(
    lab: Lab, distributor: DistributorProcess, pgw_sims: Callable[..., PgwSimulator]
) -> None:
    sim = pgw_sims([20, 10])
    wait_registered(distributor, sim.pgws)

    received = _send(lab, sim, 10_000, n_sources=10)

    assert received == 10_000, _shares(sim.pgws)
    assert sum(pgw.corrupt for pgw in sim.pgws) == 0
    assert _spread(sim.pgws) >= SHARE_TOLERANCE, _shares(sim.pgws)
    status = distributor.status()
    queues = status["counters"]["queues"]  # type: ignore[index]
    assert status["queues"] == len(queues) == 2
    # The peer's veth spreads its sockets' flows over both queues, and both serve.
    assert all(queue["rx_packets"] > 0 for queue in queues), queues


# Expiry, re-registration, weight 0, weight change.


def test_expiry_then_reregistration(
    lab: Lab, distributor: DistributorProcess, pgw_sims: Callable[..., PgwSimulator]
) -> None:
    sim = pgw_sims([1, 1])
    leaving, staying = sim.pgws
    wait_registered(distributor, sim.pgws)

    # Traffic flows all along while `leaving` stops refreshing and expires.
    sim.reset_counts()
    sim.stop_refreshing(leaving)
    time.sleep(0.05)   # a refresh being sent right now has then recorded its time
    assert leaving.last_refresh is not None
    last_refresh = leaving.last_refresh
    with _sgw(lab) as sgw:
        result = sgw.send(int(2_000 * (EXPIRY + 1.5)), rate=2_000)
    assert sim.wait_for(result.sent) == result.sent

    late = [t - last_refresh for t, _src, _seq in leaving.arrivals
            if t >= last_refresh + EXPIRY + EXPIRY_SLACK]
    assert late == [], f"{len(late)} datagrams after expiry, first at +{late[0]:.3f} s"
    # It was served until close to its deadline, not dropped early.
    assert leaving.last_arrival is not None
    assert leaving.last_arrival >= last_refresh + EXPIRY - 0.2, (
        f"last datagram at +{leaving.last_arrival - last_refresh:.3f} s")
    assert staying.last_arrival is not None
    assert staying.last_arrival > last_refresh + EXPIRY + 0.5

    sim.register(leaving)
    wait_registered(distributor, sim.pgws)
    received = _send(lab, sim, 2_000)

    assert received == 2_000
    assert leaving.received == staying.received == 1_000, _shares(sim.pgws)


def test_weight_zero_removes_at_once(
    lab: Lab, distributor: DistributorProcess, pgw_sims: Callable[..., PgwSimulator]
) -> None:
    sim = pgw_sims([5, 5])
    leaving, staying = sim.pgws
    wait_registered(distributor, sim.pgws)

    sim.leave(leaving)
    wait_until(lambda: leaving.identity not in _status_weights(distributor), 0.5,
                "weight 0 removes the PGW")
    received = _send(lab, sim, 1_000)

    assert received == 1_000
    assert (leaving.received, staying.received) == (0, 1_000)


def test_weight_change_changes_shares(
    lab: Lab, distributor: DistributorProcess, pgw_sims: Callable[..., PgwSimulator]
) -> None:
    sim = pgw_sims([10, 10])
    changing, steady = sim.pgws
    wait_registered(distributor, sim.pgws)
    assert _send(lab, sim, 2_000) == 2_000
    assert _spread(sim.pgws) >= SHARE_TOLERANCE, _shares(sim.pgws)

    sim.register(changing, 30)
    wait_until(lambda: _status_weights(distributor).get(changing.identity) == 30, 2,
                "weight change")
    received = _send(lab, sim, 12_000)

    assert received == 12_000
    assert _spread(sim.pgws) >= SHARE_TOLERANCE, _shares(sim.pgws)
    assert changing.received > 2.9 * steady.received, _shares(sim.pgws)


# What is not forwarded.


def test_no_pgw_drops_and_counts(lab: Lab, distributor: DistributorProcess) -> None:
    assert _status_weights(distributor) == {}
    before = _drops(distributor, "no_pgw")

    with _sgw(lab, 3) as sgw:
        assert sgw.send(500, rate=10_000).sent == 500

    wait_until(lambda: _drops(distributor, "no_pgw") - before == 500, 3, "500 no_pgw drops")


def test_other_udp_ports_reach_the_kernel(lab: Lab, distributor: DistributorProcess) -> None:
    with in_netns(lab.config.ld_netns):
        listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with in_netns(lab.config.peers_netns):
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with listener, sender:
        listener.bind((lab.vip, 9999))
        listener.settimeout(3)
        sender.bind((lab.config.sgw_addresses[0], 0))
        sender.sendto(b"not gtp", (lab.vip, 9999))

        data, source = listener.recvfrom(100)
        sender_address = sender.getsockname()

    assert (data, source) == (b"not gtp", sender_address)


def test_arp_and_ping_reach_the_kernel(
    lab: Lab, distributor: DistributorProcess, peer_frames: PeerFrames
) -> None:
    peer_address = lab.config.sgw_addresses[0]
    arp_request = Ether(src=peer_frames.peer_mac, dst="ff:ff:ff:ff:ff:ff") / ARP(
        op=1, hwsrc=peer_frames.peer_mac, psrc=peer_address, pdst=lab.vip
    )
    ping = peer_frames.ether() / IP(src=peer_address, dst=lab.vip) / ICMP(id=0x4242, seq=1) / (
        Raw(b"pgwfwd ping"))

    peer_frames.sock.send(bytes(arp_request))
    arp_reply = peer_frames.receive(lambda f: ARP in f and f[ARP].op == 2)
    peer_frames.send(bytes(ping))
    echo_reply = peer_frames.receive(
        lambda f: ICMP in f and f[ICMP].type == 0 and f[ICMP].id == 0x4242
    )

    assert arp_reply is not None and arp_reply[ARP].psrc == lab.vip
    assert arp_reply[ARP].hwsrc == peer_frames.ld_mac
    assert echo_reply is not None and bytes(echo_reply[Raw]) == b"pgwfwd ping"


# Bad input.


def test_short_registration_is_ignored(
    lab: Lab, distributor: DistributorProcess, pgw_sims: Callable[..., PgwSimulator]
) -> None:
    sim = pgw_sims([1, 1], refresh_interval=3600.0)
    registered, short = sim.pgws
    sim.leave(short)   # on the distributor's side, only `registered` remains
    wait_registered(distributor, [registered])

    sim.send_raw(short, b"\x00\x00\x05")
    time.sleep(0.3)
    received = _send(lab, sim, 200)

    assert short.identity not in _status_weights(distributor)
    assert (registered.received, short.received) == (200, 0)
    assert received == 200


def _bad_frames(frames: PeerFrames, lab: Lab) -> list[bytes]:
    """GTP-U frames to VIP:2152 whose IPv4 or UDP lengths disagree with the frame."""
    source = lab.config.sgw_addresses[0]
    payload = DatagramBuilder(64).build(teid=1, source=9, seq=0)

    def udp_frame(ip_length: int | None = None) -> bytes:
        return bytes(frames.ether() / IP(src=source, dst=lab.vip, len=ip_length) / UDP(
            sport=40000, dport=GTP_PORT) / Raw(payload))

    good = udp_frame()
    udp_too_long = frames.ether() / IP(src=source, dst=lab.vip) / UDP(
        sport=40000, dport=GTP_PORT, len=8 + len(payload) + 20) / Raw(payload)
    udp_too_short = frames.ether() / IP(src=source, dst=lab.vip) / UDP(
        sport=40000, dport=GTP_PORT, len=5) / Raw(payload)
    ip_longer_than_frame = udp_frame(ip_length=20 + 8 + len(payload) + 40)
    truncated_frame = good[: 14 + 20 + 8 + 4]   # lengths say 64 payload bytes, 4 are there
    return [bytes(udp_too_long), bytes(udp_too_short), ip_longer_than_frame,
            truncated_frame]


def test_bad_lengths_are_counted_drops_and_forwarding_goes_on(
    lab: Lab, distributor: DistributorProcess, pgw_sims: Callable[..., PgwSimulator],
    peer_frames: PeerFrames,
) -> None:
    sim = pgw_sims([1])
    (pgw,) = sim.pgws
    wait_registered(distributor, sim.pgws)
    bad = _bad_frames(peer_frames, lab)
    drop_reasons = ("truncated", "bad_length")
    before = _drops(distributor, *drop_reasons)

    sim.reset_counts()
    for frame in bad * 25:
        peer_frames.send(frame)
    time.sleep(0.5)

    assert pgw.received == 0
    wait_until(lambda: _drops(distributor, *drop_reasons) - before == len(bad) * 25, 2,
                f"{len(bad) * 25} length drops")
    assert distributor.process is not None and distributor.process.poll() is None
    assert _send(lab, sim, 1_000) == 1_000 and pgw.corrupt == 0


def test_not_gtp_payload_to_the_gtp_port_is_forwarded(
    lab: Lab, distributor: DistributorProcess, pgw_sims: Callable[..., PgwSimulator]
) -> None:
    sim = pgw_sims([1])
    (pgw,) = sim.pgws
    wait_registered(distributor, sim.pgws)

    with in_netns(lab.config.peers_netns):
        sgw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sgw:
        sgw.bind((lab.config.sgw_addresses[0], 0))
        # A G-PDU header claiming 1000 bytes that are not there, and 3 stray bytes.
        for data in (bytes.fromhex("30ff03e800000001") + b"short", b"abc"):
            sgw.sendto(data, (lab.vip, GTP_PORT))

    assert sim.wait_for(2) == 2
    assert pgw.received == 2


# Command-line errors.


@pytest.mark.parametrize(
    "args",
    [["--iface", "nosuch"], ["--iface", "veth0", "--vip", "198.18.0.99"]],
    ids=["no-such-interface", "vip-not-on-interface"],
)
def test_run_with_a_bad_interface_or_vip_exits_2_with_one_line(
    lab: Lab, args: list[str]
) -> None:
    argv = lab.ld_command([sys.executable, "-m", "pgwfwd", "run", *args])

    result = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                            env=package_env())

    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr

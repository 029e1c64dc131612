"""Faults survived, end to end in the lab: a PGW that vanishes, a PGW whose MAC changes, the
interface going down and up, a TX burst flat out, SIGKILL and a restart, a registration
storm. After each, forwarding is checked again on the wire, and every UMEM frame is
accounted for once traffic has stopped: fill + in flight + held by the loop == the UMEM.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from pgwfwd.demo import wait_registered
from pgwfwd.lab import DistributorProcess, Lab, package_env
from pgwfwd.sim import PgwSimulator, SgwSimulator
from waiting import wait_until

pytestmark = pytest.mark.netns

EXPIRY = 3.0
EXPIRY_SLACK = 0.05
NEW_PEER_MAC = "02:5e:00:00:00:42"


def _sgw(lab: Lab, n_sources: int = 8) -> SgwSimulator:
    return SgwSimulator.with_sources(lab.vip, n_sources, lab.config.sgw_addresses,
                                     netns=lab.config.peers_netns)


def _counters(distributor: DistributorProcess) -> dict[str, Any]:
    counters = distributor.status()["counters"]
    assert isinstance(counters, dict)
    return counters


def _assert_forwards(lab: Lab, sim: PgwSimulator, count: int = 300) -> None:
    """count datagrams arrive intact, shared by weight: within 4 of the exact share per
    receive queue, as the wrr guarantee has it."""
    sim.reset_counts()
    with _sgw(lab) as sgw:
        assert sgw.send(count, rate=10_000).sent == count
    assert sim.wait_for(count) == count
    weight_sum = sum(pgw.weight for pgw in sim.pgws)
    for pgw in sim.pgws:
        assert abs(pgw.received - count * pgw.weight / weight_sum) <= 4 * lab.config.queues, (
            [p.received for p in sim.pgws])
    assert all(pgw.corrupt == 0 for pgw in sim.pgws)


def _some_get_through(lab: Lab, sim: PgwSimulator) -> bool:
    before = sim.total_received
    with _sgw(lab, 1) as sgw:
        sgw.send(5)
    time.sleep(0.1)
    return sim.total_received > before


def _assert_frames_conserved(distributor: DistributorProcess) -> dict[str, Any]:
    """Once traffic has stopped, every frame of every UMEM is somewhere it belongs."""
    deadline = time.monotonic() + 2
    while True:
        counters = _counters(distributor)
        frames = [queue["frames"] for queue in counters["queues"]]
        if all(f["fill"] + f["in_flight"] + f["held"] == f["n_frames"] for f in frames):
            return counters
        assert time.monotonic() < deadline, f"frames not conserved: {frames}"
        time.sleep(0.1)


def _ip(netns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", netns, *args], check=True, capture_output=True, timeout=10)




def test_pgw_vanishing_under_traffic_expires_and_nothing_is_lost(
    lab: Lab, distributor: DistributorProcess, pgw_sims: Callable[..., PgwSimulator]
) -> None:
    sim = pgw_sims([1, 1])
    wait_registered(distributor, sim.pgws)
    vanishing, staying = sim.pgws
    sim.reset_counts()

    with _sgw(lab) as sgw:
        sender = threading.Thread(target=lambda: sgw.send(20_000, rate=4_000))
        sender.start()
        time.sleep(0.5)
        sim.stop_refreshing(vanishing)
        sender.join()
    assert sim.wait_for(20_000) == 20_000   # one publication moves the traffic: no loss

    assert vanishing.last_refresh is not None and vanishing.last_arrival is not None
    assert vanishing.last_arrival < vanishing.last_refresh + EXPIRY + EXPIRY_SLACK
    assert staying.received > 10_000
    counters = _assert_frames_conserved(distributor)
    assert counters["registration"]["expiries"] == 1
    assert not any(counters["drops"].values())
    sim.register(vanishing)   # back again: served again
    wait_registered(distributor, sim.pgws)
    _assert_forwards(lab, sim)


def test_pgw_mac_change_is_followed(
    lab: Lab, distributor: DistributorProcess, pgw_sims: Callable[..., PgwSimulator]
) -> None:
    peers, peer_iface = lab.config.peers_netns, lab.config.peer_iface
    sim = pgw_sims([1, 1])
    wait_registered(distributor, sim.pgws)
    _assert_forwards(lab, sim)
    old_mac = str(distributor.status()["pgws"][0]["mac"])  # type: ignore[index]

    _ip(peers, "link", "set", "dev", peer_iface, "address", NEW_PEER_MAC)
    try:
        # No gratuitous ARP comes (arp_notify is off): pgwfwd must find out by itself.
        wait_until(lambda: all(pgw["mac"] == NEW_PEER_MAC
                                for pgw in distributor.status()["pgws"]),  # type: ignore
                    10, "the new MAC in the table")
        _assert_forwards(lab, sim)
    finally:
        _ip(peers, "link", "set", "dev", peer_iface, "address", old_mac)
        _ip(lab.config.ld_netns, "neigh", "flush", "dev", lab.config.ld_iface)
    _assert_frames_conserved(distributor)


@pytest.mark.parametrize("side", ["ld", "peers"])
def test_interface_down_and_up(
    lab: Lab, distributor: DistributorProcess, pgw_sims: Callable[..., PgwSimulator],
    side: str,
) -> None:
    netns, iface = ((lab.config.ld_netns, lab.config.ld_iface) if side == "ld"
                    else (lab.config.peers_netns, lab.config.peer_iface))
    sim = pgw_sims([1, 2])
    wait_registered(distributor, sim.pgws)
    _assert_forwards(lab, sim)

    _ip(netns, "link", "set", "dev", iface, "down")
    try:
        time.sleep(1.0)
        assert distributor.process is not None and distributor.process.poll() is None
    finally:
        _ip(netns, "link", "set", "dev", iface, "up")
    if side == "peers":   # its addresses' routes come back with the link
        wait_until(lambda: "UP" in subprocess.run(
            ["ip", "-n", netns, "-br", "link", "show", iface], capture_output=True,
            text=True).stdout, 5, "peers' link up")
    # A veth whose link just came back drops what it gets until its carrier is up, which
    # takes a variable while: wait until datagrams get through again, then check in full.
    wait_until(lambda: _some_get_through(lab, sim), 5, "forwarding after link up")

    _assert_forwards(lab, sim)
    assert distributor.process.poll() is None
    _assert_frames_conserved(distributor)


def test_tx_burst_flat_out_is_counted_never_leaked(
    lab: Lab, distributor: DistributorProcess, pgw_sims: Callable[..., PgwSimulator]
) -> None:
    sim = pgw_sims([1])
    wait_registered(distributor, sim.pgws)
    before = _counters(distributor)

    # Two sender processes flat out, beside the distributor on a 2-core machine.
    count = 60_000
    senders = [subprocess.Popen(
        lab.peers_command([sys.executable, "-m", "pgwfwd", "sim", "sgw", "--vip", lab.vip,
                           "--count", str(count), "--rate", "0", "--sources", "8"]),
        env=package_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)]
    for sender in senders:
        _out, err = sender.communicate(timeout=60)
        assert sender.returncode == 0, err
    sim.wait_for(2 * count, timeout=5)

    after = _assert_frames_conserved(distributor)
    redirected = after["xdp"]["redirected"] - before["xdp"].get("redirected", 0)
    received = after["rx_packets"] - before["rx_packets"]
    kernel_drops = sum(q["kernel"]["rx_dropped"] + q["kernel"]["rx_ring_full"]
                       for q in after["queues"])
    # Every frame the XDP program redirected reached the loop or is a kernel drop ...
    assert redirected == received + kernel_drops
    # ... and every frame the loop received was sent or counted as a drop.
    for queue in after["queues"]:
        assert queue["rx_packets"] == (queue["tx_packets"] + queue["echo_replies"]
                                       + sum(queue["drops"].values())), queue
    assert sim.pgws[0].corrupt == 0
    assert sim.pgws[0].received <= after["tx_packets"] - before["tx_packets"]
    print(f"burst: redirected {redirected}, received {received}, kernel drops "
          f"{kernel_drops}, tx_full {after['drops'].get('tx_full')}, "
          f"at the pgw {sim.pgws[0].received}")
    _assert_forwards(lab, sim)


def test_sigkill_under_traffic_and_restart(
    lab: Lab, start_distributor: Callable[..., DistributorProcess],
    pgw_sims: Callable[..., PgwSimulator],
) -> None:
    killed = start_distributor()
    sim = pgw_sims([1, 1])
    wait_registered(killed, sim.pgws)

    with _sgw(lab) as sgw:
        sender = threading.Thread(target=lambda: sgw.send(4_000, rate=10_000))
        sender.start()
        time.sleep(0.2)
        assert killed.process is not None
        killed.process.kill()
        killed.process.wait(10)
        sender.join()

    restarted = start_distributor()
    wait_registered(restarted, sim.pgws)   # the PGWs' next refresh registers them again
    _assert_forwards(lab, sim)
    _assert_frames_conserved(restarted)


STORM_SCRIPT = """
import socket, sys, time
vip, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
socks = []
for i in range(64):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((f"198.18.0.{101 + i % 10}", 0))
    sock.setblocking(False)
    socks.append(sock)
# Short datagrams and leaves of unknown sources: refused, counted, never a PGW.
payloads = [b"\\x00", bytes(4)]
sent, end = 0, time.monotonic() + seconds
while time.monotonic() < end:
    for i in range(1000):
        try:
            socks[i % 64].sendto(payloads[i & 1], (vip, port))
            sent += 1
        except BlockingIOError:
            pass
print(sent)
"""


def test_registration_storm_while_forwarding(
    lab: Lab, distributor: DistributorProcess, pgw_sims: Callable[..., PgwSimulator]
) -> None:
    sim = pgw_sims([1, 3])
    wait_registered(distributor, sim.pgws)
    before = _counters(distributor)["registration"]

    seconds = 5.0
    storm = subprocess.Popen(
        lab.peers_command([sys.executable, "-c", STORM_SCRIPT, lab.vip, "3000",
                           str(seconds)]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        sim.reset_counts()
        with _sgw(lab) as sgw:   # traffic through the storm, longer than one expiry
            assert sgw.send(16_000, rate=4_000).sent == 16_000
        out, err = storm.communicate(timeout=seconds + 10)
    finally:
        storm.kill()
    assert storm.returncode == 0, err
    storm_sent = int(out)
    assert sim.wait_for(16_000) == 16_000
    assert [pgw.received for pgw in sim.pgws] == [4_000, 12_000]

    after = _counters(distributor)["registration"]
    refused = sum(after[name] - before.get(name, 0) for name in after
                  if name.startswith("refused_"))
    # What the registration socket's buffer could not hold, the kernel drops and counts
    # (Udp RcvbufErrors); what reached pgwfwd is counted.
    print(f"storm: {storm_sent} sent in {seconds} s, {refused} refused and counted")
    assert refused >= 20_000 * seconds
    assert after["expiries"] == before["expiries"] == 0
    assert len(distributor.status()["pgws"]) == 2  # type: ignore[arg-type]
    _assert_frames_conserved(distributor)
    _assert_forwards(lab, sim, 400)

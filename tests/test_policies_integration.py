"""The selection policies and the distributor as a GTP-U peer, end to end in the lab.

`pgwfwd run --policy wrr|teid` in the distributor's namespace; simulated PGWs and SGWs in
the peers' namespace. Everything is judged by what arrives in their sockets: a datagram
counted by a simulated PGW came from VIP:3000 with checksums that the kernel accepted, and
the TEID it carried shows which PGW each tunnel reached.
"""

from __future__ import annotations

import functools
import random
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence

import pytest
from scapy.contrib.gtp import GTPEchoRequest, GTPEchoResponse, GTPHeader, IE_Recovery

from pgwfwd.demo import wait_registered
from pgwfwd.lab import DistributorProcess, Lab, in_netns, package_env
from pgwfwd.sim import PgwSimulator, SendResult, SgwSimulator, SimPgw
from waiting import wait_until

pytestmark = pytest.mark.netns

GTP_PORT = 2152
RATE = 20_000.0
N_TEIDS = 10_000
#: The wire's tolerance for a PGW's share of the tunnels: 10,000 TEIDs sample 65,536 slots,
#: so a share is off its weight share by about 0.5 percentage points (one standard
#: deviation) even when the table is right.
TEID_SHARE_TOLERANCE = 0.02
#: The load tester's criterion for wrr: min/max of received/weight.
WRR_SPREAD = 0.99
GTPU_ECHO_REQUEST = 1
GTPU_ECHO_RESPONSE = 2
GTPU_IE_RECOVERY = 14

#: Which PGW each TEID reached: TEID -> the PGW's (address, port).
TeidMap = dict[int, tuple[str, int]]


def _teids(count: int, seed: int = 3) -> list[int]:
    """count distinct TEIDs: half allocated in sequence, as many SGWs do, half at random."""
    sequential = list(range(0x0001_0000, 0x0001_0000 + count // 2))
    rng = random.Random(seed)
    scattered: set[int] = set()
    while len(scattered) < count - len(sequential):
        teid = rng.randrange(1, 2**32)
        if not 0x0001_0000 <= teid < 0x0001_0000 + count // 2:
            scattered.add(teid)
    return sequential + sorted(scattered)


TEIDS = _teids(N_TEIDS)


# Helpers.


@pytest.fixture
def pgw_sims(pgw_sims: Callable[..., PgwSimulator]) -> Callable[..., PgwSimulator]:
    """conftest's PGW simulators, recording the TEID of each arrival too."""
    return functools.partial(pgw_sims, record_teids=True)


def _sgw(lab: Lab, n_sources: int, n_addresses: int | None = None) -> SgwSimulator:
    """n_sources sockets over the first n_addresses SGW addresses (all by default): more
    sources than addresses means several source ports per address."""
    addresses = lab.config.sgw_addresses[:n_addresses]
    return SgwSimulator.with_sources(lab.vip, n_sources, addresses,
                                     netns=lab.config.peers_netns)


def _send(lab: Lab, sim: PgwSimulator, count: int, teids: Sequence[int] | None = None,
          n_sources: int = 9, n_addresses: int | None = 3) -> int:
    """Sends count datagrams at RATE (cycling through teids, if given) and waits for
    them; returns how many arrived."""
    sim.reset_counts()
    with _sgw(lab, n_sources, n_addresses) as sgw:
        result = sgw.send(count, RATE, teids=teids)
    assert (result.sent, result.failed) == (count, 0)
    return sim.wait_for(count, timeout=10 + 2 * count / RATE)


def _teid_map(pgws: Sequence[SimPgw]) -> TeidMap:
    """Which PGW each TEID reached; fails when a TEID reached more than one."""
    where: TeidMap = {}
    for pgw in pgws:
        for teid in pgw.teids:
            assert teid not in where, (
                f"TEID {teid:#x} reached {where[teid]} and {pgw.identity}")
            where[teid] = pgw.identity
    return where


def _teid_round(lab: Lab, sim: PgwSimulator, teids: Sequence[int] = TEIDS,
                repeat: int = 1) -> TeidMap:
    """Sends every TEID repeat times; checks that nothing was lost or duplicated and that
    each TEID reached one PGW; returns which."""
    received = _send(lab, sim, repeat * len(teids), teids)

    assert received == repeat * len(teids), _counts(sim.pgws)
    assert sum(pgw.corrupt for pgw in sim.pgws) == 0
    where = _teid_map(sim.pgws)
    assert where.keys() == set(teids)
    counts = {teid: 0 for teid in teids}
    for pgw in sim.pgws:
        for teid, count in pgw.teids.items():
            counts[teid] += count
    assert set(counts.values()) == {repeat}
    return where


def _tunnel_shares(where: TeidMap) -> dict[tuple[str, int], float]:
    """Each PGW's share of the TEIDs."""
    return {identity: n / len(where) for identity, n in Counter(where.values()).items()}


def _weight_shares(pgws: Sequence[SimPgw]) -> dict[tuple[str, int], float]:
    total = sum(pgw.weight for pgw in pgws)
    return {pgw.identity: pgw.weight / total for pgw in pgws}


def _assert_shares_follow(actual: Mapping[tuple[str, int], float],
                          expected: Mapping[tuple[str, int], float], tolerance: float,
                          what: str) -> None:
    errors = {identity: actual.get(identity, 0.0) - share
              for identity, share in expected.items()}
    report = ", ".join(f"{address}:{port} {actual.get((address, port), 0.0):.2%} "
                       f"(weight {share:.2%})"
                       for (address, port), share in expected.items())
    assert set(actual) <= set(expected), f"{what}: unexpected PGWs in {sorted(actual)}"
    assert max(abs(error) for error in errors.values()) <= tolerance, f"{what}: {report}"


def _counts(pgws: Sequence[SimPgw]) -> str:
    return ", ".join(f"{pgw.address}:{pgw.port} w{pgw.weight}: {pgw.received}"
                     for pgw in pgws)


def _spread(pgws: Sequence[SimPgw]) -> float:
    """min/max of received/weight, the load tester's criterion."""
    ratios = [pgw.received / pgw.weight for pgw in pgws]
    return min(ratios) / max(ratios) if max(ratios) > 0 else 0.0




def _served(distributor: DistributorProcess) -> set[tuple[str, int]]:
    """The PGWs that `pgwfwd status --json` lists."""
    entries = distributor.status()["pgws"]
    assert isinstance(entries, list)
    return {(str(entry["addr"]), int(entry["port"])) for entry in entries}


def _counter(distributor: DistributorProcess, name: str, drop: bool = False) -> int:
    counters = distributor.status()["counters"]
    assert isinstance(counters, dict)
    return int(counters["drops"][name] if drop else counters[name])


def _set_policy(lab: Lab, name: str) -> subprocess.CompletedProcess[str]:
    """`pgwfwd policy NAME` against the lab's running distributor."""
    argv = lab.ld_command([sys.executable, "-m", "pgwfwd", "policy", name])
    return subprocess.run(argv, check=False, capture_output=True, text=True, timeout=30,
                          env=package_env())


def _flush(lab: Lab, sim: PgwSimulator, count: int = 200) -> None:
    """Sends count G-PDUs and checks that, since the PGWs' counts were last reset, exactly
    they arrived: what was sent before them and was going to reach a PGW has reached it by
    then, so nothing else did."""
    with _sgw(lab, 3) as sgw:
        assert sgw.send(count, RATE).failed == 0
    received = sim.wait_for(count)

    assert received == count, _counts(sim.pgws)
    assert sum(pgw.corrupt for pgw in sim.pgws) == 0
    assert all(pgw.foreign == [] for pgw in sim.pgws)


# teid: tunnel affinity and shares.


@pytest.mark.parametrize("distributor", [["--policy", "teid", "--queues", "2"]],
                         indirect=True)
def test_teid_keeps_every_tunnel_on_one_pgw_with_weighted_shares(
    lab: Lab, distributor: DistributorProcess, pgw_sims: Callable[..., PgwSimulator]
) -> None:
    sim = pgw_sims([1, 2, 3, 4])
    wait_registered(distributor, sim.pgws)

    # Each TEID 10 times, from 9 sources (3 addresses, 3 ports each): 10,000 TEIDs cycle
    # through 9 sources, so every TEID comes from every source, over both queues.
    where = _teid_round(lab, sim, repeat=10)

    _assert_shares_follow(_tunnel_shares(where), _weight_shares(sim.pgws),
                          TEID_SHARE_TOLERANCE, "share of the TEIDs")
    status = distributor.status()
    assert status["policy"] == "teid"
    table_shares = {(str(entry["addr"]), int(entry["port"])): float(entry["share"])
                    for entry in status["pgws"]}  # type: ignore[attr-defined]
    _assert_shares_follow(table_shares, _weight_shares(sim.pgws), TEID_SHARE_TOLERANCE,
                          "status: share of the hash table")
    queues = status["counters"]["queues"]  # type: ignore[index]
    assert all(queue["rx_packets"] > 0 for queue in queues), queues


@pytest.mark.parametrize("distributor", [["--policy", "teid", "--expiry", "1"]],
                         indirect=True)
def test_teid_expiry_and_joins_move_only_the_tunnels_that_must_move(
    lab: Lab, distributor: DistributorProcess, pgw_sims: Callable[..., PgwSimulator]
) -> None:
    # Refreshing 4 times per expiry time keeps the others safely registered.
    sim = pgw_sims([1, 2, 3, 4, 2], refresh_interval=0.25)
    *first_four, newcomer = sim.pgws
    leaving = first_four[1]
    survivors = [pgw for pgw in first_four if pgw is not leaving]
    sim.leave(newcomer)
    wait_until(lambda: _served(distributor) == {pgw.identity for pgw in first_four}, 5,
                "four PGWs served")
    wait_registered(distributor, first_four)
    before = _teid_round(lab, sim)

    # Traffic over all TEIDs goes on while `leaving` stops refreshing and expires.
    sim.reset_counts()
    sim.stop_refreshing(leaving)
    with _sgw(lab, 9, 3) as sgw:
        result = sgw.send(int(2.0 * RATE), RATE, teids=TEIDS)
    assert sim.wait_for(result.sent) == result.sent
    wait_until(lambda: leaving.identity not in _served(distributor), 2, "expired")
    during = {pgw.identity: set(pgw.teids) for pgw in first_four}
    after = _teid_round(lab, sim)

    # A surviving PGW's TEIDs stayed where they were, during the expiry and after it.
    for pgw in survivors:
        own = {teid for teid, identity in before.items() if identity == pgw.identity}
        taken_over = {teid for teid, identity in before.items()
                      if identity == leaving.identity}
        assert during[pgw.identity] <= own | taken_over, f"{pgw.identity}: foreign TEIDs"
    assert during[leaving.identity] <= {t for t, i in before.items() if i == leaving.identity}
    assert leaving.received == 0
    moved = {teid for teid in TEIDS if after[teid] != before[teid]}
    assert moved == {teid for teid in TEIDS if before[teid] == leaving.identity}
    assert len(moved) / N_TEIDS <= _weight_shares(first_four)[leaving.identity] + (
        TEID_SHARE_TOLERANCE)
    # ... and its TEIDs went to the others, by weight.
    _assert_shares_follow(_tunnel_shares({teid: after[teid] for teid in moved}),
                          _weight_shares(survivors), 0.05, "expired PGW's TEIDs")

    # Back again, and then a PGW that was never there: each takes its share and only
    # that moves (at most its new share + 1% of the TEIDs).
    previous = after
    for joining, members in ((leaving, first_four), (newcomer, sim.pgws)):
        sim.register(joining)
        wait_registered(distributor, members)
        now = _teid_round(lab, sim)

        moved = {teid for teid in TEIDS if now[teid] != previous[teid]}
        joined_share = sum(1 for identity in now.values() if identity == joining.identity)
        assert len(moved) <= joined_share + N_TEIDS // 100, (
            f"{joining.identity}: {len(moved)} TEIDs moved, it has {joined_share}")
        _assert_shares_follow(_tunnel_shares(now), _weight_shares(members),
                              TEID_SHARE_TOLERANCE, f"after {joining.identity} joined")
        previous = now


def _not_gtpu(kind: int, source: int, seq: int) -> bytes:
    """A payload to the GTP port that is not parseable GTP-U, ending in (source, seq).

    Those with a GTP-U-like header carry a TEID that changes with seq: were they taken for
    GTP-U, they would be spread by TEID rather than kept together by source.
    """
    tag = struct.pack("!HI", source, seq)
    teid = 0x0100_0000 + seq
    if kind == 0:
        return b"plain bytes, no header " + tag
    if kind == 1:    # GTP version 2 (GTPv2-C), otherwise a well-formed G-PDU
        return struct.pack("!BBHI", 0x50, 255, 8 + len(tag), teid) + bytes(8) + tag
    if kind == 2:    # PT=0: GTP', not GTP-U
        return struct.pack("!BBHI", 0x20, 255, 8 + len(tag), teid) + bytes(8) + tag
    if kind == 3:    # a length that runs past the datagram
        return struct.pack("!BBHI", 0x30, 255, 9 + len(tag), teid) + bytes(8) + tag
    if kind == 4:    # E set, and an extension header of length 0
        return struct.pack("!BBHIHBBBBH", 0x34, 255, 8 + len(tag), teid, 0, 0, 0x85,
                           0, 0, 0) + tag
    return b"\x01" + tag    # shorter than a GTP-U header


N_KINDS = 6


@pytest.mark.parametrize("distributor", [["--policy", "teid"]], indirect=True)
def test_teid_keeps_payloads_that_are_not_gtpu_together_by_source(
    lab: Lab, distributor: DistributorProcess, pgw_sims: Callable[..., PgwSimulator]
) -> None:
    sim = pgw_sims([1, 2, 3])
    wait_registered(distributor, sim.pgws)
    not_gtpu_before = _counter(distributor, "not_gtpu")
    n_sources, per_source = 20, 60

    sim.reset_counts()
    with _sgw(lab, n_sources) as sgw:
        # Sources take turns, 2 ports on each of the 10 addresses.
        for seq in range(per_source):
            for source in range(n_sources):
                sgw.send_payload(_not_gtpu(seq % N_KINDS, source, seq), source)
            time.sleep(0.002)   # about 10,000 per second
        sources = sgw.sources
    total = n_sources * per_source
    assert sim.wait_for(total) == total, _counts(sim.pgws)

    pgws_of_source: dict[int, set[tuple[str, int]]] = {i: set() for i in range(n_sources)}
    tags = []
    for pgw in sim.pgws:
        for data in pgw.foreign:
            source, seq = struct.unpack("!HI", data[-6:])
            assert data == _not_gtpu(seq % N_KINDS, source, seq)
            pgws_of_source[source].add(pgw.identity)
            tags.append((source, seq))
    assert sorted(tags) == [(i, seq) for i in range(n_sources) for seq in range(per_source)]
    spread = {sources[i]: sorted(pgws) for i, pgws in pgws_of_source.items()}
    assert all(len(pgws) == 1 for pgws in spread.values()), spread
    # Sources hash over the PGWs: not all of them onto one.
    assert len(set.union(*pgws_of_source.values())) > 1, spread
    wait_until(lambda: _counter(distributor, "not_gtpu") - not_gtpu_before == total, 2,
                f"{total} counted as forwarded non-GTP-U")


# Echo.


def _echo_sockets(lab: Lab) -> list[socket.socket]:
    """Two SGW GTP-U sockets: one on port 2152 as real SGWs use, one on any port."""
    socks = []
    for address, port in ((lab.config.sgw_addresses[0], GTP_PORT),
                          (lab.config.sgw_addresses[1], 0)):
        with in_netns(lab.config.peers_netns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        socks.append(sock)
        sock.bind((address, port))
        sock.settimeout(2.0)
    return socks


@pytest.fixture
def echo_sockets(lab: Lab) -> Iterator[list[socket.socket]]:
    socks = _echo_sockets(lab)
    try:
        yield socks
    finally:
        for sock in socks:
            sock.close()


POLICY_ARGS = [["--policy", "wrr"], ["--policy", "teid"]]


@pytest.mark.parametrize("distributor", POLICY_ARGS, indirect=True, ids=["wrr", "teid"])
def test_echo_request_is_answered_by_the_distributor_itself(
    lab: Lab, distributor: DistributorProcess, pgw_sims: Callable[..., PgwSimulator],
    echo_sockets: list[socket.socket],
) -> None:
    sim = pgw_sims([1, 1])
    wait_registered(distributor, sim.pgws)
    replies_before = _counter(distributor, "echo_replies")
    sequences = [0, 1, 0x1234, 0xFFFF]

    sim.reset_counts()
    answers = []
    for sock in echo_sockets:
        for seq in sequences:
            request = GTPHeader(gtp_type=GTPU_ECHO_REQUEST, S=1, seq=seq) / GTPEchoRequest()
            sock.sendto(bytes(request), (lab.vip, GTP_PORT))
            answers.append((seq, *sock.recvfrom(65535)))

    for seq, data, source in answers:
        # scapy ties GTP to UDP only when both ports are 2152: decode the payload itself.
        response = GTPHeader(data)
        assert source == (lab.vip, GTP_PORT)
        assert (response.version, response.PT, response.gtp_type) == (1, 1,
                                                                      GTPU_ECHO_RESPONSE)
        assert (response.S, response.seq, response.teid) == (1, seq, 0)
        assert response.length == len(data) - 8
        assert GTPEchoResponse in response
        elements = response[GTPEchoResponse].IE_list
        assert [element.ietype for element in elements] == [GTPU_IE_RECOVERY]
        assert isinstance(elements[0], IE_Recovery)
    # No PGW got an Echo Request (G-PDUs sent after them arrive, and only they).
    _flush(lab, sim)
    wait_until(lambda: _counter(distributor, "echo_replies") - replies_before == len(answers),
                2, f"{len(answers)} echo replies counted")


@pytest.mark.parametrize("distributor", POLICY_ARGS, indirect=True, ids=["wrr", "teid"])
def test_echo_response_to_the_vip_is_counted_and_dropped(
    lab: Lab, distributor: DistributorProcess, pgw_sims: Callable[..., PgwSimulator],
    echo_sockets: list[socket.socket],
) -> None:
    sim = pgw_sims([1, 1])
    wait_registered(distributor, sim.pgws)
    drops_before = _counter(distributor, "echo_response", drop=True)
    replies_before = _counter(distributor, "echo_replies")
    sock = echo_sockets[0]

    sim.reset_counts()
    for seq in range(25):
        response = GTPHeader(gtp_type=GTPU_ECHO_RESPONSE, S=1, seq=seq) / GTPEchoResponse(
            IE_list=[IE_Recovery(restart_counter=0)])
        sock.sendto(bytes(response), (lab.vip, GTP_PORT))

    wait_until(lambda: _counter(distributor, "echo_response", drop=True) - drops_before
                == 25, 2, "25 echo responses counted as dropped")
    _flush(lab, sim)
    sock.settimeout(0.2)
    with pytest.raises(TimeoutError):
        sock.recvfrom(65535)
    assert _counter(distributor, "echo_replies") == replies_before


# Switching policies on a running instance.


def test_policy_switch_under_traffic_loses_nothing(
    lab: Lab, distributor: DistributorProcess, pgw_sims: Callable[..., PgwSimulator]
) -> None:
    sim = pgw_sims([1, 2, 3])
    wait_registered(distributor, sim.pgws)
    assert distributor.status()["policy"] == "wrr"
    # 1,001 TEIDs against a wrr cycle of 6: under wrr each TEID meets every PGW.
    teids = list(range(1, 1002))
    count = 80_000    # 4 s, of which about 1 s before the first switch and after the last
    results: list[SendResult] = []
    traffic_ended: list[float] = []

    def send_all(sgw: SgwSimulator) -> None:
        results.append(sgw.send(count, RATE, teids=teids))
        traffic_ended.append(time.time())

    sim.reset_counts()
    with _sgw(lab, 9, 3) as sgw:
        sender = threading.Thread(target=send_all, args=(sgw,))
        sender.start()
        try:
            time.sleep(0.6)
            to_teid = _set_policy(lab, "teid")
            teid_from = time.time()
            teid_status = distributor.status()["policy"]
            time.sleep(0.5)
            teid_until = time.time()
            to_wrr = _set_policy(lab, "wrr")
            wrr_from = time.time()
            wrr_status = distributor.status()["policy"]
        finally:
            sender.join()
    assert (results[0].sent, results[0].failed) == (count, 0)
    received = sim.wait_for(count, timeout=10)

    assert (to_teid.returncode, to_teid.stdout.strip()) == (0, "veth0: policy teid"), (
        to_teid.stderr)
    assert (to_wrr.returncode, to_wrr.stdout.strip()) == (0, "veth0: policy wrr"), (
        to_wrr.stderr)
    assert (teid_status, wrr_status) == ("teid", "wrr")
    assert traffic_ended[0] > wrr_from + 0.2, "the last switch came after the traffic"
    assert received == count, _counts(sim.pgws)
    assert sum(pgw.corrupt for pgw in sim.pgws) == 0
    seqs = sorted(seq for pgw in sim.pgws for _t, _source, seq in pgw.arrivals)
    assert seqs == list(range(count))
    # While teid was in force, each TEID went to one PGW (a margin for the frames that
    # were in flight at the switch).
    pgws_of_teid: dict[int, set[tuple[str, int]]] = {}
    for pgw in sim.pgws:
        for arrival, _source, seq in pgw.arrivals:
            if teid_from + 0.05 <= arrival <= teid_until:
                pgws_of_teid.setdefault(teids[seq % len(teids)], set()).add(pgw.identity)
    assert len(pgws_of_teid) == len(teids)
    assert all(len(pgws) == 1 for pgws in pgws_of_teid.values())

    # Back under wrr, the shares are exact again.
    assert _send(lab, sim, 12_000) == 12_000
    assert _spread(sim.pgws) >= WRR_SPREAD, _counts(sim.pgws)


# wrr with several queues and weights far apart.


@pytest.mark.parametrize("distributor", [["--policy", "wrr", "--queues", "2"]], indirect=True)
def test_wrr_with_two_queues_and_weights_far_apart(
    lab: Lab, distributor: DistributorProcess, pgw_sims: Callable[..., PgwSimulator]
) -> None:
    # Shares 2.5%, 12.5% and 85% of 4,000,000,000: their sum is far beyond the 65,536
    # slots, so both levels of the wrr table serve. 60,000 datagrams give the smallest
    # 1,500; 1% of that is 15.
    sim = pgw_sims([100_000_001, 500_000_000, 3_399_999_999])
    wait_registered(distributor, sim.pgws)

    received = _send(lab, sim, 60_000, n_sources=10, n_addresses=None)

    assert received == 60_000, _counts(sim.pgws)
    assert sum(pgw.corrupt for pgw in sim.pgws) == 0
    assert _spread(sim.pgws) >= WRR_SPREAD, _counts(sim.pgws)
    queues = distributor.status()["counters"]["queues"]  # type: ignore[index]
    assert all(queue["rx_packets"] > 0 for queue in queues), queues

"""Fragmented GTP-U, end to end in the lab: the XDP program passes IPv4 fragments to the
kernel, the kernel reassembles them, and the distributor's slow path forwards the datagram
to the PGW that the policy picks; the kernel fragments it again on the way out.

The SGW sockets send datagrams of 3,000 bytes over a veth whose MTU is 1,500, so their own
kernel fragments them. A datagram counted intact by a simulated PGW was reassembled there
with valid checksums and its CRC-32 matched: it arrived whole and unchanged.
"""

from __future__ import annotations

import functools

import time
from collections.abc import Callable, Sequence

import pytest

from pgwfwd.demo import wait_registered
from pgwfwd.lab import DistributorProcess, Lab
from pgwfwd.sim import PgwSimulator, SgwSimulator, SimPgw

pytestmark = pytest.mark.netns

BIG = 3000        # bytes of UDP payload: three fragments on a 1,500-byte MTU
SMALL = 200
N_TEIDS = 60


@pytest.fixture
def pgw_sims(pgw_sims: Callable[..., PgwSimulator]) -> Callable[..., PgwSimulator]:
    """conftest's PGW simulators, recording the TEID of each arrival too."""
    return functools.partial(pgw_sims, record_teids=True)


def _send(lab: Lab, size: int, teids: Sequence[int], n_sources: int = 4) -> None:
    with SgwSimulator.with_sources(lab.vip, n_sources, lab.config.sgw_addresses,
                                   netns=lab.config.peers_netns, size=size) as sgw:
        result = sgw.send(len(teids), rate=2000.0, teids=teids)
    assert result.failed == 0


def _counters(distributor: DistributorProcess) -> dict[str, object]:
    counters = distributor.status()["counters"]
    assert isinstance(counters, dict)
    return counters


def _teid_owners(pgws: Sequence[SimPgw]) -> dict[int, set[tuple[str, int]]]:
    owners: dict[int, set[tuple[str, int]]] = {}
    for pgw in pgws:
        for teid in pgw.teids:
            owners.setdefault(teid, set()).add(pgw.identity)
    return owners


def _assert_frames_conserved(distributor: DistributorProcess) -> None:
    for queue in _counters(distributor)["queues"]:  # type: ignore[attr-defined]
        frames = queue["frames"]
        assert frames["fill"] + frames["in_flight"] + frames["held"] == frames["n_frames"], queue


def test_fragmented_gtpu_is_forwarded_whole_under_wrr(
    lab: Lab, distributor: DistributorProcess, pgw_sims: Callable[..., PgwSimulator]
) -> None:
    # No PGW yet: a reassembled datagram is a counted no_pgw drop of the slow path.
    _send(lab, BIG, [7])
    deadline = time.monotonic() + 5
    while _counters(distributor)["slowpath"]["drops"]["no_pgw"] < 1:  # type: ignore[index]
        assert time.monotonic() < deadline, _counters(distributor)
        time.sleep(0.05)

    sim = pgw_sims([1, 3])
    wait_registered(distributor, sim.pgws)
    sim.reset_counts()
    _send(lab, BIG, list(range(1, 41)))
    assert sim.wait_for(40) == 40

    # One wrr cycle is 4 datagrams long: any 40 in a row are shared exactly 10 : 30.
    assert [pgw.received for pgw in sim.pgws] == [10, 30]
    assert all(pgw.corrupt == 0 and pgw.received_bytes == pgw.received * BIG
               for pgw in sim.pgws)
    counters = _counters(distributor)
    slowpath = counters["slowpath"]
    assert slowpath["forwarded"] == 40  # type: ignore[index]
    assert slowpath["drops"]["no_pgw"] == 1  # type: ignore[index]
    assert counters["gtp_slowpath"] == 41
    assert counters["xdp"]["fragments"] >= 3 * 41  # type: ignore[index]
    assert counters["rx_packets"] == 0   # nothing of it took the AF_XDP path
    status = distributor.status()
    assert sum(p["packets"] for p in status["pgws"]) == 40  # type: ignore[union-attr]

    # Small datagrams still take the fast path alongside.
    sim.reset_counts()
    _send(lab, SMALL, list(range(1, 41)))
    assert sim.wait_for(40) == 40
    assert _counters(distributor)["rx_packets"] == 40
    _assert_frames_conserved(distributor)


@pytest.mark.parametrize("distributor", [["--policy", "teid"]], indirect=True)
def test_fragmented_gtpu_goes_to_the_pgw_of_its_teid(
    lab: Lab, distributor: DistributorProcess, pgw_sims: Callable[..., PgwSimulator]
) -> None:
    sim = pgw_sims([1, 2, 3])
    wait_registered(distributor, sim.pgws)
    teids = [0x1000 + 7919 * i for i in range(N_TEIDS)]

    # Small datagrams (AF_XDP) first, then the same TEIDs fragmented (the slow path).
    _send(lab, SMALL, teids)
    assert sim.wait_for(N_TEIDS) == N_TEIDS
    small_owners = _teid_owners(sim.pgws)
    sim.reset_counts()
    _send(lab, BIG, teids)
    assert sim.wait_for(N_TEIDS) == N_TEIDS
    big_owners = _teid_owners(sim.pgws)

    assert all(len(owners) == 1 for owners in small_owners.values())
    assert big_owners == small_owners
    assert len({next(iter(owners)) for owners in big_owners.values()}) == 3   # all 3 used
    assert all(pgw.corrupt == 0 and pgw.received_bytes == pgw.received * BIG
               for pgw in sim.pgws)
    slowpath = _counters(distributor)["slowpath"]
    assert slowpath["forwarded"] == N_TEIDS  # type: ignore[index]
    assert not any(slowpath["drops"].values())  # type: ignore[index]
    _assert_frames_conserved(distributor)

"""Selection tables: the properties that users see, checked on the tables themselves.

wrr: the data plane's walk (slots[cursor], and fine_slots[fine cursor] on a SLOT_FINE slot)
is simulated here, and what each PGW receives over windows of consecutive datagrams is
compared with its exact share n * w / W.

Why windows are judged two ways: a PGW expecting E datagrams receives a whole number, so
even a perfect sequence is off by up to 1/2, and min/max of received/weight can sink to
(E - 1/2) / (E + 1/2), below 0.99 once E < 100. The tables promise a deviation of at most
MAX_DEVIATION datagrams per queue, so the load tester's criterion (min/max >= 0.99) is
checked among the PGWs that expect at least 200 * MAX_DEVIATION datagrams per queue, where
it follows; every PGW, however small, is checked against the deviation bound.

teid: slot shares, tunnel shares of 100,000 TEIDs hashed as C hashes them, how many
tunnels move when a PGW leaves, joins or changes weight, and that the table depends only on
who is in it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scapy.contrib.gtp import GTP_U_Header
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from pgwfwd.tables import (MAX_PGWS, MAX_SLOTS, MAX_WEIGHT, PGW_DTYPE, POLICIES, SLOT_FINE,
                           PgwKey, TeidTable, WrrTable, build_wrr, check_policy,
                           fill_pgw_array, weight_shares)

#: Datagrams a PGW may be off its exact share in any window of one queue (see build_wrr).
MAX_DEVIATION = 4
#: Below this many expected datagrams per queue, min/max >= 0.99 cannot follow from it.
MIN_EXPECTED = 200 * MAX_DEVIATION

Weights = list[tuple[int, int]]


def walk(table: WrrTable, n: int, slot: int = 0, fine: int = 0) -> np.ndarray:
    """The PGW indices that one queue picks for n datagrams, from cursors (slot, fine), as
    C's select_wrr does (a cursor past the end of its array starts again at 0)."""
    slot = slot if slot < table.slots.size else 0
    picks = table.slots[(slot + np.arange(n)) % table.slots.size].astype(np.int64)
    deferred = picks == SLOT_FINE
    if deferred.any():
        fine = fine if fine < table.fine_slots.size else 0
        fine_positions = (fine + np.cumsum(deferred) - 1) % table.fine_slots.size
        picks[deferred] = table.fine_slots[fine_positions[deferred]]
    return picks


def random_cursors(table: WrrTable, rng: np.random.Generator) -> tuple[int, int]:
    return (int(rng.integers(0, table.slots.size)),
            int(rng.integers(0, max(1, table.fine_slots.size))))


def assert_window_shares(weights: Weights, counts: np.ndarray, n: int, queues: int = 1) -> None:
    """counts of n datagrams spread over queues: each PGW within MAX_DEVIATION per queue of
    n * w / W, and received/weight within 1% among the PGWs expecting enough."""
    shares = weight_shares(weights)
    expected = n * shares
    deviation = np.abs(counts - expected)
    worst = int(np.argmax(deviation))
    assert deviation.max() <= MAX_DEVIATION * queues, (worst, counts[worst], expected[worst])
    assert counts.sum() == n

    large = [index for index, _ in weights if expected[index] >= MIN_EXPECTED * queues]
    if len(large) >= 2:
        ratios = counts[large] / shares[large]
        assert ratios.min() / ratios.max() >= 0.99


def longest_run(picks: np.ndarray) -> dict[int, int]:
    """The longest run of consecutive picks of each PGW index."""
    change = np.flatnonzero(np.diff(picks)) + 1
    starts = np.concatenate([[0], change])
    lengths = np.diff(np.concatenate([starts, [picks.size]]))
    runs: dict[int, int] = {}
    for owner, length in zip(picks[starts].tolist(), lengths.tolist()):
        runs[owner] = max(runs.get(owner, 0), length)
    return runs


def random_weights(n: int, low: int, high: int, seed: int) -> Weights:
    rng = np.random.default_rng(seed)
    return [(index, int(weight)) for index, weight in enumerate(rng.integers(low, high, n))]


WRR_CASES: dict[str, Weights] = {
    "demo 10/50/30": [(0, 10), (1, 50), (2, 30)],
    "three huge coprime": [(0, MAX_WEIGHT), (1, 3_000_000_001), (2, 1_000_000_007)],
    "1 and 4e9": [(0, 1), (1, 4_000_000_000)],
    "1, 4e9 and 4e9 - 1": [(0, 1), (1, 4_000_000_000), (2, 3_999_999_999)],
    "1000 random": random_weights(1000, 1, 2**32, seed=1),
    "1000 within 2:1": random_weights(1000, 2**31, 2**32, seed=2),
    "1000 zipf": [(index, 4_000_000_000 // (index + 1)) for index in range(1000)],
    "1000 equal": [(index, 123_456_789) for index in range(1000)],
    "1000 of two huge weights": [(index, MAX_WEIGHT - index % 2) for index in range(1000)],
    "500 equal and one more": [(index, 1000) for index in range(500)] + [(500, 1001)],
    "10 random": random_weights(10, 1, 2**32, seed=3),
    "sparse indices": [(3, 10), (1023, 50), (511, 30), (9, 1)],
}


@pytest.fixture(params=list(WRR_CASES), scope="module")
def wrr_case(request: pytest.FixtureRequest) -> tuple[Weights, WrrTable]:
    weights = WRR_CASES[request.param]
    return weights, build_wrr(weights)


# wrr: the tables


def test_demo_weights_are_an_exact_short_cycle() -> None:
    table = build_wrr([(0, 10), (1, 50), (2, 30)])

    assert table.slots.dtype == np.uint16 and table.fine_slots.dtype == np.uint16
    assert table.slots.size == 9 and table.fine_slots.size == 0
    assert np.bincount(table.slots).tolist() == [1, 5, 3]


def test_gcd_reduction() -> None:
    table = build_wrr([(0, 3000), (1, 6000), (2, 9000)])

    assert np.bincount(table.slots).tolist() == [1, 2, 3]


def test_huge_weights_use_two_levels() -> None:
    weights = WRR_CASES["three huge coprime"]
    table = build_wrr(weights)
    total = sum(weight for _, weight in weights)

    coarse = np.bincount(table.slots, minlength=SLOT_FINE + 1)

    assert table.slots.size == MAX_SLOTS and table.fine_slots.size == MAX_SLOTS
    for index, weight in weights:
        assert coarse[index] == MAX_SLOTS * weight // total
    assert coarse[SLOT_FINE] == MAX_SLOTS - sum(MAX_SLOTS * w // total for _, w in weights)


def test_exact_share_of_each_pgw(wrr_case: tuple[Weights, WrrTable]) -> None:
    weights, table = wrr_case

    assert np.abs(table.shares() - weight_shares(weights)).max() <= len(weights) / 2**32
    assert table.shares().sum() == pytest.approx(1.0)


def test_an_exact_fine_level_gives_exact_shares() -> None:
    # W = 65540: 3 * 65536 and 65537 * 65536 leave 65528 and 12 over; with their gcd 4
    # taken out, the fine level is one exact cycle of 16382 + 3 slots.
    weights = [(0, 3), (1, 65537)]
    table = build_wrr(weights)

    assert table.fine_slots.size == 16385
    assert table.shares().tolist() == weight_shares(weights).tolist()


def test_one_level_shares_are_exact() -> None:
    weights = [(4, 1), (6, 3)]

    assert build_wrr(weights).shares()[[4, 6]].tolist() == [0.25, 0.75]
    assert weight_shares(weights)[[4, 6]].tolist() == [0.25, 0.75]


def test_a_tiny_weight_gets_its_tiny_share() -> None:
    table = build_wrr([(0, 1), (1, 4_000_000_000)])

    assert (table.slots == 0).sum() == 0   # below one slot in 65,536
    assert table.shares()[0] == pytest.approx(1 / 4_000_000_001, rel=0.1)
    assert walk(table, 1_000_000).tolist().count(0) <= 1


def test_slot_count_limit_is_honoured() -> None:
    weights = [(0, 1), (1, 100_000)]
    table = build_wrr(weights, max_slots=1000)

    assert table.slots.size == 1000 and table.fine_slots.size == 1000
    # One fine slot in 1000 is the resolution of the fine level here.
    assert table.shares()[0] == pytest.approx(1 / 100_001, abs=2 / 1000**2)


@pytest.mark.parametrize("weights", [[(0, 0)], []])
def test_no_forwardable_pgw_gives_no_slots(weights: Weights) -> None:
    table = build_wrr(weights)

    assert table.slots.size == 0 and table.fine_slots.size == 0
    assert table.shares().sum() == 0


@pytest.mark.parametrize("pairs", [[(MAX_PGWS, 1)], [(-1, 1)], [(0, 1), (0, 2)],
                                   [(0, MAX_WEIGHT + 1)], [(0, -1)]])
def test_bad_input_is_a_value_error(pairs: Weights) -> None:
    with pytest.raises(ValueError):
        build_wrr(pairs)


def test_build_is_deterministic() -> None:
    weights = WRR_CASES["1000 random"]

    first, second = build_wrr(weights), build_wrr(reversed(weights))

    assert np.array_equal(first.slots, second.slots)
    assert np.array_equal(first.fine_slots, second.fine_slots)


# wrr: what a queue sends


def test_every_window_of_a_short_cycle_is_within_two() -> None:
    weights = [(3, 10), (8, 50), (5, 30), (9, 1)]
    table = build_wrr(weights)

    for length in (10, 91, 1000, 10_000):
        for start in range(table.slots.size):
            counts = np.bincount(walk(table, length, start), minlength=MAX_PGWS)
            assert np.abs(counts - length * weight_shares(weights)).max() < 2


def test_windows_of_one_queue(wrr_case: tuple[Weights, WrrTable]) -> None:
    weights, table = wrr_case
    rng = np.random.default_rng(11)

    for n in (10_000, 65_537, 300_000):
        for _ in range(8):
            picks = walk(table, n, *random_cursors(table, rng))
            assert_window_shares(weights, np.bincount(picks, minlength=MAX_PGWS), n)


def test_every_prefix_of_one_queue_stays_close(wrr_case: tuple[Weights, WrrTable]) -> None:
    weights, table = wrr_case
    shares = weight_shares(weights)
    rng = np.random.default_rng(12)
    picks = walk(table, 200_000, *random_cursors(table, rng))
    positions = np.arange(1, picks.size + 1)

    # Any window is the difference of two prefixes: their deviations span the window's.
    watched = {int(np.argmax(shares)), int(np.argmin(np.where(shares > 0, shares, 2))),
               *rng.choice([index for index, _ in weights], 5).tolist()}
    for index in watched:
        deviation = np.cumsum(picks == index) - positions * shares[index]
        spread = max(deviation.max(), 0) - min(deviation.min(), 0)
        assert spread <= MAX_DEVIATION, (index, spread)


@pytest.mark.parametrize("queues", [2, 4])
def test_several_queues_summed(wrr_case: tuple[Weights, WrrTable], queues: int) -> None:
    weights, table = wrr_case
    rng = np.random.default_rng(queues)

    for n in (10_000, 1_000_000):
        # Each queue has its own cursors and its own part of the traffic.
        parts = np.diff(np.sort(np.concatenate([[0, n], rng.integers(0, n, queues - 1)])))
        counts = sum(np.bincount(walk(table, int(part), *random_cursors(table, rng)),
                                 minlength=MAX_PGWS) for part in parts)
        assert isinstance(counts, np.ndarray)
        assert_window_shares(weights, counts, n, queues)


def test_the_load_testers_criterion_at_ten_thousand() -> None:
    # Every PGW expects more than MIN_EXPECTED of 10,000 datagrams.
    for weights in ([(0, 10), (1, 50), (2, 30)], WRR_CASES["three huge coprime"],
                    [(0, 2_000_000_011), (1, 4_000_000_007), (2, 3_000_000_019)]):
        table = build_wrr(weights)
        rng = np.random.default_rng(5)
        for _ in range(50):
            counts = np.bincount(walk(table, 10_000, *random_cursors(table, rng)),
                                 minlength=MAX_PGWS)
            ratios = [counts[index] / weight for index, weight in weights]
            assert min(ratios) / max(ratios) >= 0.99


def test_the_load_testers_criterion_with_many_pgws() -> None:
    # 1,000 PGWs, weights within 2:1: N is chosen so that each expects MIN_EXPECTED or more.
    weights = WRR_CASES["1000 within 2:1"]
    table = build_wrr(weights)
    n = math.ceil(MIN_EXPECTED / weight_shares(weights)[:1000].min())
    rng = np.random.default_rng(6)

    counts = np.bincount(walk(table, n, *random_cursors(table, rng)), minlength=MAX_PGWS)

    ratios = counts[:1000] / np.array([weight for _, weight in weights])
    assert ratios.min() / ratios.max() >= 0.99


def test_no_long_runs(wrr_case: tuple[Weights, WrrTable]) -> None:
    weights, table = wrr_case
    shares = weight_shares(weights)
    rng = np.random.default_rng(13)
    picks = walk(table, 2 * MAX_SLOTS + 7, *random_cursors(table, rng))

    for index, run in longest_run(picks).items():
        share = shares[index]
        if share < 0.999:
            assert run <= math.ceil(share / (1 - share)) + 1, (index, share, run)


def test_equal_weights_are_a_round_robin() -> None:
    table = build_wrr((index, 7) for index in range(100))

    assert sorted(table.slots.tolist()) == list(range(100))
    assert longest_run(walk(table, 1000)) == {index: 1 for index in range(100)}


def test_thousand_pgws_build_two_levels_of_full_size() -> None:
    table = build_wrr(WRR_CASES["1000 random"])

    assert table.slots.size == MAX_SLOTS and table.fine_slots.size == MAX_SLOTS
    assert table.slots.max() == SLOT_FINE and table.fine_slots.max() < MAX_PGWS


# teid

TEID_COUNT = 100_000


def identities(n: int, port: int = 40000) -> list[PgwKey]:
    return [(f"198.18.{2 + index // 250}.{1 + index % 250}", port + index % 7)
            for index in range(n)]


@pytest.fixture(scope="module")
def teid_slots() -> np.ndarray:
    """The slots of TEID_COUNT random TEIDs, hashed by the data plane's own function."""
    native = pytest.importorskip("pgwfwd.native", reason="the C extension is not built")
    teids = np.random.default_rng(21).choice(2**32, TEID_COUNT, replace=False)
    slots: np.ndarray = np.array([native.teid_slot(int(teid), MAX_SLOTS) for teid in teids])
    return slots


def tunnel_owners(table: TeidTable, teid_slots: np.ndarray) -> np.ndarray:
    owners: np.ndarray = table.slots()[teid_slots]
    return owners


def slot_count_bound(share: float) -> float:
    """How far a PGW's slot count may stray from MAX_SLOTS * share: 5 standard deviations
    of the binomial spread of a hash, plus one."""
    return 5 * math.sqrt(MAX_SLOTS * share * (1 - share)) + 1


def assert_slot_shares(table: TeidTable, desired: dict[PgwKey, tuple[int, int]]) -> None:
    total = sum(weight for _, weight in desired.values())
    counts = np.bincount(table.slots(), minlength=MAX_PGWS)
    for index, weight in desired.values():
        share = weight / total
        assert abs(counts[index] / MAX_SLOTS - share) <= 0.02
        assert abs(counts[index] - MAX_SLOTS * share) <= slot_count_bound(share), index


@pytest.mark.parametrize("weight_list", [[10, 50, 30], [1, 1, 1, 1], [1, 2, 3, 4, 5],
                                         [MAX_WEIGHT, 3_000_000_000, 1_000_000_000]])
def test_teid_slot_shares_follow_the_weights(weight_list: list[int]) -> None:
    desired = {key: (index, weight) for index, (key, weight)
               in enumerate(zip(identities(len(weight_list)), weight_list))}

    table = TeidTable.build(desired)

    assert table.slots().dtype == np.uint16 and table.slots().size == MAX_SLOTS
    assert_slot_shares(table, desired)


@pytest.mark.parametrize("weight_list", [[10, 50, 30], [1, 1, 1, 1], [1, 2, 3, 4, 5]])
def test_teid_tunnel_shares_follow_the_weights(weight_list: list[int],
                                               teid_slots: np.ndarray) -> None:
    desired = {key: (index, weight) for index, (key, weight)
               in enumerate(zip(identities(len(weight_list)), weight_list))}
    table = TeidTable.build(desired)

    tunnels = np.bincount(tunnel_owners(table, teid_slots), minlength=len(weight_list))

    for index, weight in enumerate(weight_list):
        share = weight / sum(weight_list)
        assert abs(tunnels[index] / TEID_COUNT - share) <= 0.02
        # The spread of the table and of the TEID sample together, 5 standard deviations.
        spread = 5 * math.sqrt(share * (1 - share) * (1 / MAX_SLOTS + 1 / TEID_COUNT))
        assert abs(tunnels[index] / TEID_COUNT - share) <= spread


def test_teid_thousand_pgws() -> None:
    rng = np.random.default_rng(22)
    desired = {key: (index, int(weight)) for index, (key, weight)
               in enumerate(zip(identities(1000), rng.integers(1, 2**32, 1000)))}

    table = TeidTable.build(desired)

    assert len(table) == 1000
    assert_slot_shares(table, desired)


def test_teid_extreme_weights() -> None:
    desired = {("198.18.2.1", 1): (0, 1), ("198.18.2.2", 1): (1, 4_000_000_000),
               ("198.18.2.3", 1): (2, 4_000_000_000)}

    table = TeidTable.build(desired)

    counts = np.bincount(table.slots(), minlength=3)
    assert counts[0] <= 1   # its share is 1.25e-10 of 65,536 slots
    assert_slot_shares(table, desired)
    assert table.shares()[:3].sum() == 1.0


@pytest.mark.parametrize("n", [2, 10, 100, 1000])
def test_teid_leave_moves_only_the_leavers_tunnels(n: int, teid_slots: np.ndarray) -> None:
    desired = {key: (index, 1000) for index, key in enumerate(identities(n))}
    table = TeidTable.build(desired)
    before = tunnel_owners(table, teid_slots)
    leaver = identities(n)[n // 3]

    table.leave(leaver)

    after = tunnel_owners(table, teid_slots)
    moved = before != after
    assert np.all(before[moved] == desired[leaver][0])
    assert not np.any(after == desired[leaver][0])
    assert moved.mean() <= 1 / n + 0.01


@pytest.mark.parametrize("n", [1, 10, 100, 999])
def test_teid_join_moves_only_to_the_newcomer(n: int, teid_slots: np.ndarray) -> None:
    rng = np.random.default_rng(n)
    keys = identities(n + 1)
    desired = {key: (index, int(weight)) for index, (key, weight)
               in enumerate(zip(keys[:n], rng.integers(1, 1000, n)))}
    table = TeidTable.build(desired)
    before = tunnel_owners(table, teid_slots)

    table.join(keys[n], n, 500)

    after = tunnel_owners(table, teid_slots)
    moved = before != after
    new_share = 500 / (500 + sum(weight for _, weight in desired.values()))
    assert np.all(after[moved] == n)
    assert moved.mean() <= new_share + 0.01


def test_teid_weight_change_moves_only_to_or_from_that_pgw(teid_slots: np.ndarray) -> None:
    keys = identities(10)
    table = TeidTable.build({key: (index, 100) for index, key in enumerate(keys)})
    before = tunnel_owners(table, teid_slots)

    table.update(keys[4], 4, 300)
    raised = tunnel_owners(table, teid_slots)
    table.update(keys[4], 4, 50)
    lowered = tunnel_owners(table, teid_slots)

    assert np.all(raised[before != raised] == 4)
    assert np.all(raised[raised != lowered] == 4)
    assert (raised == 4).mean() == pytest.approx(300 / 1200, abs=0.02)
    assert (lowered == 4).mean() == pytest.approx(50 / 950, abs=0.02)


def test_teid_table_depends_only_on_who_is_in_it() -> None:
    rng = np.random.default_rng(23)
    keys = identities(60)
    weights = {key: int(weight) for key, weight in zip(keys, rng.integers(1, 2**32, 60))}
    table = TeidTable()
    indices = iter(range(MAX_PGWS))

    # Joins, leaves and weight changes in a random order; indices as a registry gives them.
    present: dict[PgwKey, tuple[int, int]] = {}
    for step in range(200):
        key = keys[int(rng.integers(0, len(keys)))]
        if key in present and step % 3 == 0:
            table.leave(key)
            del present[key]
        elif key in present:
            weights[key] = int(rng.integers(1, 2**32))
            present[key] = (present[key][0], weights[key])
            table.update(key, *present[key])
        else:
            present[key] = (next(indices), weights[key])
            table.join(key, *present[key])

    rebuilt = TeidTable.build(present)
    assert np.array_equal(table.slots(), rebuilt.slots())
    assert table.members() == present


def test_teid_restart_gives_the_same_tunnel_map() -> None:
    keys = identities(50)
    first = TeidTable.build({key: (index, 10 + index) for index, key in enumerate(keys)})
    # After a restart the PGWs register in another order and get other indices.
    shuffled = {key: (49 - index, 10 + index) for index, key in enumerate(keys)}
    second = TeidTable.build(shuffled)

    key_of_first = {index: key for index, key in enumerate(keys)}
    key_of_second = {index: key for key, (index, _) in shuffled.items()}
    assert [key_of_first[i] for i in first.slots().tolist()] == [
        key_of_second[i] for i in second.slots().tolist()]


def test_teid_sync_applies_the_difference() -> None:
    keys = identities(5)
    table = TeidTable()

    assert table.sync({key: (index, 10) for index, key in enumerate(keys)})
    assert not table.sync({key: (index, 10) for index, key in enumerate(keys)})
    before = table.slots()

    # Indices swapped: the same PGWs own the same slots under their new labels.
    assert table.sync({key: (4 - index, 10) for index, key in enumerate(keys)})
    assert np.array_equal(table.slots(), 4 - before)

    assert table.sync({keys[0]: (4, 10), keys[1]: (3, 0)})
    assert table.members() == {keys[0]: (4, 10)}
    assert np.all(table.slots() == 4)


def test_teid_empty_table() -> None:
    table = TeidTable()

    assert table.slots().size == 0 and table.shares().sum() == 0
    table.join(("198.18.2.1", 5), 7, 1)
    assert np.all(table.slots() == 7) and table.shares()[7] == 1.0
    table.leave(("198.18.2.1", 5))
    assert table.slots().size == 0 and len(table) == 0


@pytest.mark.parametrize("call", [
    lambda t: t.join(("198.18.2.1", 5), MAX_PGWS, 1),
    lambda t: t.join(("198.18.2.1", 5), 0, 0),
    lambda t: t.join(("198.18.2.1", 5), 0, MAX_WEIGHT + 1),
    lambda t: t.join(("198.18.2.1", 0), 0, 1),
    lambda t: t.join(("not an address", 1), 0, 1),
    lambda t: t.sync({("198.18.2.1", 1): (0, 1), ("198.18.2.2", 1): (0, 1)}),
])
def test_teid_bad_input_is_a_value_error(call: object) -> None:
    table = TeidTable()
    assert callable(call)

    with pytest.raises(ValueError):
        call(table)
    assert len(table) == 0


def test_teid_duplicate_index_is_refused() -> None:
    table = TeidTable.build({("198.18.2.1", 1): (0, 1)})

    with pytest.raises(ValueError):
        table.join(("198.18.2.2", 1), 0, 1)
    with pytest.raises(ValueError):
        TeidTable(n_slots=1000)


# Shared with C and with the API


def c_picks(table: WrrTable | TeidTable, teids: list[int], slot: int = 0,
            fine: int = 0) -> list[int]:
    """The PGW indices that C's per-frame path picks for G-PDUs of the given TEIDs, one
    after another on one queue whose cursors start at (slot, fine)."""
    native = pytest.importorskip("pgwfwd.native", reason="the C extension is not built")
    shared = native.SharedState("198.18.0.1", 2152, 3000, bytes.fromhex("020000000001"))
    addresses = [(index, f"198.18.1.{1 + index % 250}", 40000 + index, bytes(6))
                 for index in range(MAX_PGWS)]
    if isinstance(table, WrrTable):
        shared.publish(fill_pgw_array(addresses), table.slots, n_queues=0, policy="wrr",
                       fine_slots=table.fine_slots)
    else:
        shared.publish(fill_pgw_array(addresses), table.slots(), n_queues=0, policy="teid")
    cursor = native.FrameCursor()
    cursor.struct.slot, cursor.struct.fine_slot = slot, fine

    picks = []
    for teid in teids:
        result = native.process_frame(shared, g_pdu(teid), cursor)
        assert result.verdict == "forward"
        picks.append(result.pgw_index)
    return picks


def g_pdu(teid: int) -> bytes:
    """An Ethernet frame with a G-PDU from an SGW to 198.18.0.1:2152."""
    frame = bytearray(G_PDU)
    frame[TEID_OFFSET:TEID_OFFSET + 4] = teid.to_bytes(4, "big")
    return bytes(frame)   # the TEID is outside the IPv4 header checksum; UDP has none


#: The frame of g_pdu(0), lengths and checksums filled in by scapy.
G_PDU = bytes(Ether(src="02:00:00:00:01:01", dst="02:00:00:00:00:01")
              / IP(src="198.18.0.101", dst="198.18.0.1") / UDP(sport=40000, dport=2152, chksum=0)
              / GTP_U_Header(teid=0) / Raw(b"subscriber data"))
#: Ethernet, IPv4 and UDP headers, then flags, type and length come before the TEID.
TEID_OFFSET = 14 + 20 + 8 + 4


def test_c_walks_the_wrr_table_as_simulated_here() -> None:
    weights = WRR_CASES["three huge coprime"]
    table = build_wrr(weights)
    rng = np.random.default_rng(31)

    for _ in range(3):
        slot, fine = random_cursors(table, rng)
        assert c_picks(table, [1] * 3000, slot, fine) == walk(table, 3000, slot, fine).tolist()


def test_c_sends_each_tunnel_where_the_teid_table_says() -> None:
    native = pytest.importorskip("pgwfwd.native", reason="the C extension is not built")
    desired = {key: (index, 10 + index) for index, key in enumerate(identities(7))}
    table = TeidTable.build(desired)
    teids = np.random.default_rng(32).integers(0, 2**32, 3000).tolist()

    picks = c_picks(table, teids)

    owners = table.slots()
    assert picks == [int(owners[native.teid_slot(teid, MAX_SLOTS)]) for teid in teids]


def test_constants_match_the_data_plane() -> None:
    native = pytest.importorskip("pgwfwd.native", reason="the C extension is not built")

    assert SLOT_FINE == native.SLOT_FINE
    assert set(POLICIES) == set(native.POLICIES)


def test_check_policy() -> None:
    assert check_policy("teid") == "teid"
    with pytest.raises(ValueError, match="unknown policy 'rr'; known: wrr, teid"):
        check_policy("rr")


def test_pgw_array_is_in_network_byte_order() -> None:
    mac = bytes.fromhex("020000000102")
    array = fill_pgw_array([(5, "198.18.1.2", 2152, mac)])

    assert array.dtype == PGW_DTYPE and PGW_DTYPE.itemsize == 12
    assert array.size == MAX_PGWS
    assert array[5].tobytes() == bytes([198, 18, 1, 2, 0x08, 0x68]) + mac
    assert not array[np.arange(MAX_PGWS) != 5].view(np.uint8).any()


def test_pgw_array_refill_clears_old_entries() -> None:
    array = fill_pgw_array([(1, "198.18.1.2", 2152, bytes(6))])

    fill_pgw_array([(2, "198.18.1.3", 2152, bytes(6))], out=array)

    assert array[1]["addr"] == 0 and array[2]["port"] == 2152

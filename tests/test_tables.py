"""Selection tables: shares over windows of consecutive datagrams, smoothness, limits."""

from __future__ import annotations

import numpy as np
import pytest

from pgwfwd.tables import (MAX_PGWS, MAX_SLOTS, MAX_WEIGHT, PGW_DTYPE, build_slots,
                           fill_pgw_array, slot_counts, slot_shares)


def window_counts(slots: np.ndarray, start: int, length: int) -> np.ndarray:
    """What each PGW index receives from length datagrams sent from cursor start on."""
    picks = slots[(start + np.arange(length)) % slots.size]
    return np.bincount(picks, minlength=MAX_PGWS)


def assert_shares_within(slots: np.ndarray, weights: dict[int, int], length: int,
                         tolerance: float) -> None:
    """received/weight of every PGW within tolerance of each other, as the load tester asks."""
    rng = np.random.default_rng(7)
    for start in [0, 1, slots.size - 1, *rng.integers(0, slots.size, 20).tolist()]:
        counts = window_counts(slots, int(start), length)
        ratios = [counts[index] / weight for index, weight in weights.items()]
        assert min(ratios) / max(ratios) >= 1 - tolerance, (start, ratios)
        assert counts.sum() == length


def test_demo_weights_are_an_exact_short_cycle() -> None:
    slots = build_slots([(0, 10), (1, 50), (2, 30)])

    assert slots.dtype == np.uint16
    assert slots.size == 9
    assert np.bincount(slots).tolist() == [1, 5, 3]
    assert_shares_within(slots, {0: 10, 1: 50, 2: 30}, 10_000, 0.01)


def test_huge_coprime_weights_use_every_slot() -> None:
    weights = {0: MAX_WEIGHT, 1: 3_000_000_001, 2: 1_000_000_007}
    slots = build_slots(weights.items())

    assert slots.size == MAX_SLOTS
    assert_shares_within(slots, weights, 10_000, 0.01)


def test_many_equal_weights_are_plain_round_robin() -> None:
    slots = build_slots((index, 7) for index in range(100))

    assert slots.tolist() == list(range(100))
    assert_shares_within(slots, {index: 7 for index in range(100)}, 10_000, 0.01)


def test_thousand_pgws_with_equal_weights() -> None:
    weights = {index: 1_000_000 for index in range(1000)}
    slots = build_slots(weights.items())

    assert slots.size == 1000
    assert np.all(np.bincount(slots, minlength=1000) == 1)
    assert_shares_within(slots, weights, 1_000_000, 0.01)


def test_thousand_pgws_with_different_weights_stay_within_one_slot() -> None:
    weights = {index: 1000 + index for index in range(1000)}
    slots = build_slots(weights.items())
    total = sum(weights.values())

    counts = np.bincount(slots, minlength=MAX_PGWS)

    assert slots.size == MAX_SLOTS
    for index, weight in weights.items():
        assert abs(counts[index] - weight * MAX_SLOTS / total) < 1


def test_windows_are_smooth() -> None:
    weights = {3: 10, 8: 50, 5: 30, 9: 1}
    slots = build_slots(weights.items())
    share = {index: weight / sum(weights.values()) for index, weight in weights.items()}

    for length in (10, 91, 1000):
        for start in range(slots.size):
            counts = window_counts(slots, start, length)
            for index in weights:
                assert abs(counts[index] - length * share[index]) <= 2, (length, start, index)


def longest_run(slots: np.ndarray) -> int:
    """The longest run of one PGW in the cycle, wrapping around the end."""
    doubled = np.concatenate([slots, slots])
    longest = run = 1
    for previous, current in zip(doubled[:-1], doubled[1:]):
        run = run + 1 if current == previous else 1
        longest = max(longest, run)
    return min(longest, slots.size)


def test_no_long_runs_of_one_pgw() -> None:
    assert build_slots([(0, 1), (1, 1), (2, 2)]).tolist() == [2, 0, 1, 2]
    assert longest_run(build_slots([(0, 10), (1, 50), (2, 30)])) == 2
    assert longest_run(build_slots([(0, 1), (1, 3)])) == 3
    assert longest_run(build_slots((index, 1 + index % 3) for index in range(200))) == 1


def test_gcd_reduction() -> None:
    assert slot_counts([3000, 6000, 9000]) == [1, 2, 3]


def test_apportioned_counts_sum_to_max_slots() -> None:
    counts = slot_counts([MAX_WEIGHT - n for n in range(50)])

    assert sum(counts) == MAX_SLOTS
    assert max(counts) - min(counts) <= 1


def test_tiny_weight_still_gets_one_slot() -> None:
    counts = slot_counts([1, MAX_WEIGHT])

    assert counts == [1, MAX_SLOTS - 1]


def test_slot_count_limit_is_honoured() -> None:
    slots = build_slots([(0, 1), (1, 100_000)], max_slots=1000)

    assert slots.size == 1000
    assert (slots == 0).sum() == 1


@pytest.mark.parametrize("weights", [[(0, 0)], []])
def test_no_forwardable_pgw_gives_no_slots(weights: list[tuple[int, int]]) -> None:
    assert build_slots(weights).size == 0


@pytest.mark.parametrize("pairs", [[(MAX_PGWS, 1)], [(-1, 1)], [(0, 1), (0, 2)],
                                   [(0, MAX_WEIGHT + 1)]])
def test_bad_input_is_a_value_error(pairs: list[tuple[int, int]]) -> None:
    with pytest.raises(ValueError):
        build_slots(pairs)


def test_shares() -> None:
    shares = slot_shares(build_slots([(4, 1), (6, 3)]))

    assert shares[4] == pytest.approx(0.25) and shares[6] == pytest.approx(0.75)
    assert slot_shares(build_slots([])).sum() == 0


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

"""The selection tables that the data plane reads: a PGW array and a slot array.

Both are flat, fixed-size numpy arrays laid out like struct pgwfwd_pgw and the slots of
struct pgwfwd_table (csrc/pgwfwd.h), so they can be copied into shared memory as they are or,
later, into BPF array maps.

The data plane picks slots[cursor++ % n_slots] for each datagram. The slot array is a weighted
round robin that is both exact and smooth:
- exact: weights are divided by their gcd; when the sum then fits in MAX_SLOTS, the slot count
  is that sum and one pass over the slots is exactly one cycle of the weights. Otherwise there
  are MAX_SLOTS slots, apportioned by largest remainder (each PGW within one slot of its exact
  quota).
- smooth: PGW i with c_i slots has its k-th slot at position (k + 0.5) / c_i of the cycle, ties
  broken by PGW index, so any window of n consecutive slots holds n * share_i of PGW i, within
  about one slot.
"""

from __future__ import annotations

import heapq
import ipaddress
import math
from collections.abc import Iterable, Sequence

import numpy as np

#: struct pgwfwd_pgw: 12 bytes, address and port in network byte order.
PGW_DTYPE = np.dtype([("addr", ">u4"), ("port", ">u2"), ("mac", "u1", (6,))])
MAX_PGWS = 1024
MAX_SLOTS = 65536
MAX_WEIGHT = 2**32 - 1
SLOT_DTYPE = np.dtype(np.uint16)


def slot_counts(weights: Sequence[int], max_slots: int = MAX_SLOTS) -> list[int]:
    """How many slots each weight gets; every weight must be 1..MAX_WEIGHT.

    A weight whose share is below one slot still gets one slot, taken from the PGW with the
    most slots: a live PGW is never starved.
    XXX: with a spread of weights beyond about max_slots / 100 to 1 (or many hundreds of
    PGWs of different weights), a PGW with few slots is off its share by more than 1%,
    because one slot is the resolution. Finer shares would need a larger table.
    """
    if not weights:
        return []
    if len(weights) > max_slots:
        raise ValueError(f"{len(weights)} PGWs do not fit in {max_slots} slots")
    if any(not 0 < weight <= MAX_WEIGHT for weight in weights):
        raise ValueError(f"weights must be 1..{MAX_WEIGHT}")

    divisor = math.gcd(*weights)
    reduced = [weight // divisor for weight in weights]
    total = sum(reduced)
    if total <= max_slots:
        return reduced

    # Largest remainder, in exact integer arithmetic (weights reach 2**32, sums 2**42).
    quotas = [weight * max_slots for weight in reduced]
    counts = [quota // total for quota in quotas]
    remainders = [quota % total for quota in quotas]
    leftover = max_slots - sum(counts)
    by_remainder = sorted(range(len(counts)), key=lambda i: (-remainders[i], i))
    for i in by_remainder[:leftover]:
        counts[i] += 1

    _give_every_pgw_a_slot(counts)
    return counts


def _give_every_pgw_a_slot(counts: list[int]) -> None:
    starved = [i for i, count in enumerate(counts) if count == 0]
    if not starved:
        return

    largest = [(-count, i) for i, count in enumerate(counts) if count > 1]
    heapq.heapify(largest)
    for i in starved:
        negative_count, donor = heapq.heappop(largest)
        counts[donor] -= 1
        counts[i] = 1
        if -negative_count - 1 > 1:
            heapq.heappush(largest, (negative_count + 1, donor))


def build_slots(weights: Iterable[tuple[int, int]], max_slots: int = MAX_SLOTS) -> np.ndarray:
    """The slot array (uint16 PGW indices, in send order) for (PGW index, weight) pairs.

    Pairs of weight 0 are left out. No pair: an empty array, which the data plane reads as
    "drop everything, counted as no_pgw".
    """
    pairs = sorted((index, weight) for index, weight in weights if weight > 0)
    if not pairs:
        return np.zeros(0, dtype=SLOT_DTYPE)
    indices = np.array([index for index, _ in pairs], dtype=np.int64)
    if indices.min() < 0 or indices.max() >= MAX_PGWS or len(set(indices.tolist())) != len(pairs):
        raise ValueError(f"PGW indices must be distinct and in 0..{MAX_PGWS - 1}")

    counts = np.array(slot_counts([weight for _, weight in pairs], max_slots), dtype=np.int64)

    # Slot k of a PGW with c slots sits at (2k + 1) / 2c of the cycle. Equal fractions give
    # equal floats (division is correctly rounded), so ties fall to the PGW index.
    owner = np.repeat(indices, counts)
    first_of_owner = np.repeat(np.cumsum(counts) - counts, counts)
    k = np.arange(owner.size, dtype=np.int64) - first_of_owner
    position = (2 * k + 1) / (2 * np.repeat(counts, counts))
    order = np.lexsort((owner, position))
    return owner[order].astype(SLOT_DTYPE)


def slot_shares(slots: np.ndarray) -> np.ndarray:
    """The share of the datagrams that each PGW index receives (float64[MAX_PGWS])."""
    if slots.size == 0:
        return np.zeros(MAX_PGWS)
    return np.bincount(slots, minlength=MAX_PGWS) / slots.size


def empty_pgw_array() -> np.ndarray:
    return np.zeros(MAX_PGWS, dtype=PGW_DTYPE)


def fill_pgw_array(pgws: Iterable[tuple[int, str, int, bytes]],
                   out: np.ndarray | None = None) -> np.ndarray:
    """The PGW array from (index, IPv4 address, UDP port, next-hop MAC) of each PGW.

    Unused indices are zero. out, when given, is overwritten and returned.
    """
    array = empty_pgw_array() if out is None else out
    array[:] = np.zeros(1, dtype=PGW_DTYPE)

    for index, addr, port, mac in pgws:
        if not 0 <= index < MAX_PGWS:
            raise ValueError(f"PGW index {index} is outside 0..{MAX_PGWS - 1}")
        if not 0 < port < 65536 or len(mac) != 6:
            raise ValueError(f"bad PGW {addr}:{port} mac {mac!r}")
        array[index]["addr"] = int(ipaddress.IPv4Address(addr))
        array[index]["port"] = port
        array[index]["mac"] = np.frombuffer(mac, dtype=np.uint8)

    return array

"""The selection tables that the data plane reads: a PGW array and slot arrays.

All of them are flat, fixed-size numpy arrays laid out like struct pgwfwd_pgw and the slot
arrays of struct pgwfwd_table (csrc/pgwfwd.h), so they can be copied into shared memory as
they are or, later, into BPF array maps. Two policies fill the slots:

wrr (build_wrr): a weighted round robin per datagram, exact and smooth. A queue sends to
slots[cursor] and steps the cursor; a slot holding SLOT_FINE defers to fine_slots[fine
cursor], which steps on its own. See build_wrr for how the two levels are made and what they
guarantee.

teid (TeidTable): a weighted consistent hash. The data plane hashes the TEID (or, for a
payload that is not GTP-U, the source address and port) to one of MAX_SLOTS slots; each slot
names the PGW that wins a weighted rendezvous for it, so a tunnel stays on its PGW for as
long as the set of PGWs stays the same, and a change moves only the tunnels that must move.
"""

from __future__ import annotations

import heapq
import ipaddress
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

#: struct pgwfwd_pgw: 12 bytes, address and port in network byte order.
PGW_DTYPE = np.dtype([("addr", ">u4"), ("port", ">u2"), ("mac", "u1", (6,))])
MAX_PGWS = 1024
MAX_SLOTS = 65536
MAX_WEIGHT = 2**32 - 1
SLOT_DTYPE = np.dtype(np.uint16)
#: A wrr slot holding this value defers to the fine slot array (PGWFWD_SLOT_FINE in C).
SLOT_FINE = 65535
#: The selection policies, by the names that the API, the CLI and the control socket use.
POLICIES = ("wrr", "teid")

#: A PGW's identity: the (IPv4 address, UDP port) it registers from.
PgwKey = tuple[str, int]


def check_policy(name: str) -> str:
    """name when it is a known policy, else ValueError."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")
    return name


# wrr


@dataclass(frozen=True)
class WrrTable:
    """The two wrr slot arrays, as struct pgwfwd_table holds them (uint16 each).

    slots: PGW indices in send order, or SLOT_FINE. fine_slots: PGW indices in send order,
    stepped through by the SLOT_FINE entries of slots; empty when slots alone are exact.
    """

    slots: np.ndarray
    fine_slots: np.ndarray

    def shares(self) -> np.ndarray:
        """The share of the datagrams that each PGW index receives in the long run
        (float64[MAX_PGWS]): w / W, exactly when the fine level is an exact cycle (or
        absent), else within (number of PGWs) / 2**32."""
        shares = np.zeros(MAX_PGWS)
        if self.slots.size == 0:
            return shares

        coarse = np.bincount(self.slots, minlength=SLOT_FINE + 1)
        n_markers = int(coarse[SLOT_FINE])
        shares[:] = coarse[:MAX_PGWS] / self.slots.size
        if n_markers and self.fine_slots.size:
            fine = np.bincount(self.fine_slots, minlength=MAX_PGWS)[:MAX_PGWS]
            shares += n_markers * fine / (self.slots.size * self.fine_slots.size)
        return shares


def build_wrr(weights: Iterable[tuple[int, int]], max_slots: int = MAX_SLOTS) -> WrrTable:
    """The wrr table for (PGW index, weight) pairs; weights 1..MAX_WEIGHT, 0 = left out.

    All in exact integer arithmetic. Weights are divided by their gcd; W is their sum.
    - W <= max_slots: slots is one cycle of the weights, PGW i in w_i slots; no fine slots.
    - Otherwise, level 1: with L = max_slots, PGW i gets floor(L * w_i / W) slots, and the
      R < (number of PGWs) slots left over hold SLOT_FINE. Level 2: what each weight lost
      to the floor, r_i = (L * w_i) mod W, is apportioned over the fine slots: exactly, as
      one cycle of the r_i divided by their gcd, when that fits in max_slots, else
      max_slots fine slots by largest remainder. One cycle of the slots gives PGW i
      floor(L * w_i / W) datagrams plus R picks from the fine cycle, where its share is
      r_i / (R * W): in all L * w_i / W. The long-run share is w_i / W, exactly or within
      (number of PGWs) / 2**32.
    - Both levels are smooth (_smooth_order), and the SLOT_FINE markers are spread evenly
      through level 1.
    Guarantee, for one queue and whatever its cursors: over any n consecutive datagrams, PGW
    i receives n * w_i / W within 2 datagrams for one level, within 4 for two (about 2 for
    each level; typically 2 in all). With several queues that holds per queue. A weight
    below L / W of the total (1 next to 4e9) can get no slot on level 1 and few or none on
    level 2: its exact share is about 0, and that is what it gets. The longest run to one
    PGW of share p is about p / (1 - p) + 1 datagrams.
    """
    if not 1 <= max_slots <= MAX_SLOTS:
        raise ValueError(f"max_slots must be 1..{MAX_SLOTS}, not {max_slots}")
    indices, reduced = _checked_weights(weights)
    if indices.size == 0:
        return WrrTable(np.zeros(0, SLOT_DTYPE), np.zeros(0, SLOT_DTYPE))

    total = int(reduced.sum())
    if total <= max_slots:
        return WrrTable(_smooth_order(indices, reduced), np.zeros(0, SLOT_DTYPE))

    # Level 1. The products stay below 2**48 (weights < 2**32, max_slots <= 2**16).
    scaled = reduced * max_slots
    counts = scaled // total
    lost = scaled % total
    n_markers = max_slots - int(counts.sum())
    if n_markers == 0:
        return WrrTable(_smooth_order(indices, counts), np.zeros(0, SLOT_DTYPE))
    slots = _interleave(_smooth_order(indices, counts), max_slots - n_markers, SLOT_FINE,
                        n_markers)

    # Level 2, over what level 1 lost: each lost_i < W <= 2**42, so lost_i * max_slots
    # stays below 2**58.
    fine_weights = lost // math.gcd(*(int(value) for value in lost))
    if int(fine_weights.sum()) > max_slots:
        fine_weights = _largest_remainder(lost, max_slots)
    return WrrTable(slots, _smooth_order(indices, fine_weights))


def weight_shares(weights: Iterable[tuple[int, int]]) -> np.ndarray:
    """Each PGW index's exact share w / W of the datagrams (float64[MAX_PGWS])."""
    indices, reduced = _checked_weights(weights)
    shares = np.zeros(MAX_PGWS)
    if indices.size:
        shares[indices] = reduced / int(reduced.sum())
    return shares


def _checked_weights(weights: Iterable[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Indices (ascending) and weights divided by their gcd, as int64; weight 0 left out."""
    pairs = sorted((int(index), int(weight)) for index, weight in weights if weight != 0)
    if not pairs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if any(not 0 < weight <= MAX_WEIGHT for _, weight in pairs):
        raise ValueError(f"weights must be 0..{MAX_WEIGHT}")
    indices = [index for index, _ in pairs]
    if indices[0] < 0 or indices[-1] >= MAX_PGWS or len(set(indices)) != len(indices):
        raise ValueError(f"PGW indices must be distinct and in 0..{MAX_PGWS - 1}")

    divisor = math.gcd(*(weight for _, weight in pairs))
    return (np.array(indices, dtype=np.int64),
            np.array([weight // divisor for _, weight in pairs], dtype=np.int64))


def _largest_remainder(weights: np.ndarray, n_slots: int) -> np.ndarray:
    """n_slots apportioned to weights (int64, sum * n_slots < 2**63): the floor of each
    quota, plus one for the largest remainders (ties to the lower position)."""
    quotas = weights * n_slots
    total = int(weights.sum())
    counts = quotas // total
    leftover = n_slots - int(counts.sum())
    by_remainder = np.lexsort((np.arange(weights.size), -(quotas % total)))
    counts[by_remainder[:leftover]] += 1
    return counts


def _smooth_order(owners: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Each owner counts times (uint16), spread evenly over the cycle.

    Owners of equal count form one group, a round robin of them. Then, Huffman-like, the
    two groups with the fewest slots merge into one, the smaller one's slots spread evenly
    through the larger one's (_interleave), until one group is left. In any window, a
    group's count is within 1 of its share of its parent group's count there; down the
    tree that error is scaled by (owner's count / group's count), which at least halves
    every level or two. So an owner's count in any window of the cycle stays within about
    2 of its exact share, and no window gathers a cluster of small owners (as placing
    every owner's k-th slot at (k + 1/2) / count would, with many owners at 1/2).
    """
    # Owners of equal count start as one group, a plain round robin of them. A group is an
    # owner (an int) while it is one owner alone, else its uint16 slot array.
    keep = counts > 0
    owners, counts = owners[keep], counts[keep]
    if owners.size == 0:
        return np.zeros(0, SLOT_DTYPE)
    by_count = np.lexsort((owners, counts))
    values, starts = np.unique(counts[by_count], return_index=True)
    groups: list[tuple[int, int, int | np.ndarray]] = []
    for order, (count, start, end) in enumerate(zip(values.tolist(), starts.tolist(),
                                                    [*starts[1:].tolist(), owners.size])):
        members = owners[by_count[start:end]]
        group = int(members[0]) if members.size == 1 else np.tile(
            members.astype(SLOT_DTYPE), count)
        groups.append((count * members.size, order, group))
    heapq.heapify(groups)
    order = len(groups)

    while len(groups) > 1:
        small_count, _, small = heapq.heappop(groups)
        large_count, _, large = heapq.heappop(groups)
        merged = _interleave(large, large_count, small, small_count)
        heapq.heappush(groups, (small_count + large_count, order, merged))
        order += 1

    count, _, group = groups[0]
    return np.full(count, group, dtype=SLOT_DTYPE) if isinstance(group, int) else group


def _interleave(large: int | np.ndarray, large_count: int, small: int | np.ndarray,
                small_count: int) -> np.ndarray:
    """large and small merged, the k-th of small at floor((k + 1/2) * n / small_count) of
    the n = large_count + small_count positions: in any window of w positions, small holds
    floor or ceil of w * small_count / n."""
    size = large_count + small_count
    positions = np.arange(1, 2 * small_count, 2, dtype=np.int64)
    positions *= size
    positions //= 2 * small_count

    if isinstance(large, int):
        merged = np.full(size, large, dtype=SLOT_DTYPE)
    else:
        is_large = np.ones(size, dtype=bool)
        is_large[positions] = False
        merged = np.empty(size, dtype=SLOT_DTYPE)
        merged[is_large] = large
    merged[positions] = small
    return merged


# teid

_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_MASK64 = 2**64 - 1
#: Owner key of a slot that nobody owns; above every identity key (those have 48 bits).
_NO_KEY = np.uint64(_MASK64)
#: Score matrices are computed in chunks of about this many entries (8 bytes each).
_CHUNK = 1 << 16


def _mix64(value: int) -> int:
    """The splitmix64 finaliser on a Python int."""
    value = (value ^ (value >> 30)) * _MIX1 & _MASK64
    value = (value ^ (value >> 27)) * _MIX2 & _MASK64
    return value ^ (value >> 31)


def _mix64_array(values: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on a uint64 array, in place (products wrap, as in C)."""
    values ^= values >> np.uint64(30)
    values *= np.uint64(_MIX1)
    values ^= values >> np.uint64(27)
    values *= np.uint64(_MIX2)
    values ^= values >> np.uint64(31)
    return values


def identity_key(key: PgwKey) -> int:
    """A PGW's identity as one 48-bit number: address, then port."""
    addr, port = key
    if not 0 < port < 65536:
        raise ValueError(f"bad PGW port {port}")
    return int(ipaddress.IPv4Address(addr)) << 16 | port


def _identity_hash(key: int) -> int:
    return _mix64((key + _GOLDEN) & _MASK64)


def _slot_hashes(n_slots: int) -> np.ndarray:
    return _mix64_array((np.arange(n_slots, dtype=np.uint64) + np.uint64(1))
                        * np.uint64(_GOLDEN))


def _scores(hashes: np.ndarray | np.uint64, slot_hashes: np.ndarray,
            weights: np.ndarray | np.float64) -> np.ndarray:
    """-ln(u) / weight for each (PGW, slot) pair that the arguments broadcast to.

    u is uniform in (0, 1), from the top 53 bits of a mix of the PGW's and the slot's hash.
    The smallest score wins the slot; with an exponential -ln(u), PGW i wins a slot with
    probability w_i / W, independently of the others' order (weighted rendezvous hashing).
    Every entry is computed by the same element-wise operations, so a score does not depend
    on the array it was computed in.
    XXX: that assumes numpy's log gives an element the same last bit on its vectorised and
    its scalar path. Were they to differ, a slot could flip only between two PGWs whose
    scores agree to 1 part in 2**52, which no test of 65,536 slots has shown.
    """
    mixed = _mix64_array(np.bitwise_xor(hashes, slot_hashes))
    uniform = ((mixed >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
    scores: np.ndarray = -np.log(uniform) / weights
    return scores


@dataclass(frozen=True)
class _Member:
    index: int
    weight: int
    key: int     # identity_key(): breaks ties between equal scores, lower wins
    hash: int


class TeidTable:
    """The teid slot array, kept up to date one PGW change at a time.

    Slot s belongs to the PGW with the smallest score -ln(u(PGW, s)) / weight, where u
    comes from a hash of the PGW's identity (address and port, not its index, so that a
    restart gives the same table) and of s. Hence:
    - PGW i owns w_i / W of the slots in expectation, with a binomial spread: one of
      share p owns 65,536 p +- sqrt(65,536 p (1 - p)) slots (+-1% of its share for
      p = 1/9, +-0.4% for p = 1/2, one standard deviation);
    - when a PGW leaves, only its slots move, each to the PGW that came second there;
    - when a PGW joins or its weight rises, it takes the slots it now wins and no other
      slot moves; when its weight drops, only some of its own slots move;
    - the table depends only on the set of (identity, weight): however it was reached, it
      equals a build from scratch.
    Costs (65,536 slots): a join or weight rise scores every slot once (vectorised, about
    a millisecond); a leave or weight drop rescores only the PGW's own slots, against every
    remaining PGW. slots() is what the data plane reads: the owner's PGW index per slot.
    """

    def __init__(self, n_slots: int = MAX_SLOTS) -> None:
        if not 0 < n_slots <= MAX_SLOTS or n_slots & (n_slots - 1):
            raise ValueError(f"n_slots must be a power of two up to {MAX_SLOTS}")
        self.n_slots = n_slots
        self._slot_hashes = _slot_hashes(n_slots)
        self._members: dict[PgwKey, _Member] = {}
        self._best = np.full(n_slots, np.inf)
        self._owner_keys = np.full(n_slots, _NO_KEY, dtype=np.uint64)
        self._owners = np.zeros(n_slots, dtype=SLOT_DTYPE)

    @classmethod
    def build(cls, desired: Mapping[PgwKey, tuple[int, int]],
              n_slots: int = MAX_SLOTS) -> TeidTable:
        """A table built from scratch for {identity: (PGW index, weight)}, all at once."""
        table = cls(n_slots)
        members = {key: table._member(key, index, weight)
                   for key, (index, weight) in desired.items() if weight != 0}
        table._check_distinct_indices(list(members.values()))

        table._members = members
        table._rescore(np.arange(n_slots))
        return table

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, key: object) -> bool:
        return key in self._members

    def members(self) -> dict[PgwKey, tuple[int, int]]:
        """{identity: (PGW index, weight)} of the PGWs in the table."""
        return {key: (m.index, m.weight) for key, m in self._members.items()}

    def slots(self) -> np.ndarray:
        """The slot array to publish: a copy of the owners, empty when no PGW is in it."""
        if not self._members:
            return np.zeros(0, SLOT_DTYPE)
        return self._owners.copy()

    def shares(self) -> np.ndarray:
        """The fraction of the slots that each PGW index owns (float64[MAX_PGWS])."""
        if not self._members:
            return np.zeros(MAX_PGWS)
        return np.bincount(self._owners, minlength=MAX_PGWS)[:MAX_PGWS] / self.n_slots

    def join(self, key: PgwKey, index: int, weight: int) -> None:
        """Adds a PGW, or applies a new index or weight to one that is in already."""
        if key in self._members:
            self.update(key, index, weight)
            return
        member = self._member(key, index, weight)
        self._check_distinct_indices([*self._members.values(), member])

        self._members[key] = member
        self._take_over(member)

    def leave(self, key: PgwKey) -> None:
        """Removes a PGW; its slots go to whoever wins them among the others."""
        member = self._members.pop(key)
        self._rescore(np.flatnonzero(self._owner_keys == np.uint64(member.key)))

    def update(self, key: PgwKey, index: int, weight: int) -> None:
        """A new PGW index (relabels its slots) or weight (moves only what must move)."""
        old = self._members[key]
        member = self._member(key, index, weight)
        if index != old.index:
            self._check_distinct_indices([m for k, m in self._members.items() if k != key]
                                         + [member])
        self._members[key] = member

        mine = np.flatnonzero(self._owner_keys == np.uint64(member.key))
        if index != old.index:
            self._owners[mine] = index
        if weight > old.weight:
            self._take_over(member)
        elif weight < old.weight:
            self._rescore(mine)

    def sync(self, desired: Mapping[PgwKey, tuple[int, int]]) -> bool:
        """Makes the table that of {identity: (PGW index, weight)} by joins, leaves and
        updates; weight 0 means absent. True when anything changed."""
        wanted = {key: value for key, value in desired.items() if value[1] != 0}
        for key, (index, weight) in wanted.items():
            self._member(key, index, weight)   # check everything before changing anything
        indices = [index for index, _ in wanted.values()]
        if len(set(indices)) != len(indices):
            raise ValueError("PGW indices must be distinct")

        changed = False
        # All leavers at once: their slots are scored again in one pass, so PGWs expiring
        # together cost one leave, not one each.
        leavers = [key for key in self._members if key not in wanted]
        if leavers:
            gone = np.array([self._members.pop(key).key for key in leavers], dtype=np.uint64)
            self._rescore(np.flatnonzero(np.isin(self._owner_keys, gone)))
            changed = True
        # Relabel first, then change weights, so that no two members ever share an index.
        for key, (index, weight) in wanted.items():
            member = self._members.get(key)
            if member is not None and member.index != index:
                self._members[key] = _Member(index, member.weight, member.key, member.hash)
                self._owners[self._owner_keys == np.uint64(member.key)] = index
                changed = True
        for key, (index, weight) in wanted.items():
            member = self._members.get(key)
            if member is None:
                self.join(key, index, weight)
                changed = True
            elif member.weight != weight:
                self.update(key, index, weight)
                changed = True
        return changed

    def _member(self, key: PgwKey, index: int, weight: int) -> _Member:
        if not 0 <= index < MAX_PGWS:
            raise ValueError(f"PGW index {index} is outside 0..{MAX_PGWS - 1}")
        if not 0 < weight <= MAX_WEIGHT:
            raise ValueError(f"weights must be 1..{MAX_WEIGHT}, not {weight}")
        identity = identity_key(key)
        return _Member(index, weight, identity, _identity_hash(identity))

    def _check_distinct_indices(self, members: list[_Member]) -> None:
        if len({member.index for member in members}) != len(members):
            raise ValueError("PGW indices must be distinct")

    def _take_over(self, member: _Member) -> None:
        """member's scores dropped (it joined or weighs more): it takes what it now wins."""
        scores = _scores(np.uint64(member.hash), self._slot_hashes, np.float64(member.weight))
        key = np.uint64(member.key)
        wins = (scores < self._best) | ((scores == self._best) & (key < self._owner_keys))
        wins |= self._owner_keys == key   # its own slots: same owner, a lower score
        self._best[wins] = scores[wins]
        self._owner_keys[wins] = key
        self._owners[wins] = member.index

    def _rescore(self, slots: np.ndarray) -> None:
        """Gives each of slots to its winner among all members, from scratch."""
        self._best[slots] = np.inf
        self._owner_keys[slots] = _NO_KEY
        self._owners[slots] = 0
        if slots.size == 0 or not self._members:
            return

        # Members in key order: a later member must score strictly lower to win, and
        # within a matrix argmin's first of equals is the lower key.
        members = sorted(self._members.values(), key=lambda m: m.key)
        slot_hashes = self._slot_hashes[slots]
        best = np.full(slots.size, np.inf)
        owner_keys = np.full(slots.size, _NO_KEY, dtype=np.uint64)
        owners = np.zeros(slots.size, dtype=SLOT_DTYPE)
        # Few slots: a score matrix, one slot per row and one member per column, small
        # enough to stay in the cache. Many slots: one member at a time.
        width = _CHUNK // slots.size if slots.size <= _CHUNK // 32 else 1

        for start in range(0, len(members), width):
            chunk = members[start:start + width]
            if width == 1:
                scores = _scores(np.uint64(chunk[0].hash), slot_hashes,
                                 np.float64(chunk[0].weight))
                better = scores < best
                best[better] = scores[better]
                owner_keys[better] = chunk[0].key
                owners[better] = chunk[0].index
                continue

            hashes = np.array([m.hash for m in chunk], dtype=np.uint64)
            weights = np.array([m.weight for m in chunk], dtype=np.float64)
            matrix = _scores(hashes[None, :], slot_hashes[:, None], weights[None, :])
            winner = matrix.argmin(axis=1)
            scores = matrix[np.arange(slots.size), winner]
            better = scores < best
            best[better] = scores[better]
            owner_keys[better] = np.array([m.key for m in chunk], dtype=np.uint64)[
                winner[better]]
            owners[better] = np.array([m.index for m in chunk], dtype=SLOT_DTYPE)[
                winner[better]]

        self._best[slots] = best
        self._owner_keys[slots] = owner_keys
        self._owners[slots] = owners


# PGW array


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

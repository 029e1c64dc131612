"""The PGW registry: who registered, with which weight, and until when.

Pure Python with an injectable clock, so that expiry is tested in microseconds of fake time.
A PGW's identity is the source of its registration datagram, (IPv4 address, UDP port). Each
PGW holds a stable index (0 .. MAX_PGWS-1) from join to leave: the data plane counts packets
per index and the PGW array of the selection table is indexed by it.

Expiry is deadline-driven: every refresh moves the PGW's deadline to refresh time + expiry, a
heap keeps the deadlines in order, and the owner sleeps until next_deadline() and then calls
expire(now). Nothing sweeps the table once a second.

A datagram passes these checks, in this order, before it counts as a registration (each
refusal has a counter): a unicast source, inside the allow-list, within its address's rate
limit (a registered PGW's refresh every second is exempt), at least 4 bytes, and with an
authenticator, a valid extended datagram (pgwfwd.auth).
"""

from __future__ import annotations

import enum
import heapq
import ipaddress
import logging
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from pgwfwd.auth import AllowList, Authenticator, RateLimiter
from pgwfwd.errors import ConfigError

log = logging.getLogger(__name__)

#: Same limit as the C tables (struct pgwfwd_table.pgws).
MAX_PGWS = 1024

#: A registration is at least this long: the weight, big-endian unsigned 32 bits.
REGISTRATION_SIZE = 4

#: A registered PGW may send one datagram per this many seconds past the rate limit, so that
#: refreshing every second never depends on what else arrives from its address.
REFRESH_EXEMPT_INTERVAL = 0.5
#: Source addresses whose unicast verdict is cached.
ADDRESS_CACHE_SIZE = 4096

Clock = Callable[[], float]
PgwKey = tuple[str, int]


class EventKind(enum.Enum):
    JOIN = "join"
    REFRESH = "refresh"
    WEIGHT_CHANGE = "weight_change"
    LEAVE = "leave"
    EXPIRY = "expiry"


class Refusal(enum.Enum):
    """Why a datagram did not count as a registration (the counter names)."""

    SHORT = "short"
    NOT_UNICAST = "not_unicast"
    NOT_ALLOWED = "not_allowed"
    RATE_LIMITED = "rate_limited"
    UNAUTHENTICATED = "unauthenticated"
    BAD_HMAC = "bad_hmac"
    BAD_TIMESTAMP = "bad_timestamp"
    REPLAY = "replay"
    FULL = "full"
    UNKNOWN_LEAVE = "unknown_leave"


@dataclass
class PgwEntry:
    addr: str
    port: int
    weight: int
    index: int
    joined: float
    refreshed: float
    deadline: float
    exempt_at: float = float("-inf")   # when a datagram of it last skipped the rate limit

    @property
    def key(self) -> PgwKey:
        return (self.addr, self.port)


@dataclass(frozen=True)
class Event:
    kind: EventKind
    entry: PgwEntry
    old_weight: int = 0


@dataclass(frozen=True)
class Refused:
    reason: Refusal
    addr: str
    port: int


class Registry:
    """Registered PGWs of one interface.

    iface only prefixes log lines. broadcast is the subnet broadcast address of the VIP's
    network, refused as a source like any other non-unicast address. allow (networks),
    rate_limiter and authenticator guard handle_datagram(); without them, any unicast source
    may register as often as it likes with a plain datagram. register() is not guarded.
    """

    def __init__(self, iface: str, expiry: float = 3.0, clock: Clock = time.monotonic,
                 broadcast: str | None = None, max_pgws: int = MAX_PGWS,
                 allow: AllowList | None = None, rate_limiter: RateLimiter | None = None,
                 authenticator: Authenticator | None = None) -> None:
        if not expiry > 0:
            raise ConfigError(f"expiry must be positive, not {expiry}")
        if not 1 <= max_pgws <= MAX_PGWS:
            raise ConfigError(f"max_pgws must be 1..{MAX_PGWS}, not {max_pgws}")

        self.iface = iface
        self.expiry = float(expiry)
        self.clock = clock
        self.broadcast = ipaddress.IPv4Address(broadcast) if broadcast else None
        self.max_pgws = max_pgws
        self.allow = allow
        self.rate_limiter = rate_limiter
        self.authenticator = authenticator
        self._unicast_addresses: dict[str, bool] = {}

        self._entries: dict[PgwKey, PgwEntry] = {}
        self._free_indices = list(range(max_pgws))  # a heap: the lowest is reused first
        self._deadlines: list[tuple[float, PgwKey]] = []  # a heap, with stale items
        self.counters: dict[str, int] = {
            "registrations": 0, "joins": 0, "refreshes": 0, "weight_changes": 0,
            "leaves": 0, "expiries": 0,
            **{f"refused_{reason.value}": 0 for reason in Refusal},
        }

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[PgwEntry]:
        return iter(list(self._entries.values()))

    def get(self, key: PgwKey) -> PgwEntry | None:
        return self._entries.get(key)

    def handle_datagram(self, data: bytes, source: tuple[str, int],
                        now: float | None = None) -> Event | Refused:
        """Handles one datagram received on the registration port."""
        addr, port = source[0], source[1]
        if not self._is_unicast(addr, port):
            return self._refuse(Refusal.NOT_UNICAST, addr, port)
        if self.allow is not None and addr not in self.allow:
            return self._refuse(Refusal.NOT_ALLOWED, addr, port)

        if now is None:
            now = self.clock()
        if self.rate_limiter is not None and not self._exempt(addr, port, now):
            if not self.rate_limiter.admit(addr, now):
                return self._refuse(Refusal.RATE_LIMITED, addr, port)

        if len(data) < REGISTRATION_SIZE:
            return self._refuse(Refusal.SHORT, addr, port)
        if self.authenticator is None:
            (weight,) = struct.unpack_from("!I", data)
        else:
            verdict = self.authenticator.verify(data)
            if not isinstance(verdict, int):
                return self._refuse(Refusal(verdict.value), addr, port)
            weight = verdict
        return self._register(addr, port, weight, now)

    def register(self, addr: str, port: int, weight: int,
                 now: float | None = None) -> Event | Refused:
        """Applies a registration of weight from (addr, port); weight 0 leaves."""
        if not self._is_unicast(addr, port):
            return self._refuse(Refusal.NOT_UNICAST, addr, port)
        return self._register(addr, port, weight, self.clock() if now is None else now)

    def _register(self, addr: str, port: int, weight: int, now: float) -> Event | Refused:
        self.counters["registrations"] += 1
        key = (addr, port)
        entry = self._entries.get(key)

        if weight == 0:
            if entry is None:
                return self._refuse(Refusal.UNKNOWN_LEAVE, addr, port)
            self._remove(entry)
            self.counters["leaves"] += 1
            log.info("%s: pgw %s:%d left (weight 0)", self.iface, addr, port)
            return Event(EventKind.LEAVE, entry, entry.weight)

        if entry is None:
            if not self._free_indices:
                return self._refuse(Refusal.FULL, addr, port)
            entry = PgwEntry(addr, port, weight, heapq.heappop(self._free_indices),
                             joined=now, refreshed=now, deadline=now + self.expiry)
            self._entries[key] = entry
            heapq.heappush(self._deadlines, (entry.deadline, key))
            self.counters["joins"] += 1
            log.info("%s: pgw %s:%d joined with weight %d", self.iface, addr, port, weight)
            return Event(EventKind.JOIN, entry)

        self._refresh(entry, now)
        if entry.weight != weight:
            old_weight, entry.weight = entry.weight, weight
            self.counters["weight_changes"] += 1
            log.info("%s: pgw %s:%d weight %d -> %d", self.iface, addr, port, old_weight,
                     weight)
            return Event(EventKind.WEIGHT_CHANGE, entry, old_weight)

        self.counters["refreshes"] += 1
        return Event(EventKind.REFRESH, entry, weight)

    def next_deadline(self) -> float | None:
        """The earliest deadline of a registered PGW, None when there is none."""
        self._drop_stale_deadlines()
        return self._deadlines[0][0] if self._deadlines else None

    def expire(self, now: float | None = None) -> list[Event]:
        """Removes every PGW whose deadline is at or before now and returns them."""
        if now is None:
            now = self.clock()
        expired: list[Event] = []

        while True:
            self._drop_stale_deadlines()
            if not self._deadlines or self._deadlines[0][0] > now:
                break
            _, key = heapq.heappop(self._deadlines)
            entry = self._entries[key]
            self._remove(entry)
            self.counters["expiries"] += 1
            log.info("%s: pgw %s:%d expired, last refresh %.3f s ago", self.iface,
                     entry.addr, entry.port, now - entry.refreshed)
            expired.append(Event(EventKind.EXPIRY, entry, entry.weight))

        return expired

    def remove_all(self) -> list[PgwEntry]:
        entries = list(self._entries.values())
        for entry in entries:
            self._remove(entry)
        return entries

    def _refresh(self, entry: PgwEntry, now: float) -> None:
        # The old heap item stays behind; _drop_stale_deadlines skips it because it no longer
        # equals the entry's deadline. That keeps a refresh O(log n).
        entry.refreshed = now
        entry.deadline = now + self.expiry
        heapq.heappush(self._deadlines, (entry.deadline, entry.key))
        self._compact_deadlines()

    def _remove(self, entry: PgwEntry) -> None:
        del self._entries[entry.key]
        heapq.heappush(self._free_indices, entry.index)

    def _drop_stale_deadlines(self) -> None:
        while self._deadlines:
            deadline, key = self._deadlines[0]
            entry = self._entries.get(key)
            if entry is not None and entry.deadline == deadline:
                return
            heapq.heappop(self._deadlines)

    def _compact_deadlines(self) -> None:
        # Stale items surface and go within one expiry time, but an owner that never asks
        # for the next deadline would let them pile up: rebuild when they dominate.
        if len(self._deadlines) > 4 * len(self._entries) + 64:
            self._deadlines = [(e.deadline, e.key) for e in self._entries.values()]
            heapq.heapify(self._deadlines)

    def _exempt(self, addr: str, port: int, now: float) -> bool:
        entry = self._entries.get((addr, port))
        if entry is None or now - entry.exempt_at < REFRESH_EXEMPT_INTERVAL:
            return False
        entry.exempt_at = now
        return True

    def _is_unicast(self, addr: str, port: int) -> bool:
        # Cached by address: under a registration storm from a few addresses this is one
        # dict look-up rather than half a dozen ipaddress checks per datagram.
        verdict = self._unicast_addresses.get(addr)
        if verdict is None:
            verdict = self._is_unicast_address(addr)
            if len(self._unicast_addresses) >= ADDRESS_CACHE_SIZE:
                self._unicast_addresses.clear()
            self._unicast_addresses[addr] = verdict
        return verdict and port != 0

    def _is_unicast_address(self, addr: str) -> bool:
        try:
            address = ipaddress.IPv4Address(addr)
        except ValueError:
            return False
        return not (address.is_unspecified or address.is_multicast
                    or address.is_loopback or address.is_reserved
                    or address == ipaddress.IPv4Address("255.255.255.255")
                    or address == self.broadcast)

    def _refuse(self, reason: Refusal, addr: str, port: int) -> Refused:
        self.counters[f"refused_{reason.value}"] += 1
        return Refused(reason, addr, port)


def subnet_broadcast(addr: str, prefixlen: int) -> str | None:
    """The directed broadcast address of addr/prefixlen; None for /31 and /32 (RFC 3021)."""
    if prefixlen >= 31:
        return None
    return str(ipaddress.IPv4Interface(f"{addr}/{prefixlen}").network.broadcast_address)


def weights_of(entries: Iterable[PgwEntry]) -> list[tuple[int, int]]:
    """(index, weight) of each entry, the input of tables.build_wrr()."""
    return [(entry.index, entry.weight) for entry in entries]

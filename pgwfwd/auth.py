"""Registration security: who may register, how often, and authenticated registrations.

Pure Python with injectable clocks, like the registry that applies it.

- allow-list: the source address of a registration must lie in one of the allowed IPv4
  networks (parse_allow_list);
- rate limit: a token bucket per source address (RateLimiter), so that one address cannot
  keep the control thread busy or churn the PGW table;
- authentication (Authenticator): with a shared key, a registration is the extended datagram

      weight (4 bytes, big-endian) | timestamp (8 bytes, big-endian, Unix time in ms)
      | nonce (8 bytes) | HMAC-SHA256 of the first 20 bytes with the key (32 bytes)

  52 bytes in all. It is accepted when the HMAC is right, the timestamp lies within the
  window (30 s either way) of this host's clock, and the nonce was not seen before within
  that window. Because a PGW's first 4 bytes are its weight in both forms, an authenticating
  PGW also registers with a distributor that has no key.
"""

from __future__ import annotations

import enum
import hashlib
import heapq
import hmac
import ipaddress
import logging
import os
import secrets
import stat
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pgwfwd.errors import ConfigError

log = logging.getLogger(__name__)

#: weight | timestamp in ms | nonce, the part the HMAC covers.
SIGNED = struct.Struct("!IQ8s")
MAC_SIZE = hashlib.sha256().digest_size
AUTH_REGISTRATION_SIZE = SIGNED.size + MAC_SIZE   # 52
MIN_KEY_SIZE = 16
#: Timestamps further than this from the distributor's clock (either way) are refused.
DEFAULT_WINDOW = 30.0
#: Nonces remembered at most; beyond, the oldest go and the window's floor moves up.
MAX_NONCES = 1 << 17

#: Default registrations per second per source address, and the burst above that rate.
DEFAULT_RATE = 20.0
DEFAULT_BURST = 40
#: Source addresses with a bucket of their own; the others share one bucket.
MAX_BUCKETS = 1 << 16

Clock = Callable[[], float]


class AuthFailure(enum.Enum):
    """Why an extended registration was refused (the registry's counter names)."""

    UNAUTHENTICATED = "unauthenticated"   # a plain 4-byte registration while a key is set
    BAD_HMAC = "bad_hmac"
    BAD_TIMESTAMP = "bad_timestamp"       # outside the window, or older than the nonce memory
    REPLAY = "replay"


def load_key(path: str) -> bytes:
    """The key in path, raw bytes, at least MIN_KEY_SIZE; ConfigError otherwise."""
    try:
        with open(path, "rb") as key_file:
            key = key_file.read()
            mode = os.fstat(key_file.fileno()).st_mode
    except OSError as error:
        raise ConfigError(f"cannot read the auth key file {path}: "
                          f"{error.strerror or error}") from None

    if len(key) < MIN_KEY_SIZE:
        raise ConfigError(f"the auth key file {path} holds {len(key)} bytes, "
                          f"at least {MIN_KEY_SIZE} are needed")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s: the auth key file is accessible to others than its owner", path)
    return key


def check_key(key: bytes) -> bytes:
    if not isinstance(key, bytes) or len(key) < MIN_KEY_SIZE:
        raise ConfigError(f"the auth key must be at least {MIN_KEY_SIZE} bytes")
    return key


def sign_registration(key: bytes, weight: int, timestamp_ms: int | None = None,
                      nonce: bytes | None = None) -> bytes:
    """An extended (authenticated) registration of weight; now and a random nonce unless
    given."""
    if timestamp_ms is None:
        timestamp_ms = time.time_ns() // 1_000_000
    if nonce is None:
        nonce = secrets.token_bytes(8)
    signed = SIGNED.pack(weight, timestamp_ms, nonce)
    return signed + hmac.new(key, signed, hashlib.sha256).digest()


class Authenticator:
    """Checks extended registrations: HMAC, timestamp window and replays.

    Nonces are remembered over all sources, not per source: the HMAC does not cover the
    sender's address, so a registration copied off the wire and replayed from another
    address is a replay too. Memory is bounded: a nonce is forgotten once its timestamp has
    left the window, and when more than max_nonces are within it the oldest are forgotten
    and every timestamp up to theirs is refused from then on (fails closed).
    """

    def __init__(self, key: bytes, window: float = DEFAULT_WINDOW,
                 wall_clock: Clock = time.time, max_nonces: int = MAX_NONCES) -> None:
        if not window > 0:
            raise ConfigError(f"the authentication window must be positive, not {window}")
        self._key = check_key(key)
        self.window_ms = int(window * 1000)
        self.wall_clock = wall_clock
        self.max_nonces = max_nonces
        self._nonces: dict[bytes, int] = {}            # nonce -> its timestamp
        self._forget: list[tuple[int, bytes]] = []     # a heap of (timestamp, nonce)
        self._floor_ms = -1                            # timestamps up to it are refused

    def __len__(self) -> int:
        return len(self._nonces)

    def verify(self, data: bytes, wall_now: float | None = None) -> int | AuthFailure:
        """The weight of an extended registration, or why it is refused."""
        if len(data) < AUTH_REGISTRATION_SIZE:
            return AuthFailure.UNAUTHENTICATED

        signed = data[:SIGNED.size]
        mac = data[SIGNED.size:AUTH_REGISTRATION_SIZE]
        expected = hmac.new(self._key, signed, hashlib.sha256).digest()
        if not hmac.compare_digest(mac, expected):
            return AuthFailure.BAD_HMAC

        weight, timestamp_ms, nonce = SIGNED.unpack(signed)
        now_ms = int((self.wall_clock() if wall_now is None else wall_now) * 1000)
        self._forget_before(now_ms - self.window_ms)
        if abs(timestamp_ms - now_ms) > self.window_ms or timestamp_ms <= self._floor_ms:
            return AuthFailure.BAD_TIMESTAMP
        if nonce in self._nonces:
            return AuthFailure.REPLAY

        self._remember(nonce, timestamp_ms)
        return int(weight)

    def _remember(self, nonce: bytes, timestamp_ms: int) -> None:
        while len(self._nonces) >= self.max_nonces:
            oldest_ms, oldest = heapq.heappop(self._forget)
            del self._nonces[oldest]
            self._floor_ms = max(self._floor_ms, oldest_ms)
        self._nonces[nonce] = timestamp_ms
        heapq.heappush(self._forget, (timestamp_ms, nonce))

    def _forget_before(self, oldest_valid_ms: int) -> None:
        # A nonce whose timestamp left the window cannot be replayed: the timestamp check
        # refuses it first.
        while self._forget and self._forget[0][0] < oldest_valid_ms:
            _, nonce = heapq.heappop(self._forget)
            del self._nonces[nonce]


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """A token bucket per source address: rate tokens a second, at most burst of them.

    At most max_buckets addresses have a bucket of their own; when that many are in use
    and none has been idle long enough to be full again, new addresses share one overflow
    bucket, so that a storm from many addresses cannot grow memory without bound.
    """

    def __init__(self, rate: float = DEFAULT_RATE, burst: int = DEFAULT_BURST,
                 max_buckets: int = MAX_BUCKETS) -> None:
        if not rate > 0:
            raise ConfigError(f"the registration rate must be positive, not {rate}")
        if not burst >= 1:
            raise ConfigError(f"the registration burst must be at least 1, not {burst}")
        self.rate = float(rate)
        self.burst = float(burst)
        self.max_buckets = max_buckets
        self._buckets: dict[str, _Bucket] = {}
        self._overflow: _Bucket | None = None
        self._pruned = float("-inf")

    def __len__(self) -> int:
        return len(self._buckets)

    def admit(self, addr: str, now: float) -> bool:
        """Takes a token from addr's bucket; False when it has none."""
        bucket = self._buckets.get(addr)
        if bucket is None:
            bucket = self._new_bucket(addr, now)

        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True

    def _new_bucket(self, addr: str, now: float) -> _Bucket:
        if len(self._buckets) >= self.max_buckets:
            self._prune(now)
        if len(self._buckets) < self.max_buckets:
            bucket = self._buckets[addr] = _Bucket(self.burst, now)
            return bucket

        if self._overflow is None:
            self._overflow = _Bucket(self.burst, now)
        return self._overflow

    def _prune(self, now: float) -> None:
        # A bucket that has had time to fill up again is the same as none. The scan is at
        # most once per refill time, so a table full of busy addresses costs little.
        refill = self.burst / self.rate
        if now - self._pruned < refill:
            return
        self._pruned = now
        self._buckets = {addr: bucket for addr, bucket in self._buckets.items()
                         if now - bucket.updated < refill}


def parse_allow_list(networks: Iterable[str | ipaddress.IPv4Network]
                     ) -> tuple[ipaddress.IPv4Network, ...]:
    """IPv4 networks from CIDR strings (an address alone is a /32); ConfigError for a bad
    one, such as a network with host bits set (198.18.0.5/24)."""
    parsed = []
    for network in networks:
        if isinstance(network, ipaddress.IPv4Network):
            parsed.append(network)
            continue
        try:
            parsed.append(ipaddress.IPv4Network(str(network).strip()))
        except ValueError as error:
            raise ConfigError(f"--allow {network}: {error}") from None
    if not parsed:
        raise ConfigError("the allow-list is empty: no PGW could register")
    return tuple(parsed)


class AllowList:
    """Source addresses allowed to register, with the verdicts of recent addresses cached:
    a storm from a few addresses is then one dict look-up per datagram."""

    CACHE_SIZE = 4096

    def __init__(self, networks: Iterable[str | ipaddress.IPv4Network]) -> None:
        self.networks = parse_allow_list(networks)
        self._ranges = [(int(n.network_address), int(n.netmask)) for n in self.networks]
        self._verdicts: dict[str, bool] = {}

    def __contains__(self, addr: str) -> bool:
        verdict = self._verdicts.get(addr)
        if verdict is None:
            verdict = self._check(addr)
            if len(self._verdicts) >= self.CACHE_SIZE:
                self._verdicts.clear()
            self._verdicts[addr] = verdict
        return verdict

    def _check(self, addr: str) -> bool:
        try:
            value = int(ipaddress.IPv4Address(addr))
        except ValueError:
            return False
        return any(value & netmask == network for network, netmask in self._ranges)

    def __str__(self) -> str:
        return ", ".join(str(network) for network in self.networks)

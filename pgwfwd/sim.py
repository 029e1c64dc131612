"""Simulated PGWs and SGWs that speak only the wire contract.

A simulated PGW does what a real one does: it connects one UDP socket to VIP:reg-port,
writes its 4-byte big-endian weight on it every second and reads forwarded traffic from
the same socket. Because the socket is connected, only datagrams from VIP:reg-port reach
it, and because the kernel drops datagrams with a bad checksum before any socket sees
them, a datagram counted here proves that the distributor addressed it right and that
its IPv4 and UDP checksums were valid.

A simulated SGW sends GTP-U G-PDUs to VIP:gtp-port from several sources, paced to a
rate, with a TEID that changes with every datagram or cycles through a given list. Each
payload carries a sequence number and a CRC-32 over the whole datagram, so the PGW side
can tell that the payload arrived byte-for-byte unchanged; it can also note each
datagram's TEID, to show which tunnels reached which PGW.

Both can create their sockets inside a named network namespace (the lab's peers), from
the current process.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import selectors
import socket
import struct
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType

import click

from pgwfwd.auth import load_key, sign_registration
from pgwfwd.errors import PgwfwdError
from pgwfwd.lab import PEERS_NETNS, SGW_ADDRESSES, in_netns

logger = logging.getLogger(__name__)

DEFAULT_GTP_PORT = 2152
DEFAULT_REG_PORT = 3000
DEFAULT_REFRESH_INTERVAL = 1.0
DEFAULT_DATAGRAM_SIZE = 64
RECEIVE_BUFFER_BYTES = 16 * 1024 * 1024

# GTP-U (3GPP TS 29.281) mandatory header: flags, message type, length, TEID.
GTPU_HEADER = struct.Struct("!BBHI")
GTPU_FLAGS_V1_PT = 0x30      # version 1 in the top 3 bits, PT=1, no E/S/PN
GTPU_TYPE_G_PDU = 255

# Our payload after the GTP-U header: magic, source index, sequence, filler, CRC-32.
SIM_MAGIC = 0x5047_5746     # "PGWF"
SIM_FIELDS = struct.Struct("!IHQ")
SIM_TRAILER = struct.Struct("!I")
MIN_DATAGRAM_SIZE = GTPU_HEADER.size + SIM_FIELDS.size + SIM_TRAILER.size

_WEIGHT = struct.Struct("!I")
# Linux socket options that Python's socket module does not name.
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_TIMESPEC = struct.Struct("@qq")


class SimError(PgwfwdError, OSError):
    """A simulator could not set up or use its sockets."""


def gtpu_header(teid: int, payload_length: int) -> bytes:
    """The 8-byte G-PDU header for a payload of that length."""
    return GTPU_HEADER.pack(GTPU_FLAGS_V1_PT, GTPU_TYPE_G_PDU, payload_length, teid)


class DatagramBuilder:
    """Builds the SGW's G-PDU datagrams into one reused buffer (the send hot loop)."""

    def __init__(self, size: int = DEFAULT_DATAGRAM_SIZE) -> None:
        if size < MIN_DATAGRAM_SIZE or size > 65507:
            raise ValueError(f"datagram size {size}: must be {MIN_DATAGRAM_SIZE}..65507")
        self.size = size
        self._buffer = bytearray(size)
        self._crc_end = size - SIM_TRAILER.size

        # A filler that differs from byte to byte, so that a shifted or overwritten
        # stretch of payload shows in the CRC.
        filler_start = GTPU_HEADER.size + SIM_FIELDS.size
        for offset in range(filler_start, self._crc_end):
            self._buffer[offset] = (offset * 7 + 3) & 0xFF

    def build(self, teid: int, source: int, seq: int) -> bytes:
        buffer = self._buffer
        GTPU_HEADER.pack_into(
            buffer, 0, GTPU_FLAGS_V1_PT, GTPU_TYPE_G_PDU, self.size - GTPU_HEADER.size, teid
        )
        SIM_FIELDS.pack_into(buffer, GTPU_HEADER.size, SIM_MAGIC, source, seq)
        crc = zlib.crc32(memoryview(buffer)[: self._crc_end])
        SIM_TRAILER.pack_into(buffer, self._crc_end, crc)
        return bytes(buffer)


def datagram_intact(data: bytes) -> bool:
    """True when data is a datagram our SGW built, unchanged."""
    if len(data) < MIN_DATAGRAM_SIZE:
        return False

    flags, message_type, length, _teid = GTPU_HEADER.unpack_from(data)
    if (flags, message_type, length) != (
        GTPU_FLAGS_V1_PT, GTPU_TYPE_G_PDU, len(data) - GTPU_HEADER.size
    ):
        return False
    magic, _source, _seq = SIM_FIELDS.unpack_from(data, GTPU_HEADER.size)
    if magic != SIM_MAGIC:
        return False

    crc_end = len(data) - SIM_TRAILER.size
    (crc,) = SIM_TRAILER.unpack_from(data, crc_end)
    return bool(crc == zlib.crc32(memoryview(data)[:crc_end]))


def datagram_seq(data: bytes) -> tuple[int, int]:
    """(source index, sequence number) of one of our datagrams."""
    _magic, source, seq = SIM_FIELDS.unpack_from(data, GTPU_HEADER.size)
    return source, seq


def datagram_teid(data: bytes) -> int:
    """The TEID in the GTP-U header of one of our datagrams."""
    teid: int = GTPU_HEADER.unpack_from(data)[3]
    return teid


@contextlib.contextmanager
def _maybe_netns(name: str | None) -> Iterator[None]:
    if name is None:
        yield
    else:
        with in_netns(name):
            yield


def _bind(sock: socket.socket, address: str, port: int, netns_name: str | None) -> None:
    try:
        sock.bind((address, port))
    except OSError as exc:
        sock.close()
        where = f"netns {netns_name}" if netns_name else "this namespace"
        hint = "" if netns_name else f" (inside the lab: --netns {PEERS_NETNS})"
        raise SimError(
            exc.errno, f"{address}:{port}: cannot bind in {where}: {exc.strerror}{hint}"
        ) from None


@dataclass
class SimPgw:
    """One simulated PGW: its identity, weight and what it has received."""

    address: str
    weight: int
    port: int = 0
    refreshing: bool = True
    received: int = 0
    received_bytes: int = 0
    corrupt: int = 0
    #: kernel receive times (time.time() clock) of the first and last datagram
    first_arrival: float | None = None
    last_arrival: float | None = None
    #: time.time() just before the last registration was sent
    last_refresh: float | None = None
    #: every (arrival time, source index, sequence) when recording is on
    arrivals: list[tuple[float, int, int]] = field(default_factory=list)
    #: when recording arrivals: every datagram that is not one of our SGW's, as it came
    foreign: list[bytes] = field(default_factory=list)
    #: when recording TEIDs: datagrams received per TEID (of our SGW's datagrams)
    teids: Counter[int] = field(default_factory=Counter)
    sock: socket.socket | None = field(default=None, repr=False)

    @property
    def identity(self) -> tuple[str, int]:
        return self.address, self.port

    def reset_counts(self) -> None:
        self.received = 0
        self.received_bytes = 0
        self.corrupt = 0
        self.first_arrival = None
        self.last_arrival = None
        self.arrivals = []
        self.foreign = []
        self.teids = Counter()


class PgwSimulator:
    """Simulated PGWs, each on its own connected UDP socket, refreshing in a thread and
    counting what arrives in another. A context manager: start on enter, stop on exit.
    With auth_key, every registration is the extended, signed datagram (pgwfwd.auth)."""

    def __init__(
        self,
        vip: str,
        pgws: Sequence[tuple[str, int]] | Sequence[tuple[str, int, int]],
        reg_port: int = DEFAULT_REG_PORT,
        netns: str | None = None,
        refresh_interval: float = DEFAULT_REFRESH_INTERVAL,
        record_arrivals: bool = False,
        record_teids: bool = False,
        auth_key: bytes | None = None,
    ) -> None:
        self.vip = vip
        self.auth_key = auth_key
        self.reg_port = reg_port
        self.netns = netns
        self.refresh_interval = refresh_interval
        self.record_arrivals = record_arrivals
        self.record_teids = record_teids
        self.pgws: list[SimPgw] = []
        for spec in pgws:
            if len(spec) == 2:
                self.pgws.append(SimPgw(address=spec[0], weight=spec[1]))
            else:
                self.pgws.append(SimPgw(address=spec[0], port=spec[1], weight=spec[2]))

        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._selector: selectors.BaseSelector | None = None

    # Set-up and tear-down.

    def start(self) -> None:
        try:
            self._open_sockets()
        except BaseException:
            self._close_sockets()
            raise

        for pgw in self.pgws:
            self.register(pgw)

        self._stopping.clear()
        self._threads = [
            threading.Thread(target=self._receive_loop, name="sim-pgw-rx", daemon=True),
            threading.Thread(target=self._refresh_loop, name="sim-pgw-refresh", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _open_sockets(self) -> None:
        self._selector = selectors.DefaultSelector()
        with _maybe_netns(self.netns):
            for pgw in self.pgws:
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                pgw.sock = sock
                _set_receive_buffer(sock)
                sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
                _bind(sock, pgw.address, pgw.port, self.netns)
                sock.connect((self.vip, self.reg_port))
                sock.setblocking(False)
                pgw.port = sock.getsockname()[1]
                self._selector.register(sock, selectors.EVENT_READ, pgw)

    def stop(self, leave: bool = False) -> None:
        """Stop refreshing and receiving; with leave, each PGW sends weight 0 first."""
        if leave:
            for pgw in self.pgws:
                if pgw.sock is not None:
                    self.leave(pgw)

        self._stopping.set()
        for thread in self._threads:
            thread.join()
        self._threads = []
        self._close_sockets()

    def _close_sockets(self) -> None:
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        for pgw in self.pgws:
            if pgw.sock is not None:
                pgw.sock.close()
                pgw.sock = None

    def __enter__(self) -> PgwSimulator:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # Registration.

    def register(self, pgw: SimPgw, weight: int | None = None) -> None:
        """Send a registration now (with a new weight if given); refreshing resumes."""
        if weight is not None:
            pgw.weight = weight
        pgw.refreshing = pgw.weight != 0
        self._send_weight(pgw, pgw.weight)

    def stop_refreshing(self, pgw: SimPgw) -> None:
        pgw.refreshing = False

    def leave(self, pgw: SimPgw) -> None:
        """Weight 0: the distributor should drop this PGW at once. The PGW keeps its
        weight, which register() sends again."""
        pgw.refreshing = False
        self._send_weight(pgw, 0)

    def send_raw(self, pgw: SimPgw, data: bytes) -> None:
        """Send any bytes to VIP:reg-port from this PGW's socket (for bad registrations)."""
        assert pgw.sock is not None
        pgw.sock.send(data)

    def _send_weight(self, pgw: SimPgw, weight: int) -> None:
        assert pgw.sock is not None
        with self._lock:
            pgw.last_refresh = time.time()
            try:
                if self.auth_key is None:
                    pgw.sock.send(_WEIGHT.pack(weight))
                else:
                    pgw.sock.send(sign_registration(self.auth_key, weight))
            except ConnectionRefusedError:
                # An ICMP port unreachable from a moment when nothing listened; the
                # error is now cleared and the next refresh goes out.
                logger.debug("%s:%d: registration refused", pgw.address, pgw.port)
            except OSError as error:
                # The link is down or the route gone for a moment: a PGW keeps refreshing.
                logger.warning("%s:%d: registration not sent: %s", pgw.address, pgw.port,
                               error)

    def _refresh_loop(self) -> None:
        next_refresh = time.monotonic() + self.refresh_interval
        while not self._stopping.wait(max(0.0, next_refresh - time.monotonic())):
            next_refresh += self.refresh_interval
            for pgw in self.pgws:
                if pgw.refreshing and pgw.sock is not None:
                    self._send_weight(pgw, pgw.weight)

    # Receiving.

    def _receive_loop(self) -> None:
        assert self._selector is not None
        ancillary_size = socket.CMSG_SPACE(_TIMESPEC.size)
        while not self._stopping.is_set():
            for key, _events in self._selector.select(timeout=0.05):
                self._drain(key.fileobj, key.data, ancillary_size)  # type: ignore[arg-type]

    def _drain(self, sock: socket.socket, pgw: SimPgw, ancillary_size: int) -> None:
        while True:
            try:
                data, ancillary, _flags, _address = sock.recvmsg(65535, ancillary_size)
            except BlockingIOError:
                return
            except ConnectionRefusedError:
                continue

            arrival = time.time()
            for level, kind, value in ancillary:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    seconds, nanoseconds = _TIMESPEC.unpack_from(value)
                    arrival = seconds + nanoseconds / 1e9

            intact = datagram_intact(data)
            with self._lock:
                pgw.received += 1
                pgw.received_bytes += len(data)
                if not intact:
                    pgw.corrupt += 1
                if pgw.first_arrival is None:
                    pgw.first_arrival = arrival
                pgw.last_arrival = arrival
                if self.record_arrivals and intact:
                    pgw.arrivals.append((arrival, *datagram_seq(data)))
                elif self.record_arrivals:
                    pgw.foreign.append(data)
                if self.record_teids and intact:
                    pgw.teids[datagram_teid(data)] += 1

    # Results.

    def reset_counts(self) -> None:
        with self._lock:
            for pgw in self.pgws:
                pgw.reset_counts()

    @property
    def total_received(self) -> int:
        return sum(pgw.received for pgw in self.pgws)

    def wait_for(self, total: int, timeout: float = 10.0, idle: float = 1.0) -> int:
        """Wait until `total` datagrams arrived, nothing arrived for `idle` seconds, or
        the timeout passed; returns how many arrived."""
        deadline = time.monotonic() + timeout
        last_total, last_change = self.total_received, time.monotonic()
        while time.monotonic() < deadline:
            now_total = self.total_received
            if now_total >= total:
                break
            if now_total != last_total:
                last_total, last_change = now_total, time.monotonic()
            elif time.monotonic() - last_change > idle:
                break
            time.sleep(0.02)

        # Linger a little, so that duplicates, if any, are counted too.
        time.sleep(0.2)
        return self.total_received


def _set_receive_buffer(sock: socket.socket) -> None:
    # SO_RCVBUFFORCE passes rmem_max as root; as anyone else, take what SO_RCVBUF gives.
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER_BYTES)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER_BYTES)


@dataclass
class SendResult:
    sent: int
    failed: int
    elapsed: float

    @property
    def rate(self) -> float:
        return self.sent / self.elapsed if self.elapsed > 0 else 0.0


class SgwSimulator:
    """Sends G-PDUs to VIP:gtp-port from several source sockets, round-robin, paced."""

    def __init__(
        self,
        vip: str,
        sources: Sequence[tuple[str, int]],
        gtp_port: int = DEFAULT_GTP_PORT,
        netns: str | None = None,
        size: int = DEFAULT_DATAGRAM_SIZE,
    ) -> None:
        if not sources:
            raise ValueError("an SGW simulator needs at least one source")
        self.vip = vip
        self.gtp_port = gtp_port
        self.netns = netns
        self.builder = DatagramBuilder(size)
        self.source_addresses = list(sources)
        self._socks: list[socket.socket] = []
        self._next_seq = 0
        self._next_teid = 1

    @classmethod
    def with_sources(
        cls,
        vip: str,
        n_sources: int,
        addresses: Sequence[str] = SGW_ADDRESSES,
        **kwargs: object,
    ) -> SgwSimulator:
        """n_sources sockets over the given addresses (several ports per address when
        there are more sources than addresses), each on an ephemeral port."""
        sources = [(addresses[i % len(addresses)], 0) for i in range(n_sources)]
        return cls(vip, sources, **kwargs)  # type: ignore[arg-type]

    def open(self) -> None:
        with _maybe_netns(self.netns):
            for address, port in self.source_addresses:
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                self._socks.append(sock)
                _bind(sock, address, port, self.netns)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)

    def close(self) -> None:
        for sock in self._socks:
            sock.close()
        self._socks = []

    def __enter__(self) -> SgwSimulator:
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def sources(self) -> list[tuple[str, int]]:
        return [sock.getsockname() for sock in self._socks]

    def send_payload(self, data: bytes, source: int = 0) -> None:
        """Send one datagram of any content from one of the sources."""
        self._socks[source].sendto(data, (self.vip, self.gtp_port))

    def send(self, count: int, rate: float = 0.0,
             teids: Sequence[int] | None = None) -> SendResult:
        """Send count datagrams at rate per second (0: as fast as possible); sources take
        turns. The sequence number changes with every datagram, and so does the TEID:
        counting up, or, with teids, cycling through them from the first on each call."""
        if not self._socks:
            raise SimError(errno.ENOTCONN, "sgw: not open")
        if teids is not None and not teids:
            raise ValueError("teids: give at least one TEID, or None")
        n_teids = len(teids) if teids is not None else 0
        socks = self._socks
        n_socks = len(socks)
        destination = (self.vip, self.gtp_port)
        build = self.builder.build
        interval = 1.0 / rate if rate > 0 else 0.0
        sent = failed = 0
        start = time.perf_counter()

        for i in range(count):
            if interval:
                ahead = start + i * interval - time.perf_counter()
                if ahead > 0.001:
                    time.sleep(ahead)

            source = i % n_socks
            if teids is None:
                teid = self._next_teid
                self._next_teid = (self._next_teid + 1) & 0xFFFF_FFFF or 1
            else:
                teid = teids[i % n_teids]
            data = build(teid, source, self._next_seq)
            self._next_seq += 1
            try:
                socks[source].sendto(data, destination)
                sent += 1
            except OSError as exc:
                # ENOBUFS when the veth queue is full: count it, the caller sees it.
                failed += 1
                if failed == 1:
                    logger.warning("sgw: send to %s:%d failed: %s", *destination, exc)

        return SendResult(sent=sent, failed=failed, elapsed=time.perf_counter() - start)


# CLI.


def _parse_pgw(value: str) -> tuple[str, int, int]:
    parts = value.split(":")
    try:
        if len(parts) == 2:
            return parts[0], 0, int(parts[1])
        if len(parts) == 3:
            return parts[0], int(parts[1]), int(parts[2])
    except ValueError:
        pass
    raise click.BadParameter(f"{value}: expected ADDR:WEIGHT or ADDR:PORT:WEIGHT")


@click.group("sim")
def sim_group() -> None:
    """Simulated PGWs and SGWs that speak the wire contract."""


@sim_group.command("pgw")
@click.option("--vip", required=True, help="The distributor's address.")
@click.option(
    "--pgw", "pgw_specs", multiple=True, required=True, metavar="ADDR[:PORT]:WEIGHT",
    help="A PGW to simulate (repeatable); port 0 or none: an ephemeral port.",
)
@click.option("--reg-port", default=DEFAULT_REG_PORT, show_default=True)
@click.option("--interval", default=DEFAULT_REFRESH_INTERVAL, show_default=True,
              help="Seconds between refreshes.")
@click.option("--duration", type=float, default=None,
              help="Seconds to run (default: until Ctrl-C).")
@click.option("--netns", default=None, help=f"Create the sockets in this netns ({PEERS_NETNS}).")
@click.option("--leave/--no-leave", default=True, show_default=True,
              help="Send weight 0 on exit.")
@click.option("--auth-key-file", default=None, metavar="PATH",
              help="Sign every registration with the key in PATH (authenticated form).")
def sim_pgw(
    vip: str,
    pgw_specs: tuple[str, ...],
    reg_port: int,
    interval: float,
    duration: float | None,
    netns: str | None,
    leave: bool,
    auth_key_file: str | None,
) -> None:
    """Register PGWs, refresh them, and print what each received at the end."""
    specs = [_parse_pgw(spec) for spec in pgw_specs]
    try:
        auth_key = load_key(auth_key_file) if auth_key_file is not None else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--auth-key-file") from None
    sim = PgwSimulator(vip, specs, reg_port=reg_port, netns=netns, refresh_interval=interval,
                       auth_key=auth_key)
    try:
        sim.start()
    except (SimError, PgwfwdError, OSError) as exc:
        raise click.ClickException(str(exc)) from None

    try:
        if duration is None:
            while True:
                time.sleep(3600)
        time.sleep(duration)
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop(leave=leave)

    total = sim.total_received
    weight_sum = sum(pgw.weight for pgw in sim.pgws) or 1
    click.echo(f"{'pgw':<21} {'weight':>6} {'share':>7} {'received':>10} {'corrupt':>7}")
    for pgw in sim.pgws:
        share = pgw.received / total if total else 0.0
        click.echo(
            f"{pgw.address + ':' + str(pgw.port):<21} {pgw.weight:>6} {share:>7.2%} "
            f"{pgw.received:>10} {pgw.corrupt:>7}"
        )
    click.echo(f"total {total}, weights sum {weight_sum}")


@sim_group.command("sgw")
@click.option("--vip", required=True, help="The distributor's address.")
@click.option("--count", default=10_000, show_default=True, help="Datagrams to send.")
@click.option("--rate", default=10_000.0, show_default=True,
              help="Datagrams per second (0: as fast as possible).")
@click.option("--sources", default=10, show_default=True,
              help="Source sockets, spread over the source addresses.")
@click.option("--source-address", "source_addresses", multiple=True,
              help="Source address (repeatable; default: the lab's SGW addresses).")
@click.option("--gtp-port", default=DEFAULT_GTP_PORT, show_default=True)
@click.option("--size", default=DEFAULT_DATAGRAM_SIZE, show_default=True,
              help="UDP payload bytes per datagram, GTP-U header included.")
@click.option("--netns", default=None, help=f"Create the sockets in this netns ({PEERS_NETNS}).")
def sim_sgw(
    vip: str,
    count: int,
    rate: float,
    sources: int,
    source_addresses: tuple[str, ...],
    gtp_port: int,
    size: int,
    netns: str | None,
) -> None:
    """Send GTP-U G-PDUs to VIP:gtp-port from several sources at a paced rate."""
    addresses = source_addresses or SGW_ADDRESSES
    try:
        sgw = SgwSimulator.with_sources(
            vip, sources, addresses, gtp_port=gtp_port, netns=netns, size=size
        )
        with sgw:
            result = sgw.send(count, rate)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    except (SimError, PgwfwdError, OSError) as exc:
        raise click.ClickException(str(exc)) from None

    click.echo(
        f"sent {result.sent}, failed {result.failed}, in {result.elapsed:.2f} s "
        f"({result.rate:,.0f}/s) from {sources} sources"
    )

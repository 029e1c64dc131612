"""The distributor: the public class that runs pgwfwd on one interface.

Threads:
- one worker per receive queue, inside Queue.run() (C, GIL released): receive GTP-U, pick a
  PGW from the published table, rewrite, transmit;
- one control thread that owns the registry and the tables. It waits on a selector for
  registrations, neighbour events, datagrams that reached the kernel's GTP-U socket, a wake-up
  pipe, and the registry's next deadline (the select timeout), and republishes the tables
  after every change: join, leave, weight change, expiry, MAC change, policy change;
- one thread answering the control socket (`pgwfwd status`, `pgwfwd policy`).

The published table is that of the current policy (tables.POLICIES): wrr, a smooth weighted
round robin rebuilt at each publication, or teid, a consistent hash of the TEID whose
TeidTable the control thread keeps in step with the forwardable PGWs under either policy, so
that a switch is one publication like any other.

The registry and the neighbour table are only changed by the control thread, under
self._lock so that the views (pgws(), counters(), the control socket) read them consistently.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import json
import logging
import os
import selectors
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any

import numpy as np

from pgwfwd import tables
from pgwfwd.errors import (AlreadyRunningError, ConfigError, NotRunningError, PgwfwdError,
                           RuntimeFailure)
from pgwfwd import auth
from pgwfwd.registry import MAX_PGWS, Event, EventKind, Refused, Registry, subnet_broadcast
from pgwfwd.slowpath import Drop, Forward, Reply, SlowPath

log = logging.getLogger(__name__)

IFF_LOOPBACK = 0x8  # from <net/if.h>
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SO_MEMINFO = 55                    # from <asm-generic/socket.h>: u32[SK_MEMINFO_VARS]
SK_MEMINFO_VARS, SK_MEMINFO_DROPS = 9, 8
IP_RECVTTL = getattr(socket, "IP_RECVTTL", 12)               # from <linux/in.h>
IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
IP_PMTUDISC_DONT = getattr(socket, "IP_PMTUDISC_DONT", 0)
TTL_CMSG_SPACE = socket.CMSG_SPACE(4)
#: Receive buffer of the registration and GTP-U sockets (bytes).
RECEIVE_BUFFER = 4 << 20

RUN_DIR = "/run/pgwfwd"
MAX_QUEUES = 64
#: Datagrams read from one socket per wake-up, so that expiry is never held up for long.
DRAIN_BATCH = 256
#: How long stop() waits for a worker to leave the data plane.
JOIN_TIMEOUT = 5.0
#: A refused registration is logged at most once per this many seconds per reason.
REFUSAL_LOG_INTERVAL = 10.0
CONTROL_TIMEOUT = 2.0


@dataclass(frozen=True)
class PgwView:
    """One registered PGW as seen by an operator."""

    addr: str
    port: int
    weight: int
    share: float           # wrr: of the datagrams; teid: of the hash slots; 0 without a MAC
    packets: int           # forwarded to it since it joined
    bytes: int
    age: float             # seconds since its last registration
    mac: str | None        # its next hop's MAC, None while unresolved


@dataclass(frozen=True)
class InterfaceInfo:
    name: str
    index: int
    mac: bytes
    ipv4: list[tuple[str, int]]   # (address, prefix length), in the kernel's order
    rx_queues: int
    loopback: bool


def _check_policy(name: str) -> None:
    try:
        tables.check_policy(name)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def interface_info(iface: str) -> InterfaceInfo:
    """What pgwfwd needs to know about iface; ConfigError when it does not exist."""
    from pyroute2 import IPRoute

    try:
        index = socket.if_nametoindex(iface)
    except OSError:
        raise ConfigError(f"interface {iface} does not exist") from None

    with IPRoute() as ipr:
        link = ipr.link("get", index=index)[0]
        addresses = ipr.addr("dump", index=index, family=socket.AF_INET)
        ipv4 = [(str(a.get("IFA_ADDRESS") or a.get("IFA_LOCAL")), int(a["prefixlen"]))
                for a in addresses if a["index"] == index]

    lladdr = link.get("IFLA_ADDRESS") or ""
    mac = bytes.fromhex(lladdr.replace(":", ""))
    if len(mac) != 6:
        raise ConfigError(f"interface {iface} is not an Ethernet interface")
    return InterfaceInfo(iface, index, mac, ipv4, rx_queue_count(iface),
                         bool(link["flags"] & IFF_LOOPBACK))


def rx_queue_count(iface: str) -> int:
    """The receive queues in use (real_num_rx_queues, as /sys lists them).

    Netlink's IFLA_NUM_RX_QUEUES is the allocated count, which can be larger (a veth
    allocates one per CPU and uses one): binding to an unused queue fails with EINVAL.
    """
    try:
        names = os.listdir(f"/sys/class/net/{iface}/queues")
    except FileNotFoundError:
        # XXX: a process that entered this namespace with setns() sees the /sys of its old
        # one; one queue is then the safe guess.
        log.warning("%s: /sys does not show the interface, using one queue", iface)
        return 1
    return max(1, sum(1 for name in names if name.startswith("rx-")))


def netns_id() -> int:
    """Identifies this network namespace: `ip netns exec` gives each its own inode."""
    return os.stat("/proc/self/ns/net").st_ino


def control_socket_path(iface: str) -> str:
    return os.path.join(RUN_DIR, f"{netns_id()}-{iface}.sock")


def control_socket_paths() -> list[str]:
    """The control sockets of pgwfwd instances of this network namespace."""
    prefix = f"{netns_id()}-"
    try:
        names = sorted(os.listdir(RUN_DIR))
    except FileNotFoundError:
        return []
    return [os.path.join(RUN_DIR, name) for name in names
            if name.startswith(prefix) and name.endswith(".sock")]


def query(path: str, request: dict[str, Any], timeout: float = CONTROL_TIMEOUT) -> Any:
    """Sends one JSON request to a control socket and returns the decoded answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as error:
            raise NotRunningError(error.errno, f"nothing answers on {path}") from None
        sock.sendall(json.dumps(request).encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)

        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return json.loads(b"".join(chunks))


def _socket_drops(sock: socket.socket) -> int:
    """Datagrams the kernel dropped on sock, mostly for want of room in its buffer."""
    try:
        meminfo = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 4 * SK_MEMINFO_VARS)
    except OSError:   # closed meanwhile
        return 0
    return int.from_bytes(meminfo[4 * SK_MEMINFO_DROPS:4 * SK_MEMINFO_DROPS + 4],
                          sys.byteorder)


class _RateLimitedLog:
    """At most one log line per key per interval; says how many were left out."""

    def __init__(self, interval: float, clock: Callable[[], float]) -> None:
        self.interval = interval
        self.clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, key: str, message: str, *args: object) -> None:
        now = self.clock()
        if now - self._last.get(key, -self.interval) < self.interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return

        suppressed = self._suppressed.pop(key, 0)
        self._last[key] = now
        if suppressed:
            message += " (%d more since the last report)"
            args = (*args, suppressed)
        log.warning(message, *args)


class Distributor:
    """Distributes GTP-U arriving at vip:gtp_port on iface among registered PGWs.

    Checks its settings when built (ConfigError, also a ValueError), starts with start() or
    `with`, stops with stop(). vip defaults to the interface's first IPv4 address; queues to
    the interface's receive queue count, at most one per CPU. policy is the selection
    policy, "wrr" or "teid"; set_policy() changes it at any time.

    Registration security: allow lists the IPv4 networks (CIDR strings) whose addresses may
    register, by default the subnets of the interface's addresses; max_pgws caps the PGW
    table; reg_rate and reg_burst set each source address's token bucket (reg_rate 0: no
    limit); auth_key (bytes) or auth_key_file (a path) turns on authenticated registration,
    after which only extended datagrams register (pgwfwd.auth).
    """

    def __init__(self, iface: str, vip: str | None = None, gtp_port: int = 2152,
                 reg_port: int = 3000, expiry: float = 3.0, queues: int | None = None,
                 object_path: str | None = None,
                 clock: Callable[[], float] = time.monotonic, policy: str = "wrr",
                 allow: Iterable[str] | None = None, max_pgws: int = MAX_PGWS,
                 reg_rate: float = auth.DEFAULT_RATE, reg_burst: int = auth.DEFAULT_BURST,
                 auth_key: bytes | None = None, auth_key_file: str | None = None) -> None:
        _check_policy(policy)
        for name, port in (("gtp port", gtp_port), ("registration port", reg_port)):
            if not 0 < port < 65536:
                raise ConfigError(f"{name} must be 1..65535, not {port}")
        if gtp_port == reg_port:
            raise ConfigError("the gtp port and the registration port must differ")
        if not expiry > 0:
            raise ConfigError(f"expiry must be positive, not {expiry}")

        self.info = interface_info(iface)
        self.iface = iface
        self.vip, prefixlen = self._choose_vip(vip)
        self.gtp_port = gtp_port
        self.reg_port = reg_port
        self.expiry = float(expiry)
        self.n_queues = self._choose_queue_count(queues)
        self.object_path = object_path
        self.clock = clock
        self.control_path = control_socket_path(iface)

        if auth_key is not None and auth_key_file is not None:
            raise ConfigError("give either auth_key or auth_key_file, not both")
        if auth_key_file is not None:
            auth_key = auth.load_key(auth_key_file)
        if reg_rate < 0:
            raise ConfigError(f"the registration rate must not be negative, not {reg_rate}")
        connected = [ipaddress.IPv4Interface(f"{addr}/{prefixlen}").network
                     for addr, prefixlen in self.info.ipv4]
        self.allow = auth.AllowList(connected if allow is None else allow)
        self.reg_rate = float(reg_rate)
        self.reg_burst = reg_burst
        self.authenticated = auth_key is not None
        self.registry = Registry(
            iface, expiry, clock, subnet_broadcast(self.vip, prefixlen), max_pgws=max_pgws,
            allow=self.allow,
            rate_limiter=auth.RateLimiter(reg_rate, reg_burst) if reg_rate > 0 else None,
            authenticator=auth.Authenticator(auth_key) if auth_key is not None else None)
        self._lock = threading.RLock()
        self._policy = policy
        # set_policy() calls, and the last of them that a publication carried out.
        self._policy_requests = 0
        self._policy_published = 0
        self._published = threading.Condition(self._lock)
        self._teid = tables.TeidTable()
        self._lifecycle = threading.Lock()
        self._started = False
        self._stopped = False
        self._stopping = threading.Event()
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._refusal_log = _RateLimitedLog(REFUSAL_LOG_INTERVAL, clock)

        self._xdp: Any = None
        self._shared: Any = None
        self._queues: list[Any] = []
        self._workers: list[threading.Thread] = []
        self._control: threading.Thread | None = None
        self._neighbours: Any = None
        self._reg_sock: socket.socket | None = None
        # A socket per registered PGW, connected to it: see _open_pgw_socket().
        self._pgw_socks: dict[tuple[str, int], socket.socket] = {}
        self._selector: selectors.BaseSelector | None = None
        self._closed_socket_drops = 0   # registrations the kernel dropped on closed sockets
        self._gtp_sock: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._server: socketserver.ThreadingUnixStreamServer | None = None
        self._server_thread: threading.Thread | None = None

        self._dirty = False
        self._generation = 0
        self._shares = np.zeros(tables.MAX_PGWS)
        self._pgw_array = tables.empty_pgw_array()
        self._baseline = np.zeros((2, tables.MAX_PGWS), dtype=np.uint64)
        self._final_counters: tuple[list[dict[str, Any]], dict[str, int]] | None = None
        self._slowpath = SlowPath()
        self._started_at = 0.0

    # Life cycle

    def start(self) -> None:
        """Attaches to the interface and starts forwarding; raises PgwfwdError on failure."""
        with self._lifecycle:
            if self._started:
                raise RuntimeFailure(errno.EALREADY, f"{self.iface}: already started")
            self._started = True

        try:
            self._claim_control_socket()
            self._open_sockets()
            self._start_data_plane()
            self._start_threads()
        except BaseException:
            self._teardown()
            self._stopped = True
            self._done.set()
            raise

        self._started_at = self.clock()
        log.info("%s: forwarding GTP-U to %s:%d on %d queue%s, policy %s", self.iface,
                 self.vip, self.gtp_port, self.n_queues, "" if self.n_queues == 1 else "s",
                 self._policy)
        if self.n_queues < self.info.rx_queues:
            # The XDP program passes GTP-U on an unserved queue to the kernel (no_socket).
            log.warning("%s: serving %d of %d receive queues: GTP-U that arrives on the "
                        "others is not forwarded (counted as xdp no_socket); match the NIC's "
                        "channels to --queues (ethtool -L)", self.iface, self.n_queues,
                        self.info.rx_queues)

    def stop(self) -> None:
        """Stops forwarding, detaches and frees everything; safe to call more than once."""
        with self._lifecycle:
            if self._stopped or not self._started:
                self._stopped = True
                return
            self._stopped = True

        self._stopping.set()
        self._wake()
        self._teardown()
        self._done.set()
        log.info("%s: stopped", self.iface)

    def wait(self, timeout: float | None = None) -> bool:
        """Waits until the distributor stopped or failed; True then, False on timeout."""
        return self._done.wait(timeout)

    @property
    def error(self) -> BaseException | None:
        """Why the distributor failed while running (a worker or the control thread)."""
        return self._error

    @property
    def running(self) -> bool:
        return self._started and not self._done.is_set()

    @property
    def policy(self) -> str:
        """The selection policy: "wrr" or "teid"."""
        return self._policy

    def set_policy(self, name: str, timeout: float = CONTROL_TIMEOUT) -> None:
        """Switches the selection policy ("wrr" or "teid"; ConfigError for another name).

        While running, returns once the data plane uses it. The switch is one table
        publication: each queue moves from the old table to the new one between two
        batches, so no datagram is lost.
        """
        _check_policy(name)
        with self._lock:
            if name != self._policy:
                log.info("%s: policy %s -> %s", self.iface, self._policy, name)
                self._policy = name
                self._policy_requests += 1
                self._dirty = True
            # The same policy again waits for an earlier switch to it, if one is pending.
            request = self._policy_requests
            if not self.running:
                return
        self._wake()

        with self._published:
            done = self._published.wait_for(
                lambda: (self._policy_published >= request or self._stopping.is_set()
                         or self._done.is_set()), timeout)
        if not done:
            raise RuntimeFailure(errno.ETIMEDOUT,
                                 f"{self.iface}: the {name} table was not published in time")

    def __enter__(self) -> Distributor:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    # Views

    def pgws(self) -> list[PgwView]:
        """The registered PGWs, by address and port."""
        packets, nbytes = self._pgw_counters()
        now = self.clock()
        with self._lock:
            views = []
            for entry in self.registry:
                mac = self._neighbours.mac(entry.key) if self._neighbours else None
                i = entry.index
                views.append(PgwView(
                    entry.addr, entry.port, entry.weight, float(self._shares[i]),
                    int(packets[i] - self._baseline[0, i]), int(nbytes[i] - self._baseline[1, i]),
                    now - entry.refreshed, mac.hex(":") if mac else None))
        return sorted(views, key=lambda view: (ipaddress.IPv4Address(view.addr), view.port))

    def counters(self) -> dict[str, Any]:
        """Counters: totals over the queues at the top, then per queue under "queues".

        After stop() they are the last values the data plane counted.
        """
        queues, xdp = self._final_counters or self._data_plane_counters()

        counters: dict[str, Any] = {
            name: sum(q[name] for q in queues)
            for name in ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "echo_replies",
                         "not_gtpu")
        }
        drop_names = sorted({name for q in queues for name in q["drops"]})
        counters["drops"] = {name: sum(q["drops"].get(name, 0) for q in queues)
                             for name in drop_names}

        with self._lock:
            counters["registration"] = dict(self.registry.counters)
            counters["registration"]["refused_socket_full"] = self._registration_socket_drops()
            counters["gtp_slowpath"] = self._slowpath.received
            counters["slowpath"] = self._slowpath.counters()
        counters["xdp"] = xdp
        counters["queues"] = queues
        return counters

    def _data_plane_counters(self) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """Per-queue counters and the XDP program's, read live from the data plane."""
        queues = []
        for queue_id, queue in enumerate(self._queues):
            stats = dict(queue.stats())
            stats["queue"] = queue_id
            stats["frames"] = dict(queue.frames())
            # The AF_XDP socket's own drops (RX ring full, fill ring empty, ...): what the
            # kernel could not hand to the loop never shows in the loop's counters.
            stats["kernel"] = dict(queue.kernel_stats())
            queues.append(stats)
        return queues, dict(self._xdp.counters()) if self._xdp else {}

    def _keep_final_counters(self) -> None:
        # The counters live in the queues and the XDP maps, which stop() frees.
        self._final_counters = self._data_plane_counters()

    def status(self) -> dict[str, Any]:
        """Everything `pgwfwd status` shows, as JSON-ready values."""
        return {
            "iface": self.iface,
            "vip": self.vip,
            "gtp_port": self.gtp_port,
            "reg_port": self.reg_port,
            "expiry": self.expiry,
            "queues": self.n_queues,
            "policy": self._policy,
            "pid": os.getpid(),
            "uptime": self.clock() - self._started_at if self._started_at else 0.0,
            "generation": self._generation,
            "registration": {"allow": [str(n) for n in self.allow.networks],
                             "max_pgws": self.registry.max_pgws, "rate": self.reg_rate,
                             "burst": self.reg_burst, "authenticated": self.authenticated},
            "pgws": [asdict(view) for view in self.pgws()],
            "counters": self.counters(),
        }

    # Set-up

    def _choose_vip(self, vip: str | None) -> tuple[str, int]:
        if not self.info.ipv4:
            raise ConfigError(f"interface {self.iface} has no IPv4 address")
        if vip is None:
            return self.info.ipv4[0]

        try:
            address = str(ipaddress.IPv4Address(vip))
        except ValueError:
            raise ConfigError(f"{vip} is not an IPv4 address") from None
        for addr, prefixlen in self.info.ipv4:
            if addr == address:
                return addr, prefixlen
        raise ConfigError(f"{address} is not an address of interface {self.iface}")

    def _choose_queue_count(self, queues: int | None) -> int:
        available = min(self.info.rx_queues, MAX_QUEUES)
        if queues is None:
            return max(1, min(available, os.cpu_count() or 1))
        if not 1 <= queues <= available:
            raise ConfigError(f"interface {self.iface} has {self.info.rx_queues} receive "
                              f"queues, cannot use {queues}")
        return queues

    def _claim_control_socket(self) -> None:
        path = self.control_path
        os.makedirs(RUN_DIR, mode=0o755, exist_ok=True)
        if os.path.exists(path):
            try:
                query(path, {"cmd": "ping"}, timeout=0.5)
            except (NotRunningError, OSError, ValueError):
                os.unlink(path)   # left behind by a run that was killed
            else:
                raise AlreadyRunningError(errno.EADDRINUSE,
                                          f"pgwfwd already runs on {self.iface}")

        distributor = self

        class Handler(socketserver.StreamRequestHandler):
            timeout = CONTROL_TIMEOUT

            def handle(self) -> None:
                distributor._answer(self.rfile, self.wfile)

        server = socketserver.ThreadingUnixStreamServer(path, Handler, bind_and_activate=False)
        server.daemon_threads = True
        try:
            server.server_bind()
            os.chmod(path, 0o600)
            server.server_activate()
        except OSError as error:
            server.server_close()
            raise RuntimeFailure(error.errno, f"cannot listen on {path}: {error}") from None
        self._server = server

    def _answer(self, rfile: Any, wfile: Any) -> None:
        try:
            request = json.loads(rfile.readline(4096) or b"{}")
            command = request.get("cmd") if isinstance(request, dict) else None
            if command == "status":
                answer: dict[str, Any] = self.status()
            elif command == "ping":
                answer = {"ok": True}
            elif command == "policy":
                answer = self._answer_policy(request.get("policy"))
            else:
                answer = {"error": f"unknown command {command!r}"}
        except (ValueError, UnicodeDecodeError) as error:
            answer = {"error": f"bad request: {error}"}
        wfile.write(json.dumps(answer).encode() + b"\n")

    def _answer_policy(self, name: object) -> dict[str, Any]:
        if not isinstance(name, str):
            return {"error": f"policy must be one of {', '.join(tables.POLICIES)}"}
        try:
            self.set_policy(name)
        except PgwfwdError as error:
            return {"error": str(error)}
        return {"ok": True, "policy": self.policy, "iface": self.iface}

    def _open_sockets(self) -> None:
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._reg_sock = self._bind_udp(self.reg_port, "registration", reuseport=True)
        # The slow path forwards from this socket, so that its datagrams leave from VIP:3000;
        # one larger than the MTU is fragmented here, never refused.
        self._reg_sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)
        # XDP hands IPv4 fragments of GTP-U to the kernel; this socket takes what the kernel
        # reassembled, with its TTL, for the slow path to forward.
        self._gtp_sock = self._bind_udp(self.gtp_port, "gtp-u")
        self._gtp_sock.setsockopt(socket.IPPROTO_IP, IP_RECVTTL, 1)

    def _bind_udp(self, port: int, purpose: str, reuseport: bool = False) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            if reuseport:   # the PGWs' own sockets share the port (_open_pgw_socket)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self.vip, port))
        except OSError as error:
            sock.close()
            raise RuntimeFailure(error.errno, f"{self.iface}: cannot bind the {purpose} port "
                                 f"{self.vip}:{port}: {error.strerror}") from None
        sock.setblocking(False)
        # Bursts of registrations (every PGW refreshing in the same second, or a storm)
        # must wait in the socket rather than overflow it; root may exceed rmem_max.
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        return sock

    def _start_data_plane(self) -> None:
        from pgwfwd import native
        from pgwfwd.neighbours import NeighbourTable

        # Loopback's address is 6 zero bytes, but no PGW can register over it (loopback
        # sources are refused), so an instance there could never forward anything.
        if self.info.loopback:
            raise ConfigError(f"interface {self.iface} is loopback: no PGW can register there")
        self._neighbours = NeighbourTable(self.iface, self.info.index, self.clock)
        self._xdp = native.XdpProgram(self.info.index, self.vip, self.gtp_port, self.object_path)
        self._shared = native.SharedState(self.vip, self.gtp_port, self.reg_port, self.info.mac)
        self._publish()
        for queue_id in range(self.n_queues):
            self._queues.append(native.Queue(self.iface, queue_id, self._xdp, self._shared))

    def _start_threads(self) -> None:
        for queue_id, queue in enumerate(self._queues):
            worker = threading.Thread(target=self._run_queue, args=(queue_id, queue),
                                      name=f"pgwfwd-{self.iface}-q{queue_id}", daemon=True)
            self._workers.append(worker)
            worker.start()

        self._control = threading.Thread(target=self._run_control,
                                         name=f"pgwfwd-{self.iface}-control", daemon=True)
        self._control.start()

        assert self._server is not None
        self._server_thread = threading.Thread(target=self._server.serve_forever,
                                               kwargs={"poll_interval": 0.2},
                                               name=f"pgwfwd-{self.iface}-status", daemon=True)
        self._server_thread.start()

    # Tear-down: each step runs even when an earlier one failed.

    def _teardown(self) -> None:
        self._stopping.set()
        self._wake()
        steps: list[tuple[str, Callable[[], None]]] = [
            ("control socket", self._close_control_socket),
            ("control thread", self._join_control),
            ("workers", self._stop_workers),
            ("final counters", self._keep_final_counters),
            ("xdp program", self._detach_xdp),
            ("queues", self._close_queues),
            ("sockets", self._close_sockets),
        ]
        for what, step in steps:
            try:
                step()
            except Exception as error:   # keep freeing the rest
                log.error("%s: freeing the %s failed: %s", self.iface, what, error)

        # The per-PGW counters went with the queues: a view after stop shows no PGW rather
        # than counts against vanished totals.
        with self._lock:
            self.registry.remove_all()
            self._shares = np.zeros(tables.MAX_PGWS)
            self._teid = tables.TeidTable()
            self._published.notify_all()

    def _close_control_socket(self) -> None:
        if self._server is None:
            return
        if self._server_thread is not None:
            self._server.shutdown()
            self._server_thread.join()
        self._server.server_close()
        self._server = None
        try:
            os.unlink(self.control_path)
        except FileNotFoundError:
            pass

    def _join_control(self) -> None:
        if self._control is not None:
            self._control.join()
            self._control = None

    def _stop_workers(self) -> None:
        for queue in self._queues:
            queue.stop()
        stuck = []
        for worker in self._workers:
            worker.join(JOIN_TIMEOUT)
            if worker.is_alive():
                stuck.append(worker.name)
        if stuck:
            # Freeing a queue under a running worker would crash it: leak instead.
            self._queues = []
            raise RuntimeFailure(errno.ETIMEDOUT, f"workers did not stop: {', '.join(stuck)}")
        self._workers = []

    def _detach_xdp(self) -> None:
        if self._xdp is not None:
            self._xdp.close()
            self._xdp = None

    def _close_queues(self) -> None:
        queues, self._queues = self._queues, []
        for queue in queues:
            queue.close()

    def _close_sockets(self) -> None:
        with self._lock:
            self._closed_socket_drops = self._registration_socket_drops()
            pgw_socks, self._pgw_socks = self._pgw_socks, {}
        for sock in (*pgw_socks.values(), self._reg_sock, self._gtp_sock, self._wake_r,
                     self._wake_w):
            if sock is not None:
                sock.close()
        self._reg_sock = self._gtp_sock = self._wake_r = self._wake_w = None
        if self._neighbours is not None:
            self._neighbours.close()
            self._neighbours = None

    # Threads

    def _run_queue(self, queue_id: int, queue: Any) -> None:
        try:
            queue.run()
        except Exception as error:
            if not self._stopping.is_set():
                log.error("%s: queue %d failed: %s", self.iface, queue_id, error)
                self._fail(error)
            return
        if not self._stopping.is_set():
            log.error("%s: queue %d stopped unasked", self.iface, queue_id)
            self._fail(RuntimeFailure(errno.EIO, f"queue {queue_id} stopped unasked"))

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._done.set()
        with self._published:
            self._published.notify_all()   # a set_policy() waiting for the control thread

    def _wake(self) -> None:
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"\0")
            except OSError:
                pass   # full: the control thread has a wake-up pending anyway

    def _run_control(self) -> None:
        assert self._reg_sock and self._gtp_sock and self._wake_r
        selector = selectors.DefaultSelector()
        selector.register(self._reg_sock, selectors.EVENT_READ, self._read_registrations)
        selector.register(self._gtp_sock, selectors.EVENT_READ, self._read_slowpath)
        selector.register(self._neighbours, selectors.EVENT_READ, self._read_neighbours)
        selector.register(self._wake_r, selectors.EVENT_READ, self._read_wake)
        with self._lock:
            self._selector = selector

        try:
            while not self._stopping.is_set():
                for key, _ in selector.select(self._time_to_next_deadline()):
                    key.data()
                self._expire()
                if self._dirty:
                    self._publish()
        except RuntimeFailure as error:   # a failure of the system, said in one line
            log.error("%s: %s", self.iface, error.strerror or error)
            self._fail(error)
        except Exception as error:
            log.exception("%s: control thread failed", self.iface)
            self._fail(error)
        finally:
            with self._lock:
                self._selector = None
            selector.close()

    def _time_to_next_deadline(self) -> float | None:
        if self._dirty:
            return 0.01   # the last publication failed: retry soon
        with self._lock:
            deadline = self.registry.next_deadline()
        # The selector rounds up to whole milliseconds, so the wake-up is at or after the
        # deadline and expire() below finds the PGW due.
        return None if deadline is None else max(0.0, deadline - self.clock())

    def _read_wake(self) -> None:
        assert self._wake_r is not None
        try:
            self._wake_r.recv(4096)
        except BlockingIOError:
            pass

    def _read_registrations(self, sock: socket.socket | None = None) -> None:
        """Handles the datagrams waiting on the registration socket, or on a PGW's own."""
        sock = sock or self._reg_sock
        assert sock is not None
        for _ in range(DRAIN_BATCH):
            try:
                data, source = sock.recvfrom(64)
            except BlockingIOError:
                return
            except OSError as error:
                # An ICMP error for what the slow path sent to this PGW: reading reports
                # and clears it.
                log.debug("%s: registration socket: %s", self.iface, error)
                continue
            with self._lock:
                self._apply(self.registry.handle_datagram(data, source))

    def _open_pgw_socket(self, key: tuple[str, int]) -> None:
        """Gives a PGW that joined a socket of its own, bound to VIP:reg-port and connected
        to the PGW: the kernel then queues its registrations there, apart from everyone
        else's, and a registration storm that overflows the shared socket cannot make its
        refreshes miss. The control thread reads them all."""
        if self._selector is None or key in self._pgw_socks:
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self.vip, self.reg_port))
            sock.connect(key)
            sock.setblocking(False)
            self._selector.register(sock, selectors.EVENT_READ,
                                    functools.partial(self._read_registrations, sock))
        except OSError as error:   # out of descriptors: the shared socket serves it
            sock.close()
            self._refusal_log.warning("pgw_socket", "%s: pgw %s:%d shares the registration "
                                      "socket: %s", self.iface, *key, error)
            return
        self._pgw_socks[key] = sock

    def _close_pgw_socket(self, key: tuple[str, int]) -> None:
        sock = self._pgw_socks.pop(key, None)
        if sock is None:
            return
        self._closed_socket_drops += _socket_drops(sock)
        if self._selector is not None:
            self._selector.unregister(sock)
        sock.close()

    def _apply(self, result: Event | Refused) -> None:
        if isinstance(result, Refused):
            self._refusal_log.warning(result.reason.value, "%s: ignored registration from "
                                      "%s:%d: %s", self.iface, result.addr, result.port,
                                      result.reason.value.replace("_", " "))
            return

        key = result.entry.key
        if result.kind is EventKind.JOIN:
            packets, nbytes = self._pgw_counters()
            self._baseline[0, result.entry.index] = packets[result.entry.index]
            self._baseline[1, result.entry.index] = nbytes[result.entry.index]
            self._neighbours.watch(key)
            self._open_pgw_socket(key)
            self._dirty = True
        elif result.kind is EventKind.LEAVE:
            self._neighbours.unwatch(key)
            self._close_pgw_socket(key)
            self._dirty = True
        elif result.kind is EventKind.WEIGHT_CHANGE:
            self._neighbours.refreshed(key)
            self._dirty = True
        elif self._neighbours.refreshed(key):
            self._dirty = True

    def _registration_socket_drops(self) -> int:
        """Registrations the kernel dropped because a registration socket was full (a
        storm): they never reached the registry. Called under self._lock."""
        socks = [self._reg_sock, *self._pgw_socks.values()]
        return self._closed_socket_drops + sum(_socket_drops(s) for s in socks if s)

    def _read_slowpath(self) -> None:
        """Forwards what reached the kernel's GTP-U socket (reassembled fragments above
        all) to the PGW the published table picks, from the registration socket."""
        assert self._gtp_sock is not None and self._reg_sock is not None
        for _ in range(DRAIN_BATCH):
            try:
                data, ancillary, _flags, source = self._gtp_sock.recvmsg(65535, TTL_CMSG_SPACE)
            except BlockingIOError:
                return
            ttl = None
            for level, kind, value in ancillary:
                if level == socket.IPPROTO_IP and kind == socket.IP_TTL and len(value) >= 4:
                    ttl = int.from_bytes(value[:4], sys.byteorder)

            with self._lock:
                verdict = self._slowpath.decide(data, source, ttl)
            try:
                if isinstance(verdict, Forward):
                    ttl_option = (socket.IPPROTO_IP, socket.IP_TTL,
                                  verdict.ttl.to_bytes(4, sys.byteorder))
                    self._reg_sock.sendmsg([data], [ttl_option], 0, verdict.destination)
                elif isinstance(verdict, Reply):
                    self._gtp_sock.sendto(verdict.data, source)
            except OSError as error:   # a full socket buffer, no route: a counted drop
                target = verdict.destination if isinstance(verdict, Forward) else source
                self._refusal_log.warning("slowpath_send", "%s: slow path: cannot send to "
                                          "%s:%d: %s", self.iface, *target, error)
                verdict = Drop("send_failed")
            with self._lock:
                self._slowpath.count(verdict, len(data))

    def _read_neighbours(self) -> None:
        with self._lock:
            if self._neighbours.handle_events():
                self._dirty = True

    def _expire(self) -> None:
        with self._lock:
            for event in self.registry.expire(self.clock()):
                self._neighbours.unwatch(event.entry.key)
                self._close_pgw_socket(event.entry.key)
                self._dirty = True

    def _publish(self) -> None:
        """Builds the table of the current policy from the forwardable PGWs and hands it to
        the data plane; the teid table follows every change under either policy."""
        with self._lock:
            forwardable = []
            for entry in self.registry:
                mac = self._neighbours.mac(entry.key) if self._neighbours else None
                if mac is not None:
                    forwardable.append((entry, mac))
            tables.fill_pgw_array(((e.index, e.addr, e.port, mac) for e, mac in forwardable),
                                  out=self._pgw_array)
            policy = self._policy
            request = self._policy_requests
            self._dirty = False

        # Only this thread (or start(), before it runs) touches the teid table. Under wrr
        # it is brought up to date after the publication, off the path of an expiry.
        members = {entry.key: (entry.index, entry.weight) for entry, _ in forwardable}
        fine_slots = None
        if policy == "wrr":
            wrr = tables.build_wrr((entry.index, entry.weight) for entry, _ in forwardable)
            slots, fine_slots, shares = wrr.slots, wrr.fine_slots, wrr.shares()
        else:
            self._teid.sync(members)
            slots, shares = self._teid.slots(), self._teid.shares()

        try:
            self._generation = self._shared.publish(self._pgw_array, slots, self.n_queues,
                                                    policy=policy, fine_slots=fine_slots)
        except OSError as error:
            log.warning("%s: publishing the table failed, retrying: %s", self.iface, error)
            with self._lock:
                self._dirty = True
            return

        with self._lock:
            self._shares = shares
            self._policy_published = request
            self._slowpath.published(policy, self._pgw_array, slots, fine_slots)
            self._published.notify_all()
        log.debug("%s: table %d (%s): %d pgws in %d slots, %d fine slots", self.iface,
                  self._generation, policy, len(forwardable), slots.size,
                  0 if fine_slots is None else fine_slots.size)
        if policy == "wrr":
            self._teid.sync(members)   # ready for a switch to teid

    def _pgw_counters(self) -> tuple[np.ndarray, np.ndarray]:
        packets = np.zeros(tables.MAX_PGWS, dtype=np.uint64)
        nbytes = np.zeros(tables.MAX_PGWS, dtype=np.uint64)
        for queue in list(self._queues):
            packets += queue.pgw_packets
            nbytes += queue.pgw_bytes
        packets += self._slowpath.pgw_packets
        nbytes += self._slowpath.pgw_bytes
        return packets, nbytes

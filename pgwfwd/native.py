"""Thin wrappers over the C data plane (csrc/, built by cffi as pgwfwd._native).

Each wrapper checks the C return code and raises NativeError, keeps the C
objects alive as long as Python holds them, and frees them exactly once.
Tables and counters are numpy views onto the very memory C reads and
writes, so publishing a table or reading a counter copies nothing through
the binding.
"""

from __future__ import annotations

import errno
import logging
import ipaddress
import os
import socket
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from pgwfwd._native import ffi, lib
from pgwfwd.errors import PgwfwdError
from pgwfwd.tables import MAX_PGWS, MAX_SLOTS, PGW_DTYPE, SLOT_FINE
from pgwfwd.tables import POLICIES as POLICY_NAMES

MAX_QUEUES: int = lib.PGWFWD_MAX_QUEUES
#: Policy numbers as C knows them, by the names the CLI and API use.
POLICIES: dict[str, int] = {"wrr": lib.PGWFWD_POLICY_WRR, "teid": lib.PGWFWD_POLICY_TEID}

DROP_REASONS: tuple[str, ...] = tuple(
    ffi.string(lib.pgwfwd_drop_name(reason)).decode()
    for reason in range(lib.PGWFWD_DROP_MAX)
)
XDP_COUNTER_NAMES: tuple[str, ...] = ("redirected", "passed", "fragments", "no_socket",
                                      "too_big")
#: The longest frame the AF_XDP sockets take with the default UMEM frame size; the XDP
#: program passes longer GTP-U frames to the kernel (counter xdp.too_big).
DEFAULT_MAX_FRAME_LEN: int = lib.PGWFWD_DEFAULT_FRAME_SIZE - lib.PGWFWD_FRAME_HEADROOM
KERNEL_COUNTER_NAMES: tuple[str, ...] = (
    "rx_dropped", "rx_invalid_descs", "tx_invalid_descs", "rx_ring_full",
    "rx_fill_ring_empty_descs", "tx_ring_empty_descs",
)

# tables.py states the layout without needing the compiled module; it must be C's.
assert PGW_DTYPE.itemsize == ffi.sizeof("struct pgwfwd_pgw")
assert (MAX_PGWS, MAX_SLOTS) == (lib.PGWFWD_MAX_PGWS, lib.PGWFWD_MAX_SLOTS)
assert SLOT_FINE == lib.PGWFWD_SLOT_FINE and tuple(POLICIES) == POLICY_NAMES
assert len(XDP_COUNTER_NAMES) == lib.PGWFWD_XDP_COUNTERS
assert len(KERNEL_COUNTER_NAMES) == lib.PGWFWD_KERNEL_COUNTERS


__all__ = [
    "DEFAULT_MAX_FRAME_LEN", "DROP_REASONS", "KERNEL_COUNTER_NAMES", "MAX_PGWS", "MAX_QUEUES",
    "MAX_SLOTS", "PGW_DTYPE", "POLICIES", "SLOT_FINE", "XDP_COUNTER_NAMES", "NativeError",
    "Queue", "SharedState", "XdpProgram", "flow_slot", "process_frame", "set_library_verbosity",
    "teid_slot",
]


class NativeError(PgwfwdError, OSError):
    """The data plane or the kernel refused an operation; errno says why."""


def check(result: int, what: str) -> int:
    """Raise NativeError for a negative errno returned by C."""
    if result < 0:
        raise NativeError(-result, f"{what}: {os.strerror(-result)}")
    return result


def set_library_verbosity(verbosity: int) -> None:
    """0 silences libxdp and libbpf; 1 shows their warnings, 3 everything."""
    lib.pgwfwd_set_library_verbosity(verbosity)


log = logging.getLogger(__name__)

# libxdp narrates its dispatcher fallback on every attach; quiet until asked.
lib.pgwfwd_set_library_verbosity(0)


def bpf_object_path() -> str:
    """The XDP object installed with the package (built by setup.py)."""
    path = Path(__file__).resolve().parent / "pgwfwd.bpf.o"
    if not path.is_file():
        raise NativeError(errno.ENOENT, f"XDP object missing: {path} (run make)")
    return str(path)


def _ipv4_network_order(address: str) -> int:
    """An IPv4 address as C compares it: its 4 bytes read in host order."""
    return int.from_bytes(ipaddress.IPv4Address(address).packed, "little")


def _port_network_order(port: int) -> int:
    if not 0 < port < 65536:
        raise ValueError(f"port out of range: {port}")
    return int.from_bytes(port.to_bytes(2, "big"), "little")


def _interface_name(ifindex: int) -> str:
    try:
        return socket.if_indextoname(ifindex)
    except OSError:
        return f"ifindex {ifindex}"


def _view(pointer: Any, ctype: str, dtype: Any, count: int) -> np.ndarray:
    """A numpy array over C memory (no copy); the owner must outlive it."""
    buffer = ffi.buffer(pointer, ffi.sizeof(ctype) * count)
    return np.frombuffer(buffer, dtype=dtype, count=count)


class XdpProgram:
    """pgwfwd's XDP program, attached to one interface until close()."""

    def __init__(
        self, ifindex: int, vip: str, gtp_port: int, object_path: str | None = None,
        max_frame_len: int = DEFAULT_MAX_FRAME_LEN,
    ) -> None:
        """max_frame_len must match the queues' UMEM frames: frame size - FRAME_HEADROOM."""
        if not 0 < max_frame_len <= lib.PGWFWD_DEFAULT_FRAME_SIZE:
            raise ValueError(f"max frame length out of range: {max_frame_len}")
        handle = ffi.new("struct pgwfwd_xdp **")
        message = ffi.new("char[256]")
        path = object_path or bpf_object_path()

        result = lib.pgwfwd_xdp_attach(
            handle, ifindex, path.encode(), _ipv4_network_order(vip),
            _port_network_order(gtp_port), max_frame_len, message, len(message),
        )
        text = ffi.string(message).decode()
        if result < 0:
            raise NativeError(-result,
                              f"{_interface_name(ifindex)}: {text or os.strerror(-result)}")
        if text:
            log.info("%s: %s", _interface_name(ifindex), text)
        self._xdp: Any = handle[0]
        self.ifindex = ifindex

    @property
    def native_mode(self) -> bool:
        return bool(lib.pgwfwd_xdp_mode(self._require()))

    @property
    def xskmap_fd(self) -> int:
        return int(lib.pgwfwd_xdp_xskmap_fd(self._require()))

    def counters(self) -> dict[str, int]:
        values = ffi.new("uint64_t[]", lib.PGWFWD_XDP_COUNTERS)
        check(lib.pgwfwd_xdp_counters(self._require(), values), "reading XDP counters")
        return dict(zip(XDP_COUNTER_NAMES, (int(value) for value in values)))

    def close(self) -> None:
        """Detach the program; safe to call twice."""
        if self._xdp is not None:
            lib.pgwfwd_xdp_detach(self._xdp)
            self._xdp = None

    def _require(self) -> Any:
        if self._xdp is None:
            raise NativeError(errno.EBADF, "XDP program already detached")
        return self._xdp


class SharedState:
    """The configuration and the two table buffers that every worker reads.

    publish() is the single writer: it waits until no worker still reads the
    buffer it is about to fill, fills it, then switches the workers over.
    """

    def __init__(self, vip: str, gtp_port: int, reg_port: int, src_mac: bytes,
                 ttl_decrement: bool = True) -> None:
        if len(src_mac) != 6:
            raise ValueError(f"an Ethernet address has 6 bytes, not {len(src_mac)}")
        self._shared: Any = ffi.new("struct pgwfwd_shared *")
        config = self._shared.config
        config.vip = _ipv4_network_order(vip)
        config.gtp_port = _port_network_order(gtp_port)
        config.reg_port = _port_network_order(reg_port)
        config.src_mac = src_mac
        config.ttl_decrement = int(ttl_decrement)

        # Generation 0 means "idle" to the workers, so the first live one
        # is 1: table buffer 1, empty, which drops everything as no_pgw.
        lib.pgwfwd_publish(self._shared, 1)
        self._pgws = [
            _view(ffi.addressof(self._shared.tables[i].pgws), "struct pgwfwd_pgw",
                  PGW_DTYPE, MAX_PGWS)
            for i in range(2)
        ]
        self._slots = [
            _view(ffi.addressof(self._shared.tables[i].slots), "uint16_t",
                  np.uint16, MAX_SLOTS)
            for i in range(2)
        ]
        self._fine_slots = [
            _view(ffi.addressof(self._shared.tables[i].fine_slots), "uint16_t",
                  np.uint16, MAX_SLOTS)
            for i in range(2)
        ]

    @property
    def generation(self) -> int:
        return int(self._shared.generation)

    @property
    def pointer(self) -> Any:
        return self._shared

    def publish(self, pgws: np.ndarray, slots: np.ndarray, n_queues: int,
                timeout: float = 1.0, *, policy: str = "wrr",
                fine_slots: np.ndarray | None = None) -> int:
        """Make the table live for every worker at once; returns its generation.

        pgws: PGW_DTYPE[MAX_PGWS] by PGW index. slots: uint16 PGW indices (wrr: in send
        order, SLOT_FINE deferring to fine_slots; teid: by hash, a power of two long).
        """
        fine = np.zeros(0, dtype=np.uint16) if fine_slots is None else fine_slots
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}")
        if pgws.dtype != PGW_DTYPE or len(pgws) != MAX_PGWS:
            raise ValueError("pgws must be a PGW_DTYPE array of MAX_PGWS entries")
        _check_slots(slots, allow_fine=policy == "wrr" and len(fine) > 0)
        _check_slots(fine, allow_fine=False)
        if policy == "teid" and len(slots) & (len(slots) - 1):
            raise ValueError("teid slots must be a power of two long")

        # Grace period: the buffer to fill served the previous generation.
        deadline = time.monotonic() + timeout
        while not lib.pgwfwd_grace_done(self._shared, n_queues):
            if time.monotonic() > deadline:
                raise NativeError(errno.ETIMEDOUT, "a worker holds an old table")
            time.sleep(50e-6)

        generation = self.generation + 1
        buffer = generation & 1
        table = self._shared.tables[buffer]
        self._pgws[buffer][:] = pgws
        self._slots[buffer][: len(slots)] = slots
        self._fine_slots[buffer][: len(fine)] = fine
        table.policy = POLICIES[policy]
        table.n_slots = len(slots)
        table.n_fine_slots = len(fine)
        lib.pgwfwd_publish(self._shared, generation)
        return generation


def _check_slots(slots: np.ndarray, allow_fine: bool) -> None:
    if len(slots) > MAX_SLOTS:
        raise ValueError(f"at most {MAX_SLOTS} slots")
    if not len(slots):
        return
    top = int(slots.max())
    if top >= MAX_PGWS and not (allow_fine and top == SLOT_FINE):
        raise ValueError("slots must hold PGW indices below MAX_PGWS")


class Queue:
    """One AF_XDP socket on one receive queue, and the loop that serves it."""

    def __init__(self, ifname: str, queue_id: int, xdp: XdpProgram, shared: SharedState,
                 params: dict[str, int] | None = None) -> None:
        handle = ffi.new("struct pgwfwd_queue **")
        ring_params = ffi.NULL
        if params:
            ring_params = ffi.new("struct pgwfwd_ring_params *", params)
        self._stats: Any = ffi.new("struct pgwfwd_queue_stats *")
        self._shared = shared  # C reads it for as long as the queue lives

        check(
            lib.pgwfwd_queue_create(handle, ifname.encode(), queue_id, xdp.xskmap_fd,
                                    shared.pointer, self._stats, ring_params),
            f"{ifname}: AF_XDP socket on queue {queue_id}",
        )
        self._queue: Any = handle[0]
        self.queue_id = queue_id
        self.pgw_packets = _view(ffi.addressof(self._stats.pgw_packets), "uint64_t",
                                 np.uint64, MAX_PGWS)
        self.pgw_bytes = _view(ffi.addressof(self._stats.pgw_bytes), "uint64_t",
                               np.uint64, MAX_PGWS)

    def run(self) -> None:
        """Forward until stop(); the GIL is released while C runs."""
        check(lib.pgwfwd_queue_run(self._require()), f"queue {self.queue_id}")

    def stop(self) -> None:
        if self._queue is not None:
            lib.pgwfwd_queue_stop(self._queue)

    def stats(self) -> dict[str, Any]:
        stats = self._stats
        return {
            "rx_packets": int(stats.rx_packets),
            "rx_bytes": int(stats.rx_bytes),
            "tx_packets": int(stats.tx_packets),
            "tx_bytes": int(stats.tx_bytes),
            "tx_kicks": int(stats.tx_kicks),
            "echo_replies": int(stats.echo_replies),
            "not_gtpu": int(stats.not_gtpu),
            "drops": {name: int(stats.drops[i]) for i, name in enumerate(DROP_REASONS)},
        }

    def kernel_stats(self) -> dict[str, int]:
        values = ffi.new("uint64_t[]", lib.PGWFWD_KERNEL_COUNTERS)
        check(lib.pgwfwd_queue_kernel_stats(self._require(), values),
              f"queue {self.queue_id}: XDP_STATISTICS")
        return dict(zip(KERNEL_COUNTER_NAMES, (int(value) for value in values)))

    def frames(self) -> dict[str, int]:
        account = ffi.new("struct pgwfwd_frame_account *")
        lib.pgwfwd_queue_frames(self._require(), account)
        return {"n_frames": account.n_frames, "fill": account.fill,
                "in_flight": account.in_flight, "held": account.held}

    def close(self) -> None:
        """Free the socket and UMEM; only after run() has returned."""
        if self._queue is not None:
            lib.pgwfwd_queue_destroy(self._queue)
            self._queue = None

    def _require(self) -> Any:
        if self._queue is None:
            raise NativeError(errno.EBADF, f"queue {self.queue_id} already closed")
        return self._queue


def teid_slot(teid: int, n_slots: int) -> int:
    """The slot of a TEID under the teid policy, as C computes it."""
    return int(lib.pgwfwd_teid_slot(teid, n_slots))


def flow_slot(address: str, port: int, n_slots: int) -> int:
    """The slot of a source address and port (payloads that are not GTP-U)."""
    return int(lib.pgwfwd_flow_slot(_ipv4_network_order(address), _port_network_order(port),
                                    n_slots))


class FrameResult(NamedTuple):
    """What the C per-frame path made of one frame."""

    verdict: str      # "forward", "reply" or the drop reason
    pgw_index: int    # the PGW chosen, -1 unless forwarded
    frame: bytes      # the frame as it would leave (unchanged when dropped)
    not_gtpu: bool    # the payload was not parseable GTP-U


class FrameCursor:
    """A queue's position in the wrr slot arrays, for process_frame()."""

    def __init__(self) -> None:
        self.struct: Any = ffi.new("struct pgwfwd_cursor *")


def process_frame(shared: SharedState, frame: bytes | bytearray,
                  cursor: FrameCursor | None = None, capacity: int = 2048) -> FrameResult:
    """Run the C per-frame path on a copy of frame, as a worker would.

    For tests and benchmarks. cursor carries the wrr position from call to call.
    """
    buffer = ffi.new("uint8_t[]", max(capacity, len(frame)))
    buffer[0:len(frame)] = bytes(frame)
    length = ffi.new("uint32_t *", len(frame))
    pgw_index = ffi.new("uint32_t *", 0)
    not_gtpu = ffi.new("uint32_t *", 0)
    position = (cursor or FrameCursor()).struct
    shared_struct = shared.pointer

    table = shared_struct.tables[shared.generation & 1]
    verdict = lib.pgwfwd_process_frame(ffi.addressof(shared_struct.config),
                                       ffi.addressof(table), position, buffer, length,
                                       len(buffer), pgw_index, not_gtpu)
    if verdict == lib.PGWFWD_FORWARD:
        return FrameResult("forward", int(pgw_index[0]), bytes(ffi.buffer(buffer, length[0])),
                           bool(not_gtpu[0]))
    if verdict == lib.PGWFWD_REPLY:
        return FrameResult("reply", -1, bytes(ffi.buffer(buffer, length[0])), False)
    return FrameResult(DROP_REASONS[verdict], -1, bytes(frame), bool(not_gtpu[0]))

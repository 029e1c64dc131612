"""Micro-benchmarks (pytest-benchmark), outside the default test run:

    .venv/bin/python -m pytest bench -m benchmark

- the C per-frame path (parse, select, rewrite) on in-memory batches, in ns per packet, for
  each policy (wrr with both slot levels in use, teid over many TEIDs) and for the Echo
  Request the distributor answers itself;
- the same path called once per frame from Python, to show what the binding costs;
- table builds for 1, 10, 100 and 1000 PGWs (wrr, teid from scratch, the PGW array), the
  teid table's incremental join and leave at 1000 PGWs, and the memory of each;
- registration handling rate;
- expiry lateness of a real distributor in a lab (needs root), with PGWs expiring one by one
  and all together.

Every benchmark puts what the report shows into extra_info; bench/suite.py reads it back.
"""

from __future__ import annotations

import ctypes
import json
import random
import struct
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from pgwfwd import tables
from pgwfwd.lab import Lab, LabConfig, package_env
from pgwfwd.native import (DROP_REASONS, SLOT_FINE, FrameCursor, SharedState, process_frame,
                           teid_slot)
from pgwfwd.registry import Registry

BENCH_DIR = Path(__file__).resolve().parent
PROCBATCH = BENCH_DIR / "build" / "libprocbatch.so"
VIP = "198.18.0.1"
LD_MAC = bytes.fromhex("020000000001")
SGW_MAC = bytes.fromhex("020000000101")
SGWS = [f"198.18.0.{host}" for host in range(101, 111)]
PGWS = [(f"198.18.0.{11 + i}", 40001 + i, bytes([2, 0, 0, 0, 0, 0x11 + i])) for i in range(4)]
#: wrr weights summing to more than MAX_SLOTS, so that the table has both levels: slots
#: holding SLOT_FINE markers and a fine slot array behind them.
WRR_WEIGHTS = (100_000, 70_001, 30_000, 3)
#: teid weights: unequal, so that the table is not a plain split.
TEID_WEIGHTS = (1, 2, 3, 4)
FRAME_LEN = 64
BATCH = 64
#: Batches of different frames a run cycles through: BATCH * N_BATCHES TEIDs (64 KiB of
#: frames, which stay in the cache as a queue's recent frames would).
N_BATCHES = 16
ROUNDS_PER_CALL = 256
#: The paths of the per-frame benchmark: the two policies, and Echo Requests answered.
PATHS = ["wrr", "teid", "echo"]
#: verdict + 2 indexes procbatch's counts: replies, forwards, then the drop reasons.
N_VERDICTS = len(DROP_REASONS) + 2
BUILD_COUNTS = [1, 10, 100, 1000]
CHANGE_PGWS = 1000
CHANGE_ROUNDS = 20

pytestmark = pytest.mark.benchmark

T = TypeVar("T")


# Frames


def _sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def udp_frame(sgw: str, sport: int, payload: bytes) -> bytes:
    """Ethernet, IPv4 and UDP with both checksums from an SGW to VIP:2152, padded with
    Ethernet padding to FRAME_LEN bytes."""
    saddr, daddr = bytes(map(int, sgw.split("."))), bytes(map(int, VIP.split(".")))
    udp_len = 8 + len(payload)
    udp = struct.pack("!HHHH", sport, 2152, udp_len, 0) + payload
    pseudo = saddr + daddr + struct.pack("!BBH", 0, 17, udp_len)
    check = (~_sum16(pseudo + udp)) & 0xFFFF or 0xFFFF
    udp = udp[:6] + struct.pack("!H", check) + udp[8:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 0, 0x4000, 64, 17, 0,
                     saddr, daddr)
    ip = ip[:10] + struct.pack("!H", (~_sum16(ip)) & 0xFFFF) + ip[12:]
    frame = LD_MAC + SGW_MAC + b"\x08\x00" + ip + udp
    assert len(frame) <= FRAME_LEN
    return frame.ljust(FRAME_LEN, b"\0")


def gtpu_frame(teid: int, sgw: str, sport: int) -> bytes:
    """A 64-byte frame like the generator's: a G-PDU with 14 bytes of payload."""
    payload = b"BNCH" + bytes(10)
    return udp_frame(sgw, sport, struct.pack("!BBHI", 0x30, 255, len(payload), teid) + payload)


def echo_request_frame(sequence: int, sgw: str) -> bytes:
    """A GTP-U Echo Request (TEID 0, with a sequence number) from an SGW."""
    optional = struct.pack("!HBB", sequence, 0, 0)
    return udp_frame(sgw, 2152, struct.pack("!BBHI", 0x32, 1, len(optional), 0) + optional)


def frames_for(path: str) -> list[bytes]:
    """BATCH * N_BATCHES frames: G-PDUs with as many TEIDs and rolling source ports, or
    Echo Requests with rolling sequence numbers."""
    count = BATCH * N_BATCHES
    if path == "echo":
        return [echo_request_frame(n, SGWS[n % len(SGWS)]) for n in range(count)]
    return [gtpu_frame(0x1000 + n, SGWS[n % len(SGWS)], 10000 + n) for n in range(count)]


# Tables


def pgw_array() -> np.ndarray:
    return tables.fill_pgw_array((index, addr, port, mac)
                                 for index, (addr, port, mac) in enumerate(PGWS))


def shared_state(path: str) -> tuple[SharedState, dict[str, Any]]:
    """A SharedState with the table of path's policy published, and notes on the table."""
    state = SharedState(VIP, 2152, 3000, LD_MAC)
    if path == "teid":
        teid = tables.TeidTable.build({(addr, port): (index, weight) for index, (
            (addr, port, _), weight) in enumerate(zip(PGWS, TEID_WEIGHTS))})
        state.publish(pgw_array(), teid.slots(), n_queues=0, policy="teid")
        return state, {"slots": int(teid.n_slots)}

    wrr = tables.build_wrr(enumerate(WRR_WEIGHTS))
    state.publish(pgw_array(), wrr.slots, n_queues=0, policy="wrr", fine_slots=wrr.fine_slots)
    return state, {"slots": int(wrr.slots.size), "fine_slots": int(wrr.fine_slots.size),
                   "fine_markers": int(np.count_nonzero(wrr.slots == SLOT_FINE))}


def check_selection(path: str, state: SharedState, frames: list[bytes]) -> None:
    """The table really is in use: wrr sends every PGW its weight's share (within the
    table's guarantee of 4 datagrams), teid sends each TEID where its slot says, and an
    Echo Request is answered, never forwarded."""
    cursor = FrameCursor()
    results = [process_frame(state, frame, cursor) for frame in frames]
    if path == "echo":
        assert {result.verdict for result in results} == {"reply"}
        return

    assert {result.verdict for result in results} == {"forward"}
    received = np.bincount([result.pgw_index for result in results], minlength=len(PGWS))
    if path == "wrr":
        expected = len(frames) * np.array(WRR_WEIGHTS) / sum(WRR_WEIGHTS)
        assert np.all(np.abs(received - expected) <= 4), (received, expected)
        return

    table = state.pointer.tables[state.generation & 1]
    for result, teid in zip(results, range(0x1000, 0x1000 + len(frames))):
        assert result.pgw_index == table.slots[teid_slot(teid, table.n_slots)]
    assert np.all(received > 0), received


# The C per-frame path


@pytest.fixture(scope="module")
def procbatch() -> Any:
    if not PROCBATCH.exists():
        pytest.skip(f"{PROCBATCH} not built (make -C bench)")
    lib = ctypes.CDLL(str(PROCBATCH))
    lib.procbatch_run.restype = None
    lib.procbatch_run.argtypes = [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p,
        ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int,
        ctypes.c_void_p,
    ]
    return lib


def _address(pointer: Any) -> int:
    from pgwfwd._native import ffi

    return int(ffi.cast("uintptr_t", pointer))


@pytest.mark.parametrize("path", PATHS)
def test_c_path_ns_per_packet(benchmark: Any, procbatch: Any, path: str) -> None:
    """parse + select + rewrite (or answer, for echo) in C over batches of 64 fresh 64-byte
    frames; each round first copies a batch in (as a NIC writes it), which is measured on
    its own and taken off."""
    from pgwfwd._native import ffi

    state, notes = shared_state(path)
    frames = frames_for(path)
    check_selection(path, state, frames)

    shared = state.pointer
    config = _address(ffi.addressof(shared, "config"))
    table = _address(ffi.addressof(shared.tables[state.generation & 1]))
    cursor = ffi.new("struct pgwfwd_cursor *")   # carries on from call to call, as a queue's
    templates = b"".join(frames)
    work = ctypes.create_string_buffer(FRAME_LEN * BATCH)
    verdicts = (ctypes.c_uint64 * N_VERDICTS)()
    packets = BATCH * ROUNDS_PER_CALL

    def run(process: int) -> None:
        procbatch.procbatch_run(config, table, _address(cursor), templates,
                                ctypes.addressof(work), FRAME_LEN, BATCH, N_BATCHES,
                                ROUNDS_PER_CALL, process, ctypes.addressof(verdicts))

    # Every frame must take the path being measured: replies for echo, else forwards.
    run(1)
    wanted = 0 if path == "echo" else 1
    counts = list(verdicts)
    assert counts[wanted] == packets and sum(counts) == packets, counts

    copy_only = benchmark_seconds(lambda: run(0))
    benchmark(run, 1)

    stats = benchmark.stats.stats
    copy_ns = copy_only / packets * 1e9
    per_packet = {name: getattr(stats, name) / packets * 1e9 - copy_ns
                  for name in ("median", "min", "max")}
    if path != "echo":   # an Echo Request is answered, the table plays no part
        benchmark.extra_info.update(notes)
    benchmark.extra_info.update({
        "path": path,
        "ns_per_packet": per_packet["median"],
        "ns_per_packet_min": per_packet["min"],
        "ns_per_packet_max": per_packet["max"],
        "copy_ns_per_packet": copy_ns,
        "mpps_per_core": 1e3 / max(per_packet["median"], 1e-9),
        "distinct_frames": len(frames),
    })


def benchmark_seconds(function: Callable[[], Any], repeats: int = 50) -> float:
    """The median time of function(), outside pytest-benchmark (for a baseline)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def test_python_call_per_frame(benchmark: Any) -> None:
    """One process_frame() call through cffi: the binding's cost, which is why the C
    path is measured with a C loop."""
    state, _ = shared_state("wrr")
    frame = gtpu_frame(1, SGWS[0], 10000)
    cursor = FrameCursor()
    result = benchmark(process_frame, state, frame, cursor)
    assert result.verdict == "forward"
    benchmark.extra_info["ns_per_packet"] = benchmark.stats.stats.median * 1e9


# Table builds


def pgw_set(n_pgws: int) -> dict[tables.PgwKey, tuple[int, int]]:
    """{(address, port): (index, weight)} for n PGWs, weights anywhere in the 32-bit range
    (so that wrr takes its two-level path from 2 PGWs on)."""
    rng = random.Random(n_pgws)
    return {(f"198.18.{1 + index // 250}.{1 + index % 250}", 40000 + index):
            (index, rng.randint(1, tables.MAX_WEIGHT)) for index in range(n_pgws)}


def traced(function: Callable[[], T]) -> tuple[T, int]:
    """function() once under tracemalloc: its result and the peak of the memory allocated
    while it ran (numpy reports its buffers to tracemalloc), in bytes."""
    tracemalloc.start()
    try:
        result = function()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak


def teid_state_bytes(table: tables.TeidTable) -> int:
    """The numpy arrays that a TeidTable keeps between changes (slot hashes, best scores,
    owners' keys and indices): what it costs to hold, beyond its small member dict."""
    return sum(value.nbytes for value in vars(table).values() if isinstance(value, np.ndarray))


def note_memory(benchmark: Any, peak: int, table_bytes: int) -> None:
    benchmark.extra_info["peak_kib"] = peak / 1024
    benchmark.extra_info["table_kib"] = table_bytes / 1024


@pytest.mark.parametrize("n_pgws", BUILD_COUNTS)
def test_build_wrr(benchmark: Any, n_pgws: int) -> None:
    """build_wrr: the wrr table (both levels) from (index, weight) pairs."""
    pairs = list(pgw_set(n_pgws).values())

    wrr = benchmark(tables.build_wrr, pairs)
    assert np.allclose(wrr.shares(), tables.weight_shares(pairs), rtol=0,
                       atol=n_pgws / 2**32)
    _, peak = traced(lambda: tables.build_wrr(pairs))
    note_memory(benchmark, peak, wrr.slots.nbytes + wrr.fine_slots.nbytes)
    benchmark.extra_info.update({"table": "wrr", "pgws": n_pgws, "slots": int(wrr.slots.size),
                                 "fine_slots": int(wrr.fine_slots.size)})


@pytest.mark.parametrize("n_pgws", BUILD_COUNTS)
def test_build_teid(benchmark: Any, n_pgws: int) -> None:
    """TeidTable.build: the teid table from scratch (every PGW scores every slot)."""
    desired = pgw_set(n_pgws)

    teid = benchmark(tables.TeidTable.build, desired)
    # Each PGW owns its weight's share of the slots, within 5 binomial deviations.
    share = tables.weight_shares(desired.values())
    deviation = np.sqrt(share * (1 - share) / teid.n_slots)
    assert np.all(np.abs(teid.shares() - share) <= 5 * deviation + 1 / teid.n_slots)
    _, peak = traced(lambda: tables.TeidTable.build(desired))
    note_memory(benchmark, peak, teid_state_bytes(teid))
    benchmark.extra_info.update({"table": "teid", "pgws": n_pgws,
                                 "slots": int(teid.n_slots)})


@pytest.mark.parametrize("n_pgws", BUILD_COUNTS)
def test_build_pgw_array(benchmark: Any, n_pgws: int) -> None:
    """fill_pgw_array: the PGW array that every published table carries (either policy)."""
    pgws = [(index, addr, port, bytes([2, 0, 0, 0, index >> 8, index & 0xFF]))
            for (addr, port), (index, _) in pgw_set(n_pgws).items()]
    out = tables.empty_pgw_array()

    benchmark(tables.fill_pgw_array, pgws, out)
    assert np.count_nonzero(out["port"]) == n_pgws
    _, peak = traced(lambda: tables.fill_pgw_array(pgws, out))
    note_memory(benchmark, peak, out.nbytes)
    benchmark.extra_info.update({"table": "pgw array", "pgws": n_pgws})


@pytest.fixture(scope="module")
def teid_table_1000() -> tuple[dict[tables.PgwKey, tuple[int, int]], tables.TeidTable]:
    desired = pgw_set(CHANGE_PGWS)
    return desired, tables.TeidTable.build(desired)


@pytest.mark.parametrize("change", ["join", "leave"])
def test_teid_change(benchmark: Any, change: str,
                     teid_table_1000: tuple[dict[tables.PgwKey, tuple[int, int]],
                                            tables.TeidTable]) -> None:
    """One PGW joins a teid table of 999, or leaves one of 1000: only the slots that
    must move are scored again."""
    desired, teid = teid_table_1000
    key = next(reversed(desired))
    index, weight = desired[key]

    def join() -> None:
        teid.join(key, index, weight)

    def leave() -> None:
        teid.leave(key)

    def setup() -> None:   # the state before the change, restored before every round
        if change == "join" and key in teid:
            leave()
        if change == "leave" and key not in teid:
            join()

    setup()
    before = teid.slots()
    action = join if change == "join" else leave
    _, peak = traced(action)
    moved = before != teid.slots()
    # Only the PGW's own slots change hands, to it or from it.
    assert np.all((before[moved] == index) | (teid.slots()[moved] == index))

    benchmark.pedantic(action, setup=setup, rounds=CHANGE_ROUNDS, iterations=1)
    note_memory(benchmark, peak, teid_state_bytes(teid))
    benchmark.extra_info.update({"table": f"teid {change}", "pgws": CHANGE_PGWS,
                                 "moved_slots": int(np.count_nonzero(moved))})


# Control plane


def test_registration_rate(benchmark: Any) -> None:
    """Registry.handle_datagram over 1000 PGWs refreshing (after they joined)."""
    registry = Registry("veth0", expiry=3.0, broadcast="198.18.0.255")
    sources = [(f"198.18.{1 + i // 250}.{1 + i % 250}", 40000 + i) for i in range(1000)]
    weight = struct.pack("!I", 7)
    for source in sources:
        registry.handle_datagram(weight, source)

    def refresh_all() -> None:
        for source in sources:
            registry.handle_datagram(weight, source)

    benchmark(refresh_all)
    assert len(registry) == len(sources)
    benchmark.extra_info["registrations_per_s"] = len(sources) / benchmark.stats.stats.median


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    import os

    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    micro_lab = Lab(LabConfig.with_prefix("pgwfwd-bmicro"))
    micro_lab.up(replace=True)
    try:
        yield micro_lab
    finally:
        micro_lab.down()


@pytest.mark.netns
@pytest.mark.parametrize("timing", ["spread", "burst"])
def test_expiry_lateness(benchmark: Any, lab: Lab, timing: str) -> None:
    """A real distributor (expiry 0.5 s) and 40 PGWs that register once each, at random
    times over a second (spread) or all at once (burst: they all expire together, as when
    a site goes dark): how long after each deadline the first table without the PGW is
    published."""
    spread = "1.0" if timing == "spread" else "0"
    argv = lab.ld_command([sys.executable, str(BENCH_DIR / "expiry_probe.py"),
                           "--iface", lab.config.ld_iface,
                           "--peers-netns", lab.config.peers_netns,
                           "--expiry", "0.5", "--pgws", "40", "--spread", spread])

    def probe() -> list[float]:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                                env=package_env())
        assert result.returncode == 0, result.stderr
        lateness: list[float] = json.loads(result.stdout.splitlines()[-1])["lateness_ms"]
        return lateness

    lateness = sorted(benchmark.pedantic(probe, rounds=1, iterations=1))
    assert lateness and min(lateness) >= 0
    benchmark.extra_info["timing"] = timing
    benchmark.extra_info["pgws"] = len(lateness)
    benchmark.extra_info["lateness_p50_ms"] = float(np.percentile(lateness, 50))
    benchmark.extra_info["lateness_p99_ms"] = float(np.percentile(lateness, 99))
    benchmark.extra_info["lateness_max_ms"] = max(lateness)

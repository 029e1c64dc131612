"""Micro-benchmarks (pytest-benchmark), outside the default test run:

    .venv/bin/python -m pytest bench -m benchmark

- the C per-frame path (parse, select, rewrite) on an in-memory batch, in ns per packet;
- the same path called once per frame from Python, to show what the binding costs;
- table builds for 1, 10, 100 and 1000 PGWs;
- registration handling rate;
- expiry lateness of a real distributor in a lab (needs root).
"""

from __future__ import annotations

import ctypes
import json
import random
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pgwfwd import tables
from pgwfwd.lab import Lab, LabConfig, package_env
from pgwfwd.native import MAX_PGWS, PGW_DTYPE, SharedState, process_frame
from pgwfwd.registry import Registry

BENCH_DIR = Path(__file__).resolve().parent
PROCBATCH = BENCH_DIR / "build" / "libprocbatch.so"
VIP = "198.18.0.1"
SGWS = [f"198.18.0.{host}" for host in range(101, 111)]
PGWS = [(f"198.18.0.{11 + i}", 40001 + i, bytes([2, 0, 0, 0, 0, 0x11 + i])) for i in range(4)]
BATCH = 64
ROUNDS_PER_CALL = 200
#: Policies of the per-frame path; a new one is one more entry.
POLICIES = ["default"]

pytestmark = pytest.mark.benchmark


def _sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def gtpu_frame(teid: int, sgw: str, sport: int) -> bytes:
    """A 64-byte frame like the generator's: Ethernet, IPv4, UDP with a full checksum,
    GTP-U G-PDU header and 14 bytes of payload."""
    payload = struct.pack("!BBHI", 0x30, 255, 14, teid) + b"BNCH" + bytes(10)
    saddr, daddr = bytes(map(int, sgw.split("."))), bytes(map(int, VIP.split(".")))
    udp_len = 8 + len(payload)
    udp = struct.pack("!HHHH", sport, 2152, udp_len, 0) + payload
    pseudo = saddr + daddr + struct.pack("!BBH", 0, 17, udp_len)
    check = (~_sum16(pseudo + udp)) & 0xFFFF or 0xFFFF
    udp = udp[:6] + struct.pack("!H", check) + udp[8:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 0, 0x4000, 64, 17, 0,
                     saddr, daddr)
    ip = ip[:10] + struct.pack("!H", (~_sum16(ip)) & 0xFFFF) + ip[12:]
    eth = bytes.fromhex("020000000001") + bytes.fromhex("020000000101") + b"\x08\x00"
    return eth + ip + udp


def shared_state(policy: str) -> SharedState:
    state = SharedState(VIP, 2152, 3000, bytes.fromhex("020000000001"))
    pgws = np.zeros(MAX_PGWS, dtype=PGW_DTYPE)
    for index, (addr, port, mac) in enumerate(PGWS):
        pgws[index]["addr"] = int.from_bytes(bytes(map(int, addr.split("."))), "big")
        pgws[index]["port"] = port
        pgws[index]["mac"] = list(mac)
    slots = tables.build_slots((index, 1) for index in range(len(PGWS)))
    state.publish(pgws, slots, n_queues=0)
    return state


@pytest.fixture(scope="module")
def procbatch() -> Any:
    if not PROCBATCH.exists():
        pytest.skip(f"{PROCBATCH} not built (make -C bench)")
    lib = ctypes.CDLL(str(PROCBATCH))
    lib.procbatch_run.restype = ctypes.c_uint64
    lib.procbatch_run.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p,
                                  ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint32,
                                  ctypes.c_uint64, ctypes.c_int]
    return lib


def _address(pointer: Any) -> int:
    from pgwfwd._native import ffi

    return int(ffi.cast("uintptr_t", pointer))


@pytest.mark.parametrize("policy", POLICIES)
def test_c_path_ns_per_packet(benchmark: Any, procbatch: Any, policy: str) -> None:
    """parse + select + rewrite in C over batches of 64 fresh 64-byte frames; each round
    first copies the batch in (as a NIC writes it), which is measured on its own and
    taken off."""
    from pgwfwd._native import ffi

    state = shared_state(policy)
    shared = state.pointer
    config = _address(ffi.addressof(shared, "config"))
    table = _address(ffi.addressof(shared.tables[state.generation & 1]))
    frames = b"".join(gtpu_frame(teid, SGWS[teid % len(SGWS)], 10000 + teid)
                      for teid in range(1, BATCH + 1))
    work = ctypes.create_string_buffer(len(frames))
    packets = BATCH * ROUNDS_PER_CALL

    def run(process: int) -> int:
        return int(procbatch.procbatch_run(config, table, frames, ctypes.addressof(work),
                                           64, BATCH, ROUNDS_PER_CALL, process))

    assert run(1) == packets, "every frame must be forwarded"
    copy_only = benchmark_seconds(lambda: run(0))
    benchmark(run, 1)

    per_packet = benchmark.stats.stats.median / packets * 1e9
    copy_per_packet = copy_only / packets * 1e9
    benchmark.extra_info["ns_per_packet"] = per_packet - copy_per_packet
    benchmark.extra_info["ns_per_packet_with_copy"] = per_packet
    benchmark.extra_info["copy_ns_per_packet"] = copy_per_packet
    benchmark.extra_info["mpps_per_core"] = 1e3 / max(per_packet - copy_per_packet, 1e-9)


def benchmark_seconds(function: Any, repeats: int = 50) -> float:
    """The median time of function(), outside pytest-benchmark (for a baseline)."""
    import time

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def test_python_call_per_frame(benchmark: Any) -> None:
    """One process_frame() call through cffi: the binding's cost, which is why the C
    path is measured with a C loop."""
    state = shared_state("default")
    frame = bytearray(gtpu_frame(1, SGWS[0], 10000))
    cursor = [0]
    verdict, _, _ = benchmark(process_frame, state, frame, cursor)
    assert verdict is None
    benchmark.extra_info["ns_per_packet"] = benchmark.stats.stats.median * 1e9


@pytest.mark.parametrize("n_pgws", [1, 10, 100, 1000])
def test_table_build(benchmark: Any, n_pgws: int) -> None:
    """The distributor's table build: slot array (weights 1..1000, so the largest
    remainder path runs from 100 PGWs on) and PGW array."""
    rng = random.Random(n_pgws)
    pairs = [(index, rng.randint(1, 1000)) for index in range(n_pgws)]
    pgws = [(index, f"198.18.{1 + index // 250}.{1 + index % 250}", 40000 + index,
             bytes([2, 0, 0, 0, index >> 8, index & 0xFF])) for index in range(n_pgws)]
    out = tables.empty_pgw_array()

    def build() -> np.ndarray:
        tables.fill_pgw_array(pgws, out=out)
        return tables.build_slots(pairs)

    slots = benchmark(build)
    assert len(set(slots.tolist())) == n_pgws
    benchmark.extra_info["slots"] = int(slots.size)
    benchmark.extra_info["ms"] = benchmark.stats.stats.median * 1e3


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
def test_expiry_lateness(benchmark: Any, lab: Lab) -> None:
    """A real distributor (expiry 0.5 s) and 40 PGWs that register once each at spread-out
    times: how long after each deadline the first table without the PGW is published."""
    argv = lab.ld_command([sys.executable, str(BENCH_DIR / "expiry_probe.py"),
                           "--iface", lab.config.ld_iface,
                           "--peers-netns", lab.config.peers_netns,
                           "--expiry", "0.5", "--pgws", "40", "--spread", "1.0"])

    def probe() -> list[float]:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                                env=package_env())
        assert result.returncode == 0, result.stderr
        lateness: list[float] = json.loads(result.stdout.splitlines()[-1])["lateness_ms"]
        return lateness

    lateness = sorted(benchmark.pedantic(probe, rounds=1, iterations=1))
    assert lateness and min(lateness) >= 0
    benchmark.extra_info["pgws"] = len(lateness)
    benchmark.extra_info["lateness_p50_ms"] = float(np.percentile(lateness, 50))
    benchmark.extra_info["lateness_p99_ms"] = float(np.percentile(lateness, 99))
    benchmark.extra_info["lateness_max_ms"] = max(lateness)

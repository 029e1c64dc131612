"""pgwfwd's benchmark: pgwfwd and four baselines side by side, same lab, same loads.

    python bench/suite.py [--quick] [--systems pgwfwd,xsk,...] [--out bench/results]

Topology (a lab of its own, namespaces pgwfwd-bench-ld and pgwfwd-bench-peers):

    generator (XDP, live frames) --veth1--> veth0: system under test --veth0--> veth1: sink

The generator and the sink run in the peers' namespace (bench/src/peer.c); the system
under test runs in the distributor's namespace. The generator's process is pinned to
GEN_CPU, the system's processes to FWD_CPU. Softirq work lands where the sender runs:
veth0's receive path (XDP, the AF_XDP copy, the kernel stack for the relays) on GEN_CPU,
veth1's (the sink) on whichever CPU transmitted, FWD_CPU for the user-space systems.

For each system: saturation (generator flat out), the highest rate with less than 0.1%
loss (bisection), and latency at 10, 50 and 90% of that rate; every point repeated and
reported as median, min and max. pgwfwd runs once per selection policy (wrr, teid), and
each variant gets its own ratios to the baselines. Writes latest.json, latest.md and
latest.png.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(ROOT))

from pgwfwd.lab import DistributorProcess, Lab, LabConfig, LabError, netns_command  # noqa: E402
from pgwfwd.sim import PgwSimulator  # noqa: E402

logger = logging.getLogger("bench.suite")

BUILD = BENCH_DIR / "build"
LAB_PREFIX = "pgwfwd-bench"
GEN_CPU = 0
FWD_CPU = 1
LOSS_LIMIT = 0.001
GTP_PORT = 2152
REG_PORT = 3000
#: The PGWs: addresses of the lab's peers, fixed ports, weights.
PGWS = (("198.18.0.11", 40001, 1), ("198.18.0.12", 40002, 1),
        ("198.18.0.13", 40003, 1), ("198.18.0.14", 40004, 1))
LOAD_FRACTIONS = (0.1, 0.5, 0.9)
#: TEIDs the generator rolls through (peer --teids, a power of two).
TEIDS = 65536
READY_TIMEOUT = 30.0
# Sink counters (enum bench_sink_counter).
SINK_COUNTED, SINK_PASSED, SINK_CLOCK_SKEW = range(3)
HIST_SUB = 16


class BenchError(RuntimeError):
    """The benchmark could not set up or measure something."""


@dataclasses.dataclass(frozen=True)
class Mode:
    runs: int            # repeats of each reported point
    duration: float      # seconds of sending per run
    search_steps: int    # bisection probes for the no-loss rate
    probe_runs: int      # runs per probe, all of which must stay under the loss limit


QUICK = Mode(runs=3, duration=0.4, search_steps=5, probe_runs=1)
FULL = Mode(runs=5, duration=1.0, search_steps=7, probe_runs=2)
#: Tries at confirming the no-loss rate, each 5% lower than the one before.
CONFIRM_STEPS = 3


# Processes


def pinned(cpu: int, argv: Sequence[str]) -> list[str]:
    """argv pinned to one CPU, and sent SIGTERM if this process dies first (so that a
    killed suite leaves nothing running)."""
    return ["taskset", "-c", str(cpu), "setpriv", "--pdeathsig", "TERM", *argv]


class Child:
    """A helper process that prints a line containing `ready` once it is set up."""

    def __init__(self, name: str, argv: Sequence[str], cwd: Path | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self._log = tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log")
        self.process = subprocess.Popen(
            self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
            text=True, cwd=cwd,
        )
        self.result: str = ""

    @property
    def stderr(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if "ready" in line:
                return
            if not line and self.process.poll() is not None:
                raise BenchError(f"{self.name}: exited with {self.process.returncode} before "
                                 f"it was ready:\n{self.stderr.strip()}")
        raise BenchError(f"{self.name}: not ready after {timeout:.0f} s")

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                out, _ = self.process.communicate(timeout=timeout)
                self.result = out.strip()
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.communicate()
        self._log.close()


class Peer(Child):
    """bench/build/peer: generator and sink, driven line by line."""

    def command(self, line: str) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        if not answer:
            raise BenchError(f"peer: exited during {line!r}:\n{self.stderr.strip()}")
        result: dict[str, Any] = json.loads(answer)
        return result


def read_mac(lab: Lab, netns: str, iface: str) -> str:
    result = subprocess.run(netns_command(netns, ["cat", f"/sys/class/net/{iface}/address"]),
                            capture_output=True, text=True, check=True)
    return result.stdout.strip()


# Measurement


def cpu_times() -> list[tuple[int, int]]:
    """(busy, total) jiffies per CPU from /proc/stat."""
    times = []
    with open("/proc/stat", encoding="ascii") as stat:
        for line in stat:
            if line.startswith("cpu") and line[3].isdigit():
                values = [int(v) for v in line.split()[1:]]
                idle = values[3] + values[4]
                total = sum(values[:8])
                times.append((total - idle, total))
    return times


def cpu_busy(before: list[tuple[int, int]], after: list[tuple[int, int]]) -> list[float]:
    return [(b1 - b0) / (t1 - t0) if t1 > t0 else 0.0
            for (b0, t0), (b1, t1) in zip(before, after)]


def bucket_value_ns(index: int) -> float:
    """The middle of a latency bucket (see BENCH_HIST_* in bench/bpf/bench.h)."""
    if index < HIST_SUB:
        return float(index)
    top = index // HIST_SUB + 3
    mantissa = index % HIST_SUB
    width = 1 << (top - 4)
    return (HIST_SUB + mantissa) * width + width / 2


def percentiles_us(hist: Sequence[Sequence[int]], fractions: Sequence[float]) -> list[float]:
    total = sum(count for _, count in hist)
    if total == 0:
        return [float("nan")] * len(fractions)
    results = []
    for fraction in fractions:
        target, seen = fraction * total, 0
        for index, count in sorted(hist):
            seen += count
            if seen >= target:
                results.append(bucket_value_ns(index) / 1000)
                break
    return results


@dataclasses.dataclass
class Run:
    offered_pps: float
    rx_pps: float
    loss: float
    sent: int
    received: int
    p50_us: float
    p99_us: float
    p999_us: float
    cpu: list[float]
    share_spread: float   # min / max of received per weight unit over the PGWs


def measure(peer: Peer, rate: float, duration: float) -> Run:
    """One run: send at rate (0: flat out) for duration, wait for the last datagrams to
    arrive, read the sink."""
    peer.command("reset")
    before = cpu_times()
    sent = peer.command(f"gen {rate:.0f} {duration}")
    after = cpu_times()
    if sent.get("error"):
        raise BenchError(f"generator failed: {sent}")

    # Drained when two reads 50 ms apart agree.
    received, sink = -1, peer.command("read")
    for _ in range(40):
        time.sleep(0.05)
        sink = peer.command("read")
        if sink["counters"][SINK_COUNTED] == received:
            break
        received = sink["counters"][SINK_COUNTED]
    received = sink["counters"][SINK_COUNTED]

    elapsed = sent["elapsed"]
    per_weight = [sink["dests"].get(f"{addr}:{port}", 0) / weight
                  for addr, port, weight in PGWS]
    p50, p99, p999 = percentiles_us(sink["hist"], (0.5, 0.99, 0.999))
    return Run(
        offered_pps=sent["sent"] / elapsed, rx_pps=received / elapsed,
        loss=1 - received / sent["sent"] if sent["sent"] else 0.0,
        sent=sent["sent"], received=received, p50_us=p50, p99_us=p99, p999_us=p999,
        cpu=cpu_busy(before, after),
        share_spread=min(per_weight) / max(per_weight) if max(per_weight) else 0.0,
    )


def spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(system: str, point: str, target: float, runs: list[Run]) -> dict[str, Any]:
    n_cpus = len(runs[0].cpu)
    return {
        "system": system,
        "point": point,
        "target_pps": target,
        "runs": len(runs),
        "offered_pps": spread([r.offered_pps for r in runs]),
        "rx_pps": spread([r.rx_pps for r in runs]),
        "loss": spread([r.loss for r in runs]),
        "latency_us": {name: spread([getattr(r, f"{name}_us") for r in runs])
                       for name in ("p50", "p99", "p999")},
        "cpu_busy": {f"cpu{i}": spread([r.cpu[i] for r in runs]) for i in range(n_cpus)},
        "share_spread": spread([r.share_spread for r in runs]),
    }


def characterize(system: str, peer: Peer, mode: Mode) -> list[dict[str, Any]]:
    """Saturation, no-loss rate, latency under load: the records of one system."""
    records = []
    log = logging.getLogger(f"bench.{system}")

    saturation = [measure(peer, 0, mode.duration) for _ in range(mode.runs)]
    records.append(summarize(system, "saturation", 0, saturation))
    sat_rx = statistics.median(r.rx_pps for r in saturation)
    gen_max = statistics.median(r.offered_pps for r in saturation)
    log.info("%s: saturation %.3f Mpps of %.3f offered", system, sat_rx / 1e6, gen_max / 1e6)

    # Bisection for the highest rate with loss under the limit, starting at the
    # saturation throughput. Near the limit loss comes and goes from run to run, so a probe
    # passes only if all its runs do, and the result is confirmed with the full number of
    # runs (median loss under the limit), stepping down 5% at a time if it is not.
    if statistics.median(r.loss for r in saturation) < LOSS_LIMIT:
        best, generator_limited = gen_max, True
    else:
        low, high, probe, generator_limited = 0.0, gen_max, sat_rx, False
        for _ in range(mode.search_steps):
            runs = [measure(peer, probe, mode.duration) for _ in range(mode.probe_runs)]
            passed = all(run.loss < LOSS_LIMIT for run in runs)
            log.debug("%s: probe %.0f pps: loss %s", system, probe,
                      " ".join(f"{run.loss:.4%}" for run in runs))
            if passed:
                low = probe
            else:
                high = probe
            probe = (low + high) / 2
        best = low if low > 0 else probe
    confirmed = False
    for attempt in range(CONFIRM_STEPS):
        if attempt:
            best *= 0.95
        no_loss = [measure(peer, best, mode.duration) for _ in range(mode.runs)]
        if statistics.median(r.loss for r in no_loss) < LOSS_LIMIT or generator_limited:
            confirmed = True
            break
    record = summarize(system, "no_loss", best, no_loss)
    record["generator_limited"] = generator_limited
    # Not confirmed: the loss stayed over the limit at every try; the report says so.
    record["confirmed"] = confirmed
    records.append(record)
    if confirmed:
        log.info("%s: no loss up to %.3f Mpps%s", system,
                 statistics.median(r.rx_pps for r in no_loss) / 1e6,
                 " (the generator's limit)" if generator_limited else "")
    else:
        log.warning("%s: %.3f Mpps still loses %.2f%% after %d tries", system,
                    statistics.median(r.rx_pps for r in no_loss) / 1e6,
                    statistics.median(r.loss for r in no_loss) * 100, CONFIRM_STEPS)

    for fraction in LOAD_FRACTIONS:
        target = best * fraction
        runs = [measure(peer, target, mode.duration) for _ in range(mode.runs)]
        records.append(summarize(system, f"load_{round(fraction * 100)}", target, runs))
    return records


# Systems under test. Each is a context manager factory: set up, yield, tear down.

SystemFactory = Callable[["Bench"], contextlib.AbstractContextManager[None]]


class PinnedDistributor(DistributorProcess):
    """`pgwfwd run` in the lab, pinned to the forwarder's CPU."""

    @property
    def argv(self) -> list[str]:
        return pinned(FWD_CPU, super().argv)


@contextlib.contextmanager
def pgwfwd_system(bench: Bench, policy: str) -> Iterator[None]:
    """`pgwfwd run --policy POLICY`, its PGWs registered and resolved."""
    distributor = PinnedDistributor(bench.lab, ["--policy", policy])
    sim = PgwSimulator(bench.lab.vip, list(PGWS), reg_port=REG_PORT,
                       netns=bench.lab.config.peers_netns)
    try:
        distributor.start()
        sim.start()
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            status = distributor.status()
            pgws: Any = status["pgws"]
            if len(pgws) == len(PGWS) and all(p["mac"] for p in pgws):
                break
            if time.monotonic() > deadline:
                raise BenchError(f"pgwfwd: PGWs not forwardable: {pgws}")
            time.sleep(0.1)
        if status.get("policy") != policy:
            raise BenchError(f"pgwfwd: runs policy {status.get('policy')}, not {policy}")
        yield
        bench.notes.setdefault("pgwfwd_counters", {})[policy] = (
            distributor.status()["counters"])
    except LabError as error:
        raise BenchError(f"pgwfwd: {error}") from None
    finally:
        sim.stop()
        distributor.close()


def _fwd_argv(bench: Bench, mode: str, obj: str) -> list[str]:
    argv = [str(BUILD / "fwd"), mode, "--iface", bench.lab.config.ld_iface,
            "--obj", str(BUILD / obj), "--vip", bench.lab.vip,
            "--gtp-port", str(GTP_PORT), "--reg-port", str(REG_PORT)]
    for addr, port, weight in PGWS:
        argv += ["--pgw", f"{addr}:{port}:{bench.peer_mac}:{weight}"]
    return argv


@contextlib.contextmanager
def helper_system(bench: Bench, name: str, argv: list[str], cpu: int) -> Iterator[None]:
    child = Child(name, pinned(cpu, bench.lab.ld_command(argv)))
    try:
        child.wait_ready()
        yield
    finally:
        child.stop()
        if child.result:
            bench.notes.setdefault("helper_counters", {})[name] = child.result


@contextlib.contextmanager
def xsk_system(bench: Bench) -> Iterator[None]:
    with helper_system(bench, "xsk", _fwd_argv(bench, "xsk", "xskredir.bpf.o"), FWD_CPU):
        yield


@contextlib.contextmanager
def kernel_system(bench: Bench) -> Iterator[None]:
    # XDP runs where veth0 receives, on the generator's CPU; the pinning is nominal.
    with helper_system(bench, "kernel", _fwd_argv(bench, "kernel", "kfwd.bpf.o"), FWD_CPU):
        yield


@contextlib.contextmanager
def pass_program(bench: Bench) -> Iterator[None]:
    """XDP_PASS on veth0: veth takes XDP_TX frames only on an end that runs XDP."""
    argv = [str(BUILD / "fwd"), "pass", "--iface", bench.lab.config.ld_iface,
            "--obj", str(BUILD / "pass.bpf.o")]
    with helper_system(bench, "pass", argv, FWD_CPU):
        yield


@contextlib.contextmanager
def relay_system(bench: Bench) -> Iterator[None]:
    argv = [sys.executable, str(BENCH_DIR / "relay.py"), "--vip", bench.lab.vip,
            "--gtp-port", str(GTP_PORT), "--reg-port", str(REG_PORT)]
    for addr, port, weight in PGWS:
        argv += ["--pgw", f"{addr}:{port}:{weight}"]
    with pass_program(bench), helper_system(bench, "relay", argv, FWD_CPU):
        yield


NGINX_CONF = """\
# Written by bench/suite.py for one run.
worker_processes 1;
worker_rlimit_nofile 65536;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
{load_module}
events {{ worker_connections 16384; }}
stream {{
    upstream pgws {{
{servers}
    }}
    server {{
        listen {vip}:{port} udp;
        proxy_pass pgws;
        proxy_responses 0;
        proxy_timeout 1s;
    }}
}}
"""
NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")


@contextlib.contextmanager
def nginx_system(bench: Bench) -> Iterator[None]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    with tempfile.TemporaryDirectory(prefix="bench-nginx-") as directory:
        conf = Path(directory) / "nginx.conf"
        servers = "\n".join(f"        server {addr}:{port} weight={weight};"
                            for addr, port, weight in PGWS)
        load_module = (f"load_module {NGINX_STREAM_MODULE};"
                       if NGINX_STREAM_MODULE.exists() else "")
        conf.write_text(NGINX_CONF.format(dir=directory, load_module=load_module,
                                          servers=servers, vip=bench.lab.vip, port=GTP_PORT))
        argv = [nginx, "-p", directory, "-c", str(conf), "-e", f"{directory}/error.log"]
        with pass_program(bench):
            child = Child("nginx", pinned(FWD_CPU, bench.lab.ld_command(argv)))
            try:
                bench.wait_forwarding("nginx", child)
                yield
            finally:
                child.stop()


#: The systems, in the order they run and are reported. A pgwfwd variant is one line.
SYSTEMS: dict[str, tuple[str, SystemFactory]] = {
    "pgwfwd-wrr": ("pgwfwd --policy wrr", lambda bench: pgwfwd_system(bench, "wrr")),
    "pgwfwd-teid": ("pgwfwd --policy teid", lambda bench: pgwfwd_system(bench, "teid")),
    "xsk": ("bare AF_XDP forwarder", xsk_system),
    "kernel": ("in-kernel XDP forwarder", kernel_system),
    "relay": ("Python socket relay", relay_system),
    "nginx": ("nginx stream (UDP)", nginx_system),
}
#: The systems that the ratios compare: each pgwfwd variant against each baseline.
SUBJECTS = tuple(key for key in SYSTEMS if key.startswith("pgwfwd"))
BASELINES = ("xsk", "kernel", "relay", "nginx")


class Bench:
    def __init__(self, mode: Mode) -> None:
        self.mode = mode
        self.lab = Lab(LabConfig.with_prefix(LAB_PREFIX))
        self.peer: Peer | None = None
        self.peer_mac = ""
        self.notes: dict[str, Any] = {}

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        self.lab.up(replace=True)
        try:
            cfg = self.lab.config
            ld_mac = read_mac(self.lab, cfg.ld_netns, cfg.ld_iface)
            self.peer_mac = read_mac(self.lab, cfg.peers_netns, cfg.peer_iface)
            argv = [str(BUILD / "peer"), "--iface", cfg.peer_iface, "--dst-mac", ld_mac,
                    "--vip", cfg.vip, "--gtp-port", str(GTP_PORT),
                    "--sources", ",".join(cfg.sgw_addresses), "--teids", str(TEIDS),
                    "--gen", str(BUILD / "gen.bpf.o"), "--sink", str(BUILD / "sink.bpf.o")]
            self.peer = Peer("peer", pinned(GEN_CPU, self.lab.peers_command(argv)))
            try:
                self.peer.wait_ready()
                yield
            finally:
                self.peer.stop()
        finally:
            self.lab.down()

    def wait_forwarding(self, name: str, child: Child) -> None:
        """Until a short burst gets through (for systems that print no ready line)."""
        assert self.peer is not None
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if child.process.poll() is not None:
                raise BenchError(f"{name}: exited with {child.process.returncode}:\n"
                                 f"{child.stderr.strip()}")
            if measure(self.peer, 10_000, 0.05).received > 0:
                return
            time.sleep(0.2)
        raise BenchError(f"{name}: nothing forwarded after {READY_TIMEOUT:.0f} s")

    def run_system(self, key: str) -> list[dict[str, Any]]:
        assert self.peer is not None
        label, factory = SYSTEMS[key]
        with factory(self):
            # Warm up: ARP, the first table, page pools.
            measure(self.peer, 10_000, 0.2)
            records = characterize(key, self.peer, self.mode)
        for record in records:
            record["label"] = label
        return records


def background_load(seconds: float = 1.0) -> list[float]:
    """How busy each CPU is before the benchmark starts: other work on the machine skews
    every number, so the report carries it."""
    before = cpu_times()
    time.sleep(seconds)
    return cpu_busy(before, cpu_times())


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="ascii") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"nproc": os.cpu_count(), "kernel": platform.release(), "cpu": model,
            "gen_cpu": GEN_CPU, "fwd_cpu": FWD_CPU}


def ratios(records: list[dict[str, Any]], subject: str) -> dict[str, Any]:
    """subject / baseline for the no-loss rate and the saturation throughput (medians)."""
    def value(system: str, point: str) -> float | None:
        for record in records:
            if record["system"] == system and record["point"] == point:
                return float(record["rx_pps"]["median"])
        return None

    result: dict[str, Any] = {}
    for baseline in BASELINES:
        entry = {}
        for point in ("no_loss", "saturation"):
            ours, theirs = value(subject, point), value(baseline, point)
            if ours is not None and theirs:
                entry[point] = ours / theirs
        if entry:
            result[baseline] = entry
    return result


# Reports


def _fmt_spread(value: dict[str, float], scale: float = 1.0, digits: int = 3) -> str:
    return (f"{value['median'] / scale:.{digits}f} "
            f"({value['min'] / scale:.{digits}f}-{value['max'] / scale:.{digits}f})")


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# pgwfwd benchmark", "",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), Linux {m['kernel']}; generator on CPU "
        f"{m['gen_cpu']}, systems on CPU {m['fwd_cpu']}. Mode: {report['mode']} "
        f"({report['settings']['runs']} runs of {report['settings']['duration']} s per point; "
        f"median (min-max)). 64-byte GTP-U frames; sink: XDP counter and drop on the peer. "
        f"CPU busy before the start (other work): "
        f"{', '.join(f'{b:.0%}' for b in m.get('background_busy', []))}. "
        f"PGW share min/max: the least over the most datagrams per unit of weight that a PGW "
        f"received at the no-loss rate (1: exactly by weight; the generator rolls "
        f"{TEIDS} TEIDs).",
        "",
        "| system | no-loss Mpps | saturation Mpps | p50 / p99 / p99.9 us at 50% | "
        "CPU gen / fwd at 90% | PGW share min/max |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    by_key = {(r["system"], r["point"]): r for r in report["records"]}
    for key in report["systems"]:
        no_loss, sat = by_key.get((key, "no_loss")), by_key.get((key, "saturation"))
        half, busy = by_key.get((key, "load_50")), by_key.get((key, "load_90"))
        if not (no_loss and sat and half and busy):
            continue
        limited = " (gen. limit)" if no_loss.get("generator_limited") else ""
        if not no_loss.get("confirmed", True):
            limited = f" (not confirmed: loss {no_loss['loss']['median']:.2%})"
        latency = " / ".join(f"{half['latency_us'][p]['median']:.0f}"
                             for p in ("p50", "p99", "p999"))
        cpu = " / ".join(f"{busy['cpu_busy'][f'cpu{c}']['median']:.0%}"
                         for c in (m["gen_cpu"], m["fwd_cpu"]))
        lines.append(f"| {no_loss['label']} | {_fmt_spread(no_loss['rx_pps'], 1e6)}{limited} "
                     f"| {_fmt_spread(sat['rx_pps'], 1e6)} | {latency} | {cpu} "
                     f"| {no_loss['share_spread']['median']:.3f} |")

    subjects = [key for key in SUBJECTS if report["ratios"].get(key)]
    if not subjects:
        return "\n".join(lines) + "\n"
    lines += ["", "Ratios pgwfwd / baseline (medians of this run; no-loss rate, saturation):",
              "", "| baseline | " + " | ".join(
                  f"{SYSTEMS[key][0]}: no loss | saturation" for key in subjects) + " |",
              "| --- |" + " --- | --- |" * len(subjects)]
    for baseline in BASELINES:
        cells = []
        for key in subjects:
            entry = report["ratios"][key].get(baseline, {})
            cells += [f"{entry.get(point, float('nan')):.2f}"
                      for point in ("no_loss", "saturation")]
        if any(cell != "nan" for cell in cells):
            lines.append(f"| {SYSTEMS[baseline][0]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = report["records"]
    systems = report["systems"]
    labels = [SYSTEMS[key][0] for key in systems]
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5))

    def get(key: str, point: str) -> dict[str, Any] | None:
        return next((r for r in records if r["system"] == key and r["point"] == point), None)

    positions = range(len(systems))
    for offset, point, name in ((-0.2, "no_loss", "no loss (<0.1%)"),
                                (0.2, "saturation", "at saturation")):
        values, errors = [], [[], []]
        for key in systems:
            record = get(key, point)
            rx = record["rx_pps"] if record else {"median": 0, "min": 0, "max": 0}
            values.append(rx["median"] / 1e6)
            errors[0].append((rx["median"] - rx["min"]) / 1e6)
            errors[1].append((rx["max"] - rx["median"]) / 1e6)
        left.bar([p + offset for p in positions], values, width=0.4, yerr=errors,
                 capsize=3, label=name)
    left.set_xticks(list(positions), labels, rotation=20, ha="right")
    left.set_ylabel("Mpps forwarded")
    left.set_title("Throughput (median, min-max)")
    left.legend()

    for key, label in zip(systems, labels):
        points = [get(key, f"load_{round(f * 100)}") for f in LOAD_FRACTIONS]
        points = [p for p in points if p]
        if not points:
            continue
        x = [p["offered_pps"]["median"] / 1e6 for p in points]
        p50 = [p["latency_us"]["p50"]["median"] for p in points]
        p99 = [p["latency_us"]["p99"]["median"] for p in points]
        line, = right.plot(x, p50, marker="o", label=f"{label} p50")
        right.plot(x, p99, marker="^", linestyle="--", color=line.get_color(),
                   label=f"{label} p99")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("offered Mpps (10/50/90% of the no-loss rate)")
    right.set_ylabel("one-way latency, us")
    right.set_title("Latency under load")
    right.legend(fontsize=7)
    m = report["machine"]
    figure.suptitle(f"pgwfwd benchmark: {m['nproc']} CPUs, Linux {m['kernel']}, "
                    f"{report['mode']} mode")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def start_cli(parser: argparse.ArgumentParser, verbose: bool) -> None:
    """Logging for a bench command, and its one requirement: root."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("pyroute2", "pgwfwd"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces, XDP)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="pgwfwd side by side with baselines")
    parser.add_argument("--quick", action="store_true", help="fewer, shorter runs")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help=f"comma-separated, from {','.join(SYSTEMS)}")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    parser.add_argument("--micro-json", type=Path, default=None,
                        help="pytest-benchmark JSON to fold into the report")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)

    start_cli(parser, args.verbose)
    systems = [key.strip() for key in args.systems.split(",") if key.strip()]
    unknown = [key for key in systems if key not in SYSTEMS]
    if unknown:
        parser.error(f"unknown systems: {', '.join(unknown)}")
    missing = [name for name in ("peer", "fwd", "gen.bpf.o", "sink.bpf.o")
               if not (BUILD / name).exists()]
    if missing:
        parser.error(f"not built: {', '.join(missing)} (run make -C bench)")

    # SIGTERM tears down like Ctrl-C.
    def interrupt(signo: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)

    mode = QUICK if args.quick else FULL
    idle_busy = background_load()
    if max(idle_busy) > 0.1:
        logger.warning("other work keeps the CPUs busy before the start (%s): expect noise",
                       ", ".join(f"cpu{i} {busy:.0%}" for i, busy in enumerate(idle_busy)))
    bench = Bench(mode)
    records: list[dict[str, Any]] = []
    failures: dict[str, str] = {}
    started = time.monotonic()
    try:
        with bench.running():
            for key in systems:
                logger.info("%s: measuring", key)
                try:
                    records += bench.run_system(key)
                except BenchError as error:
                    logger.error("%s: %s", key, error)
                    failures[key] = str(error)
    except KeyboardInterrupt:
        logger.error("interrupted: lab and helpers removed")
        return 130

    report: dict[str, Any] = {
        "machine": machine() | {"background_busy": idle_busy},
        "mode": "quick" if args.quick else "full",
        "settings": dataclasses.asdict(mode) | {"loss_limit": LOSS_LIMIT, "frame_bytes": 64,
                                                 "pgws": PGWS, "teids": TEIDS},
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "elapsed_s": time.monotonic() - started,
        "systems": [key for key in systems if key not in failures],
        "failures": failures,
        "records": records,
        "ratios": {subject: ratios(records, subject) for subject in SUBJECTS
                   if subject in systems},
        "notes": bench.notes,
    }
    if args.micro_json and args.micro_json.exists():
        report["micro"] = micro_summary(json.loads(args.micro_json.read_text()))

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    if "micro" in report:
        text += micro_markdown(report["micro"])
    (args.out / "latest.md").write_text(text)
    chart(report, args.out / "latest.png")
    print(text)
    return 1 if failures else 0


def micro_summary(data: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"name": b["name"], "mean_s": b["stats"]["mean"], "median_s": b["stats"]["median"],
             "min_s": b["stats"]["min"], "max_s": b["stats"]["max"],
             "rounds": b["stats"]["rounds"], "extra": b.get("extra_info", {})}
            for b in data.get("benchmarks", [])]


def micro_markdown(micro: list[dict[str, Any]]) -> str:
    """The micro-benchmarks as three tables: the C path per policy (extra "path"), table
    builds (extra "table"), and the rest."""
    c_path = [entry for entry in micro if "path" in entry["extra"]]
    builds = [entry for entry in micro if "table" in entry["extra"]]
    others = [entry for entry in micro if entry not in c_path and entry not in builds]
    lines = ["", "## Micro-benchmarks (pytest-benchmark)"]

    if c_path:
        lines += ["", "C per-frame path (parse, select, rewrite or answer) over batches of 64 "
                  "fresh 64-byte frames in a C loop, the copy of each batch taken off; "
                  "ns per packet, median (min-max) over the rounds:", "",
                  "| path | ns per packet | Mpps per core | table |", "| --- | --- | --- | --- |"]
        for entry in c_path:
            extra = entry["extra"]
            table = ", ".join(f"{name.replace('_', ' ')} {extra[name]}"
                              for name in ("slots", "fine_slots", "fine_markers")
                              if name in extra)
            lines.append(f"| {extra['path']} | {extra['ns_per_packet']:.1f} "
                         f"({extra['ns_per_packet_min']:.1f}-{extra['ns_per_packet_max']:.1f})"
                         f" | {extra['mpps_per_core']:.1f} | {table} |")

    if builds:
        lines += ["", "Table builds, median (min-max); memory: the peak that tracemalloc saw "
                  "during one build, and the table's own arrays:", "",
                  "| table | PGWs | ms | peak KiB | table KiB | notes |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for entry in builds:
            extra = entry["extra"]
            notes = ", ".join(f"{name.replace('_', ' ')} {extra[name]}"
                              for name in ("slots", "fine_slots", "moved_slots")
                              if name in extra)
            lines.append(f"| {extra['table']} | {extra['pgws']} "
                         f"| {_fmt_spread(_seconds(entry), 1e-3, 3)} "
                         f"| {extra['peak_kib']:.0f} | {extra['table_kib']:.0f} | {notes} |")

    if others:
        lines += ["", "| benchmark | median (min-max) | notes |", "| --- | --- | --- |"]
        for entry in others:
            notes = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in entry["extra"].items())
            lines.append(f"| {entry['name']} | {_fmt_spread(_seconds(entry), 1e-6, 1)} us "
                         f"| {notes} |")
    return "\n".join(lines) + "\n"


def _seconds(entry: dict[str, Any]) -> dict[str, float]:
    return {"median": entry["median_s"], "min": entry["min_s"], "max": entry["max_s"]}


if __name__ == "__main__":
    sys.exit(main())

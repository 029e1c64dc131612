"""pgwfwd's soak: one constant rate for a long time, then the checks that a long run must pass.

    python bench/soak.py [--duration 600] [--rate PPS] [--interval 5] [--warmup 30]

Runs `pgwfwd run --policy wrr` with 4 PGWs in the benchmark's lab (bench/suite.py: same
namespaces, generator, sink, CPUs). Without --rate, a short bisection first finds the
highest rate with less than 0.1% loss and the soak offers SOAK_FRACTION of it. Every
--interval seconds it records pgwfwd's RSS, its counters and frame accounting, and the
sink's counts. Once the traffic has stopped it checks:

- frames conserved on every queue (fill + in_flight + held == n_frames);
- RSS stable: the largest and the last sample within RSS_LIMIT of the one after warm-up;
- no wrong packet at the PGWs: every datagram the sink counted went to a registered PGW
  address and port, with valid IPv4 header and UDP checksums;
- the accounting: generated = received by the sink + pgwfwd's counted drops + the
  kernel's drops (AF_XDP socket and veth counters); the difference is reported.

Writes soak.json and soak.md to --out (bench/results). Exit status: 0 all checks
passed, 1 a check failed, 2 the soak could not run, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

# suite puts the repository first on sys.path: pgwfwd comes from there, not the venv.
from suite import (BENCH_DIR, BUILD, FULL, LOSS_LIMIT, PGWS, SINK_COUNTED, Bench,
                   BenchError, Peer, background_load, machine, measure, percentiles_us,
                   pgwfwd_system, spread, start_cli)

from pgwfwd.distributor import RUN_DIR, query
from pgwfwd.lab import NETNS_DIR, DistributorProcess, LabError, netns_command

logger = logging.getLogger("bench.soak")

POLICY = "wrr"
#: The soak's rate as a fraction of the no-loss rate the bisection finds.
SOAK_FRACTION = 0.85
#: Bisection for the no-loss rate: probes and seconds per probe.
SEARCH_STEPS = 6
PROBE_SECONDS = 1.0
RSS_LIMIT = 0.05
#: Sink counters that suite.py does not read (enum bench_sink_counter).
SINK_BAD_IP_SUM, SINK_BAD_UDP_SUM = 3, 4
#: The AF_XDP socket's XDP_STATISTICS that are frames the kernel dropped.
XSK_DROPS = ("rx_dropped", "rx_ring_full", "rx_invalid_descs")
#: XDP program counters of GTP-U that did not reach a socket and is not forwarded.
XDP_DROPS = ("no_socket",)
QUIESCENT_TIMEOUT = 5.0


# Reading the system under test and the kernel


def control_status(bench: Bench) -> dict[str, Any]:
    """The status answer of the pgwfwd in the lab, from its control socket: what `pgwfwd
    status --json` prints, without starting a Python process every few seconds."""
    cfg = bench.lab.config
    netns_inode = os.stat(os.path.join(NETNS_DIR, cfg.ld_netns)).st_ino
    path = os.path.join(RUN_DIR, f"{netns_inode}-{cfg.ld_iface}.sock")
    answer: dict[str, Any] = query(path, {"cmd": "status"})
    return answer


def cli_status(bench: Bench) -> dict[str, Any]:
    """`pgwfwd status --json` run in the lab, for the final checks."""
    probe = DistributorProcess(bench.lab)
    try:
        return dict(probe.status())
    finally:
        probe.close()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"pgwfwd: no VmRSS for pid {pid}")


def link_drops(netns: str, iface: str) -> dict[str, int]:
    """Frames the interface dropped: `ip -s link` (on veth, rx_dropped takes in the XDP
    redirects to an AF_XDP socket that failed, so it holds the sockets' drops too) and the
    driver's XDP transmit errors (`ethtool -S`, *_errors). Not the per-queue copies of
    rx_dropped nor xdp_drops: on the peer's end those are the sink's own drops."""
    result = subprocess.run(["ip", "-n", netns, "-s", "-j", "link", "show", "dev", iface],
                            capture_output=True, text=True, check=True, timeout=10)
    stats = json.loads(result.stdout)[0]["stats64"]
    drops = {f"{direction}_{name}": int(stats[direction][name])
             for direction in ("rx", "tx") for name in ("dropped", "errors")}

    # Not every driver has statistics for ethtool: then only ip's.
    result = subprocess.run(netns_command(netns, ["ethtool", "-S", iface]),
                            capture_output=True, text=True, timeout=10, check=False)
    for line in result.stdout.splitlines()[1:]:
        name, _, value = line.strip().partition(":")
        if name.endswith("_errors") and value.strip().isdigit():
            drops[f"ethtool_{name}"] = int(value)
    return drops


def kernel_drops(bench: Bench) -> dict[str, int]:
    cfg = bench.lab.config
    return ({f"{cfg.ld_iface}.{k}": v for k, v in link_drops(cfg.ld_netns, cfg.ld_iface).items()}
            | {f"{cfg.peer_iface}.{k}": v
               for k, v in link_drops(cfg.peers_netns, cfg.peer_iface).items()})


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {name: value - before.get(name, 0) for name, value in after.items()}


def counted_drops(counters: dict[str, Any]) -> dict[str, int]:
    """pgwfwd's own drop counters (by reason) and its XDP program's."""
    drops = {f"drop.{name}": int(value) for name, value in counters["drops"].items()}
    drops |= {f"xdp.{name}": int(counters["xdp"].get(name, 0)) for name in XDP_DROPS}
    return drops


def socket_drops(counters: dict[str, Any]) -> dict[str, int]:
    """The AF_XDP sockets' drops (XDP_STATISTICS), summed over the queues: the part of
    the interface's rx_dropped that the sockets account for, reported apart."""
    return {f"xsk.{name}": sum(int(q["kernel"].get(name, 0)) for q in counters["queues"])
            for name in XSK_DROPS}


def frames_conserved(counters: dict[str, Any]) -> bool:
    return all(f["fill"] + f["in_flight"] + f["held"] == f["n_frames"]
               for f in (q["frames"] for q in counters["queues"]))


# The soak


def find_rate(peer: Peer) -> dict[str, float]:
    """The highest rate with loss under LOSS_LIMIT, by bisection from the saturation
    throughput (like suite.characterize, shorter: one probe of PROBE_SECONDS per step)."""
    saturation = measure(peer, 0, PROBE_SECONDS)
    low, high, probe = 0.0, saturation.offered_pps, saturation.rx_pps
    for _ in range(SEARCH_STEPS):
        run = measure(peer, probe, PROBE_SECONDS)
        logger.debug("probe %.0f pps: loss %.4f%%", probe, run.loss * 100)
        if run.loss < LOSS_LIMIT:
            low = probe
        else:
            high = probe
        probe = (low + high) / 2
    if low == 0:
        raise BenchError(f"no rate down to {high:.0f} pps stays under "
                         f"{LOSS_LIMIT:.1%} loss")
    return {"saturation_rx_pps": saturation.rx_pps, "no_loss_pps": low}


class Sampler:
    """Sends for the whole soak in chunks of one interval and samples pgwfwd halfway
    through each chunk (while the traffic flows) and the sink after it."""

    def __init__(self, bench: Bench, rate: float, interval: float) -> None:
        assert bench.peer is not None
        self.bench = bench
        self.peer: Peer = bench.peer
        self.rate = rate
        self.interval = interval
        self.samples: list[dict[str, Any]] = []
        self.generated = 0

    def run(self, duration: float) -> None:
        started = time.monotonic()
        n_chunks = math.ceil(duration / self.interval - 1e-9)
        last_counted = 0
        for index in range(n_chunks):
            seconds = min(self.interval, duration - index * self.interval)
            sent: dict[str, Any] = {}
            # XXX: each chunk is its own test run, so the traffic pauses for about 75 ms
            # (the run's set-up and the peer's alarm margin) every interval: the peer
            # answers no other command while it sends.
            sender = threading.Thread(target=self._send, args=(seconds, sent), daemon=True)
            sender.start()
            sender.join(seconds / 2)
            status = control_status(self.bench)
            rss = rss_kib(int(status["pid"]))
            sender.join()
            if "failure" in sent or "sent" not in sent:
                raise BenchError(f"generator failed: {sent.get('failure', sent)}")

            self.generated += int(sent["sent"])
            sink = self.peer.command("read")
            counted = int(sink["counters"][SINK_COUNTED])
            counters = status["counters"]
            sample = {
                "t": round(time.monotonic() - started, 3),
                "rss_kib": rss,
                "offered_pps": sent["sent"] / sent["elapsed"],
                "sink_pps": (counted - last_counted) / sent["elapsed"],
                "loss": 1 - (counted - last_counted) / sent["sent"] if sent["sent"] else 0.0,
                "generated": self.generated,
                "rx_packets": counters["rx_packets"],
                "tx_packets": counters["tx_packets"],
                "drops": {name: value for name, value in counted_drops(counters).items()
                          if value},
                "xsk": socket_drops(counters),
                "frames": [q["frames"] for q in counters["queues"]],
                "sink": {"counted": counted, "dests": sink["dests"],
                         "bad_ip_sum": sink["counters"][SINK_BAD_IP_SUM],
                         "bad_udp_sum": sink["counters"][SINK_BAD_UDP_SUM]},
            }
            last_counted = counted
            self.samples.append(sample)
            logger.info("t %5.0f s: offered %.3f Mpps, sink %.3f Mpps, rss %d KiB, drops %s",
                        sample["t"], sample["offered_pps"] / 1e6, sample["sink_pps"] / 1e6,
                        rss, sample["drops"] or "none")

    def _send(self, seconds: float, result: dict[str, Any]) -> None:
        try:
            answer = self.peer.command(f"gen {self.rate:.0f} {seconds}")
        except (BenchError, OSError, ValueError) as error:
            result["failure"] = str(error)
            return
        if answer.get("error"):
            result["failure"] = str(answer)
            return
        result.update(answer)


def wait_drained(peer: Peer) -> dict[str, Any]:
    """The sink once two reads 50 ms apart agree (as suite.measure does)."""
    sink = peer.command("read")
    for _ in range(40):
        time.sleep(0.05)
        again = peer.command("read")
        if again["counters"][SINK_COUNTED] == sink["counters"][SINK_COUNTED]:
            return again
        sink = again
    return sink


def wait_quiescent(bench: Bench) -> dict[str, Any]:
    """pgwfwd's status once every queue's frames add up (frames on their way back through
    the completion ring count as in flight for a moment), or the last one."""
    deadline = time.monotonic() + QUIESCENT_TIMEOUT
    status = cli_status(bench)
    while not frames_conserved(status["counters"]) and time.monotonic() < deadline:
        time.sleep(0.2)
        status = cli_status(bench)
    return status


def check(samples: list[dict[str, Any]], warmup: float, final: dict[str, Any],
          sink: dict[str, Any], before: dict[str, Any], generated: int) -> dict[str, Any]:
    """The soak's verdicts and the figures they rest on."""
    counters = final["counters"]
    checks: dict[str, Any] = {}

    checks["frames_conserved"] = {
        "pass": frames_conserved(counters),
        "queues": [q["frames"] for q in counters["queues"]],
    }

    warm = next((s for s in samples if s["t"] >= warmup), samples[-1])
    rss = [s["rss_kib"] for s in samples if s["t"] >= warm["t"]]
    max_ratio, last_ratio = max(rss) / warm["rss_kib"], rss[-1] / warm["rss_kib"]
    # The trend too: a slow leak passes a 10-minute bound and fails in production.
    times = [s["t"] for s in samples if s["t"] >= warm["t"]]
    slope = (statistics.linear_regression(times, rss).slope * 60
             if len(set(times)) > 1 else 0.0)
    checks["rss_stable"] = {
        "pass": max_ratio <= 1 + RSS_LIMIT and abs(last_ratio - 1) <= RSS_LIMIT,
        "warm_t": warm["t"], "warm_kib": warm["rss_kib"], "max_kib": max(rss),
        "last_kib": rss[-1], "first_kib": samples[0]["rss_kib"],
        "max_over_warm": max_ratio, "last_over_warm": last_ratio,
        "slope_kib_per_min": slope,
    }

    registered = {f"{addr}:{port}" for addr, port, _ in PGWS}
    wrong = {dest: n for dest, n in sink["dests"].items() if dest not in registered}
    bad_ip, bad_udp = sink["counters"][SINK_BAD_IP_SUM], sink["counters"][SINK_BAD_UDP_SUM]
    checks["no_wrong_packets"] = {
        "pass": not wrong and bad_ip == 0 and bad_udp == 0,
        "wrong_destinations": wrong, "bad_ip_sum": bad_ip, "bad_udp_sum": bad_udp,
        "per_pgw": {dest: sink["dests"].get(dest, 0) for dest in sorted(registered)},
    }

    received = int(sink["counters"][SINK_COUNTED])
    pgwfwd_drops = {k: v for k, v in delta(counted_drops(counters),
                                           before["pgwfwd_drops"]).items() if v}
    xsk_drops = {k: v for k, v in delta(socket_drops(counters),
                                        before["xsk_drops"]).items() if v}
    link = {k: v for k, v in delta(before["link_after"], before["link_drops"]).items() if v}
    kernel_total = sum(link.values())
    difference = generated - received - sum(pgwfwd_drops.values()) - kernel_total
    checks["accounting"] = {
        # Reported, not judged: a difference is what no counter explains.
        "generated": generated, "received": received,
        "pgwfwd_rx": counters["rx_packets"] - before["rx_packets"],
        "pgwfwd_tx": counters["tx_packets"] - before["tx_packets"],
        "pgwfwd_drops": pgwfwd_drops, "kernel_drops": link, "of_which_sockets": xsk_drops,
        "difference": difference,
        "difference_share": difference / generated if generated else 0.0,
        "loss": 1 - received / generated if generated else 0.0,
    }
    return checks


def markdown(report: dict[str, Any]) -> str:
    m, s, checks = report["machine"], report["settings"], report["checks"]
    figures = report["figures"]
    rss, wrong = checks["rss_stable"], checks["no_wrong_packets"]
    acct = checks["accounting"]

    def verdict(name: str) -> str:
        return "pass" if checks[name]["pass"] else "**FAIL**"

    def mpps(value: dict[str, float]) -> str:
        return (f"{value['median'] / 1e6:.3f} ({value['min'] / 1e6:.3f}-"
                f"{value['max'] / 1e6:.3f})")

    frames = "; ".join(f"q{i}: {f['fill']} + {f['in_flight']} + {f['held']} of "
                       f"{f['n_frames']}" for i, f in enumerate(checks["frames_conserved"]
                                                                ["queues"]))
    drops = ", ".join(f"{k} {v}" for k, v in acct["pgwfwd_drops"].items()) or "none"
    kernel = ", ".join(f"{k} {v}" for k, v in acct["kernel_drops"].items()) or "none"
    sockets = ", ".join(f"{k} {v}" for k, v in acct["of_which_sockets"].items()) or "none"
    lines = [
        "# pgwfwd soak", "",
        (f"Machine: {m['nproc']} CPUs ({m['cpu']}), Linux {m['kernel']}; generator on CPU "
        f"{m['gen_cpu']}, pgwfwd on CPU {m['fwd_cpu']}; CPU busy before the start: "
        f"{', '.join(f'{b:.0%}' for b in m['background_busy'])}. {report['date']}."),
        "",
        (f"`pgwfwd run --policy {s['policy']}`, {len(s['pgws'])} PGWs of weight 1, 64-byte "
        f"GTP-U frames, {s['duration']:.0f} s at {s['rate_pps'] / 1e6:.3f} Mpps "
        f"({report['rate']['how']}), a sample every {s['interval']:.0f} s "
        f"({len(report['samples'])} samples; median (min-max) over them)."),
        "",
        "| check | result | figures |", "| --- | --- | --- |",
        f"| frames conserved | {verdict('frames_conserved')} | {frames} |",
        (f"| RSS within {RSS_LIMIT:.0%} | {verdict('rss_stable')} | after warm-up "
        f"({rss['warm_t']:.0f} s) {rss['warm_kib']} KiB, max {rss['max_kib']} KiB "
        f"(x{rss['max_over_warm']:.4f}), last {rss['last_kib']} KiB "
        f"(x{rss['last_over_warm']:.4f}); at start {rss['first_kib']} KiB; trend "
        f"{rss['slope_kib_per_min']:+.1f} KiB/min |"),
        (f"| no wrong packets | {verdict('no_wrong_packets')} | wrong destinations "
        f"{len(wrong['wrong_destinations'])}, bad IPv4 sums {wrong['bad_ip_sum']}, bad UDP "
        f"sums {wrong['bad_udp_sum']}; per PGW "
        f"{', '.join(str(n) for n in wrong['per_pgw'].values())} |"),
        "",
        "| measure | median (min-max) |", "| --- | --- |",
        f"| offered Mpps | {mpps(figures['offered_pps'])} |",
        f"| received at the sink, Mpps | {mpps(figures['sink_pps'])} |",
        (f"| RSS KiB | {figures['rss_kib']['median']:.0f} ({figures['rss_kib']['min']:.0f}-"
        f"{figures['rss_kib']['max']:.0f}) |"),
        (f"| latency p50 / p99 / p99.9 us (whole soak) | "
        f"{' / '.join(f'{v:.0f}' for v in figures['latency_us'])} |"),
        "",
        (f"Accounting: generated {acct['generated']} = received {acct['received']} "
        f"+ pgwfwd's drops ({drops}) + kernel drops ({kernel}; of which AF_XDP sockets: "
        f"{sockets}) "
        f"+ difference {acct['difference']} ({acct['difference_share']:.5%}). "
        f"Loss {acct['loss']:.5%}; pgwfwd counted rx {acct['pgwfwd_rx']}, "
        f"tx {acct['pgwfwd_tx']}."),
    ]
    return "\n".join(lines) + "\n"


def soak(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    assert bench.peer is not None
    peer = bench.peer
    measure(peer, 10_000, 0.2)   # warm up: ARP, the first table

    if args.rate:
        rate, how = args.rate, "given"
        search: dict[str, float] = {}
    else:
        search = find_rate(peer)
        rate = search["no_loss_pps"] * SOAK_FRACTION
        how = (f"{SOAK_FRACTION:.0%} of the {search['no_loss_pps'] / 1e6:.3f} Mpps "
               f"no-loss rate a bisection found")
    logger.info("soak: %.3f Mpps (%s) for %.0f s", rate / 1e6, how, args.duration)

    # Quiescent here: every counter is taken from now on.
    time.sleep(0.5)
    peer.command("reset")
    start = control_status(bench)["counters"]
    before: dict[str, Any] = {
        "pgwfwd_drops": counted_drops(start), "xsk_drops": socket_drops(start),
        "link_drops": kernel_drops(bench), "rx_packets": start["rx_packets"],
        "tx_packets": start["tx_packets"],
    }

    sampler = Sampler(bench, rate, args.interval)
    sampler.run(args.duration)

    sink = wait_drained(peer)
    final = wait_quiescent(bench)
    before["link_after"] = kernel_drops(bench)
    checks = check(sampler.samples, args.warmup, final, sink, before, sampler.generated)

    samples = sampler.samples
    return {
        "rate": {"pps": rate, "how": how} | search,
        "settings": {"policy": POLICY, "pgws": PGWS, "duration": args.duration,
                     "interval": args.interval, "warmup": args.warmup, "rate_pps": rate,
                     "loss_limit": LOSS_LIMIT, "rss_limit": RSS_LIMIT},
        "figures": {
            "offered_pps": spread([s["offered_pps"] for s in samples]),
            "sink_pps": spread([s["sink_pps"] for s in samples]),
            "rss_kib": spread([s["rss_kib"] for s in samples]),
            "latency_us": percentiles_us(sink["hist"], (0.5, 0.99, 0.999)),
        },
        "checks": checks,
        "final_counters": {k: v for k, v in final["counters"].items() if k != "queues"},
        "samples": samples,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="pgwfwd at one rate for a long time")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of traffic")
    parser.add_argument("--rate", type=float, default=0.0,
                        help=f"datagrams/s (default: {SOAK_FRACTION * 100:.0f}%% of the no-loss rate)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds per sample")
    parser.add_argument("--warmup", type=float, default=30.0,
                        help="seconds before the RSS that later samples are held to")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)

    start_cli(parser, args.verbose)
    if args.duration <= 0 or args.interval <= 0 or args.rate < 0:
        parser.error("--duration and --interval must be positive, --rate not negative")
    missing = [name for name in ("peer", "gen.bpf.o", "sink.bpf.o")
               if not (BUILD / name).exists()]
    if missing:
        parser.error(f"not built: {', '.join(missing)} (run make -C bench)")
    if args.warmup >= args.duration:
        logger.warning("warm-up %.0f s is not shorter than the soak: RSS is held to the "
                       "last sample", args.warmup)

    # SIGTERM tears down like Ctrl-C.
    def interrupt(signo: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)

    idle_busy = background_load()
    bench = Bench(FULL)
    try:
        with bench.running(), pgwfwd_system(bench, POLICY):
            result = soak(bench, args)
    except KeyboardInterrupt:
        logger.error("interrupted: lab and helpers removed")
        return 130
    except (BenchError, LabError, OSError) as error:
        logger.error("soak: %s", error)
        return 2

    report = {"machine": machine() | {"background_busy": idle_busy},
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")} | result
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    (args.out / "soak.md").write_text(text)
    print(text)
    verdicts = [check["pass"] for check in report["checks"].values() if "pass" in check]
    return 0 if all(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())

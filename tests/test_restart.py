"""Restarts as an operator meets them: what a killed run leaves behind and how the next
run deals with it, and an XDP program of someone else that pgwfwd must leave alone."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pgwfwd.demo import wait_registered
from pgwfwd.distributor import RUN_DIR
from pgwfwd.lab import NETNS_DIR, DistributorProcess, Lab
from pgwfwd.sim import PgwSimulator, SgwSimulator

pytestmark = pytest.mark.netns

PGWFWD_PROGRAM = "pgwfwd_xdp"
FOREIGN_PROGRAM = "foreign_pass"
FOREIGN_SOURCE = f"""\
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("xdp")
int {FOREIGN_PROGRAM}(struct xdp_md *ctx)
{{
	return XDP_PASS;
}}

char LICENSE[] SEC("license") = "GPL";
"""
EXIT_TIMEOUT = 20.0


def _ip_ld(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "-n", lab.config.ld_netns, *args], capture_output=True,
                          text=True, timeout=10)


def _xdp_programs(lab: Lab) -> list[tuple[str, int]]:
    """(name, id) of each XDP program attached to the distributor's interface."""
    result = _ip_ld(lab, "-j", "link", "show", "dev", lab.config.ld_iface)
    assert result.returncode == 0, result.stderr
    (link,) = json.loads(result.stdout)
    attached = link.get("xdp", {}).get("attached", [])
    return [(entry["prog"]["name"], entry["prog"]["id"]) for entry in attached]


def _control_sockets(lab: Lab) -> list[str]:
    """Control socket files of the distributor's namespace. pgwfwd names them after the
    namespace's inode, which the name under /run/netns shares."""
    prefix = f"{os.stat(os.path.join(NETNS_DIR, lab.config.ld_netns)).st_ino}-"
    with contextlib.suppress(FileNotFoundError):
        return sorted(os.path.join(RUN_DIR, name) for name in os.listdir(RUN_DIR)
                      if name.startswith(prefix))
    return []


def _remove_leftovers(lab: Lab) -> None:
    for mode in ("xdp", "xdpgeneric"):
        _ip_ld(lab, "link", "set", "dev", lab.config.ld_iface, mode, "off")
    for path in _control_sockets(lab):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


RunDistributor = Callable[..., DistributorProcess]


@pytest.fixture
def run_distributor(lab: Lab) -> Iterator[RunDistributor]:
    """Starts `pgwfwd run` in the lab; at teardown stops what still runs and then removes
    whatever a killed or failed run left on the interface."""
    started: list[DistributorProcess] = []

    def start(wait: bool = True) -> DistributorProcess:
        distributor = DistributorProcess(lab)
        started.append(distributor)
        distributor.start(wait=wait)
        return distributor

    try:
        yield start
    finally:
        for distributor in started:
            returncode = distributor.stop()
            print(f"--- {' '.join(distributor.argv)} (exit {returncode})\n"
                  f"{distributor.stderr}")
            distributor.close()
        _remove_leftovers(lab)


def _kill(distributor: DistributorProcess) -> None:
    assert distributor.process is not None
    distributor.process.kill()
    distributor.process.wait(EXIT_TIMEOUT)


def _assert_forwards(lab: Lab, distributor: DistributorProcess, count: int = 200) -> None:
    with PgwSimulator(lab.vip, [(lab.config.pgw_addresses[0], 1)],
                      netns=lab.config.peers_netns) as sim:
        wait_registered(distributor, sim.pgws)
        with SgwSimulator.with_sources(lab.vip, 4, lab.config.sgw_addresses,
                                       netns=lab.config.peers_netns) as sgw:
            assert sgw.send(count, rate=10_000).sent == count
        assert sim.wait_for(count) == count


def test_killed_run_leaves_its_program_and_the_next_run_replaces_it(
    lab: Lab, run_distributor: RunDistributor
) -> None:
    killed = run_distributor()
    ((name, killed_id),) = _xdp_programs(lab)
    assert name == PGWFWD_PROGRAM

    _kill(killed)

    assert _xdp_programs(lab) == [(PGWFWD_PROGRAM, killed_id)]   # SIGKILL cannot detach
    restarted = run_distributor()
    ((name, restarted_id),) = _xdp_programs(lab)
    assert name == PGWFWD_PROGRAM and restarted_id != killed_id
    _assert_forwards(lab, restarted)
    assert restarted.stop() == 0, restarted.stderr
    assert _xdp_programs(lab) == []
    assert _control_sockets(lab) == []


def test_killed_run_leaves_its_control_socket_and_the_next_run_starts(
    lab: Lab, run_distributor: RunDistributor
) -> None:
    killed = run_distributor()
    (socket_path,) = _control_sockets(lab)

    _kill(killed)

    assert _control_sockets(lab) == [socket_path]
    restarted = run_distributor()
    assert restarted.process is not None
    assert restarted.status()["pid"] == restarted.process.pid   # the new run answers
    assert restarted.stop() == 0, restarted.stderr
    assert _control_sockets(lab) == []


@pytest.fixture(scope="module")
def foreign_object(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pass-all XDP object whose program is not pgwfwd's."""
    directory = tmp_path_factory.mktemp("foreign-xdp")
    source, target = directory / "pass.c", directory / "pass.o"
    source.write_text(FOREIGN_SOURCE)
    machine = subprocess.run(["gcc", "-dumpmachine"], check=True, capture_output=True,
                             text=True).stdout.strip()
    subprocess.run(["clang", "-O2", "-target", "bpf", f"-I/usr/include/{machine}",
                    "-c", str(source), "-o", str(target)], check=True, timeout=60)
    return target


@pytest.mark.parametrize("mode", ["xdp", "xdpgeneric"])
def test_foreign_program_makes_run_fail_and_stays(
    lab: Lab, run_distributor: RunDistributor, foreign_object: Path, mode: str
) -> None:
    iface = lab.config.ld_iface
    attach = _ip_ld(lab, "link", "set", "dev", iface, mode, "obj", str(foreign_object),
                    "sec", "xdp")
    try:
        assert attach.returncode == 0, attach.stderr
        foreign = _xdp_programs(lab)
        assert [name for name, _id in foreign] == [FOREIGN_PROGRAM]

        refused = run_distributor(wait=False)
        assert refused.process is not None
        try:
            returncode = refused.process.wait(EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"pgwfwd run still runs after {EXIT_TIMEOUT:.0f} s: it took over "
                        f"the interface:\n{refused.stderr}")

        assert returncode == 1, refused.stderr
        (line,) = refused.stderr.splitlines()
        assert line.startswith("Error: ") and FOREIGN_PROGRAM in line, line
        assert _xdp_programs(lab) == foreign
        assert _control_sockets(lab) == []
    finally:
        _ip_ld(lab, "link", "set", "dev", iface, mode, "off")

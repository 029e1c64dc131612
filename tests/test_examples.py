"""The embedding example of the README runs as shown: examples/embed.py in the lab's
distributor namespace forwards to a registered PGW and prints what a user expects."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pgwfwd.demo import status_pgws
from pgwfwd.lab import Lab, package_env
from pgwfwd.sim import PgwSimulator, SgwSimulator

pytestmark = pytest.mark.netns

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "embed.py"
# Long enough for registration and sending to finish before the last table is printed.
RUN_SECONDS = 4
START_TIMEOUT = 30.0
WEIGHT = 7
COUNT = 200


def _wait_for_text(path: Path, text: str, process: subprocess.Popen[bytes],
                   timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text(errors="replace"):
            return
        if process.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"no {text!r} from the example (exit {process.poll()}):\n"
                         f"{path.read_text(errors='replace')}")


def _served_pgws(lab: Lab) -> set[tuple[str, int]]:
    """The PGWs with a resolved next hop, as `pgwfwd status` shows the example's instance."""
    argv = lab.ld_command([sys.executable, "-m", "pgwfwd", "status", "--json"])
    result = subprocess.run(argv, capture_output=True, text=True, timeout=10,
                            env=package_env())
    return status_pgws(json.loads(result.stdout)) if result.returncode == 0 else set()


def _wait_served(lab: Lab, identity: tuple[str, int], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while identity not in _served_pgws(lab):
        assert time.monotonic() < deadline, f"{identity} not served after {timeout} s"
        time.sleep(0.1)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Ctrl-C, as a user would: the example's with block then detaches cleanly."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _tables(stdout: str) -> list[list[list[str]]]:
    """The PGW tables the example printed, each a list of rows split into cells."""
    blocks = [block.splitlines() for block in stdout.split("\n\n") if block.strip()]
    return [[line.split() for line in block[1:]] for block in blocks
            if block[0].split()[:2] == ["PGW", "WEIGHT"]]


def test_embedding_example_forwards_and_prints_the_pgw_table(lab: Lab, tmp_path: Path) -> None:
    stdout_path, stderr_path = tmp_path / "stdout", tmp_path / "stderr"
    argv = lab.ld_command([sys.executable, str(EXAMPLE), lab.config.ld_iface,
                           str(RUN_SECONDS)])
    with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
        example = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout,
                                   stderr=stderr, env=package_env())
    try:
        _wait_for_text(stderr_path, "forwarding", example, START_TIMEOUT)
        with PgwSimulator(lab.vip, [(lab.config.pgw_addresses[0], WEIGHT)],
                          netns=lab.config.peers_netns) as sim:
            (pgw,) = sim.pgws
            _wait_served(lab, pgw.identity)
            with SgwSimulator.with_sources(lab.vip, 4, lab.config.sgw_addresses,
                                           netns=lab.config.peers_netns) as sgw:
                sent = sgw.send(COUNT, rate=10_000).sent
            received = sim.wait_for(COUNT)
            returncode = example.wait(RUN_SECONDS + 20)
    finally:
        _stop(example)
    output, log = stdout_path.read_text(), stderr_path.read_text()

    assert returncode == 0, f"{output}\n{log}"
    assert (sent, received, pgw.corrupt) == (COUNT, COUNT, 0)
    tables = _tables(output)
    assert len(tables) == RUN_SECONDS, output
    # The last table: the PGW with its weight, all of the share and every datagram.
    assert [row[:4] for row in tables[-1]] == [
        [f"{pgw.address}:{pgw.port}", str(WEIGHT), "100.0%", str(COUNT)]], output
    drops = output.strip().splitlines()[-1]
    assert drops.startswith("drops: ") and "no_pgw 0" in drops, output

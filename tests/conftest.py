"""Shared fixtures: the netns marker, the lab and a distributor running in it.

Tests marked `netns` need root and network namespaces. Elsewhere they skip with the
reason; with CI=true a skip would hide a broken set-up, so they fail instead.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator, Sequence

import pytest

from pgwfwd.lab import DistributorProcess, Lab, LabConfig
from pgwfwd.sim import PgwSimulator

NETNS_MARKER = "netns: needs root and network namespaces (skips elsewhere, fails on CI=true)"

# The test suite's lab has its own namespace names, so that it never removes a lab that
# someone built with `pgwfwd lab up` or that a running demo uses, nor the lab of a test
# run going on in another checkout: the names carry the pid of the run.
TEST_LAB_PREFIX = "pgwfwd-t"


def _remove_labs_of_dead_runs() -> None:
    """A killed run cannot tear its lab down: the next run does, by the pid in the name."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    for line in listing.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = re.fullmatch(rf"{TEST_LAB_PREFIX}(\d+)-(ld|peers)", name)
        if match and not os.path.exists(f"/proc/{match.group(1)}"):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", NETNS_MARKER)


def _netns_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2's ip command"
    if not os.path.exists("/proc/self/ns/net"):
        return "no network namespace support in this kernel"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("netns") is None:
        return

    reason = _netns_unavailable_reason()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and this test cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    """The lab, built once for the session and always torn down (also after failures
    and on Ctrl-C); a leftover from a killed earlier run is replaced."""
    reason = _netns_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)

    _remove_labs_of_dead_runs()
    test_lab = Lab(LabConfig.with_prefix(f"{TEST_LAB_PREFIX}{os.getpid()}"))
    test_lab.up(replace=True)
    try:
        yield test_lab
    finally:
        test_lab.down()


DistributorFactory = Callable[..., DistributorProcess]


@pytest.fixture
def start_distributor(lab: Lab) -> Iterator[DistributorFactory]:
    """Starts `pgwfwd run --iface veth0 ARGS...` in the lab and waits for it to forward.

    At teardown every distributor started here gets SIGTERM and must exit 0; its stderr
    is shown when it does not (or when the test failed, by pytest's captured output).
    """
    started: list[DistributorProcess] = []

    def start(*args: str, wait: bool = True) -> DistributorProcess:
        distributor = DistributorProcess(lab, args)
        started.append(distributor)
        distributor.start(wait=wait)
        return distributor

    try:
        yield start
    finally:
        failures = []
        for distributor in started:
            already_exited = distributor.process is not None and (
                distributor.process.poll() is not None
            )
            returncode = distributor.stop()
            log = distributor.stderr
            distributor.close()
            print(f"--- {' '.join(distributor.argv)} (exit {returncode})\n{log}")
            if not already_exited and returncode != 0:
                failures.append(f"exit {returncode} after SIGTERM:\n{log}")
        if failures:
            pytest.fail("distributor did not stop cleanly: " + "\n".join(failures))


@pytest.fixture
def distributor(
    request: pytest.FixtureRequest, start_distributor: DistributorFactory
) -> DistributorProcess:
    """A forwarding distributor in the lab; its extra arguments can be given with
    `@pytest.mark.parametrize("distributor", [["--queues", "2"]], indirect=True)`."""
    args: Sequence[str] = getattr(request, "param", ())
    return start_distributor(*args)


@pytest.fixture
def pgw_sims(lab: Lab) -> Iterator[Callable[..., PgwSimulator]]:
    """Starts simulated PGWs in the peers' namespace; all are stopped at teardown."""
    started: list[PgwSimulator] = []

    def start(weights: Sequence[int] | Sequence[tuple[str, int]], **kwargs: object
              ) -> PgwSimulator:
        """weights: one PGW per weight on the lab's PGW addresses in turn, or
        (address, weight) pairs."""
        specs = [spec if isinstance(spec, tuple) else (address, spec)
                 for address, spec in zip(lab.config.pgw_addresses, weights)]
        if len(specs) != len(weights):
            raise ValueError("more PGWs than the lab has addresses")
        sim = PgwSimulator(lab.vip, specs, netns=lab.config.peers_netns,
                           record_arrivals=True, **kwargs)  # type: ignore[arg-type]
        started.append(sim)
        sim.start()
        return sim

    try:
        yield start
    finally:
        for sim in started:
            sim.stop(leave=True)

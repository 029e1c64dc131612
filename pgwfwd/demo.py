"""`pgwfwd demo`: the whole product on the lab, checked the way a load tester would.

It builds the lab, runs `pgwfwd run --iface veth0` in the distributor's namespace,
registers three simulated PGWs (weights 10, 50, 30), sends GTP-U from ten simulated SGWs
and checks that every datagram arrived intact and that received/weight agrees within 1%
across the PGWs. Then one PGW stops refreshing; once its registration has expired, a
second round must give it nothing while the others' shares still hold. The lab is torn
down in every case, and the distributor must stop cleanly on SIGTERM.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType

import click

from pgwfwd.errors import PgwfwdError
from pgwfwd.lab import DistributorProcess, Lab, LabConfig
from pgwfwd.sim import PgwSimulator, SgwSimulator, SimPgw

logger = logging.getLogger(__name__)

DEMO_WEIGHTS = (10, 50, 30)
DEMO_SGWS = 10
DEMO_COUNT = 100_000
DEMO_RATE = 25_000.0
SHARE_TOLERANCE = 0.99          # min/max of received/weight, as the load tester checks
EXPIRY = 3.0
EXPIRY_MARGIN = 0.5
REGISTRATION_TIMEOUT = 10.0


class DemoFailure(PgwfwdError, RuntimeError):
    """Something the demo checks did not hold."""


@dataclass
class RoundResult:
    sent: int
    received: int
    corrupt: int
    spread: float               # min/max of received/weight over the live PGWs


DEMO_LAB_PREFIX = "pgwfwd-demo"


def run_demo(
    count: int = DEMO_COUNT,
    rate: float = DEMO_RATE,
    sgws: int = DEMO_SGWS,
    weights: Sequence[int] = DEMO_WEIGHTS,
    lab_config: LabConfig | None = None,
    echo: Callable[[str], None] = click.echo,
) -> None:
    """Run the demo; raises DemoFailure (or another PgwfwdError) when a check fails.
    Whatever happens, the distributor is stopped and the lab removed."""
    # Namespaces of its own: the demo must not take over a lab that someone built with
    # `pgwfwd lab up` and may be using.
    lab = Lab(lab_config or LabConfig.with_prefix(DEMO_LAB_PREFIX))
    if lab.is_up():
        echo(f"{lab.config.ld_netns}: removing a lab left over from an earlier run")
    lab.up(replace=True)
    distributor = DistributorProcess(lab)
    pgw_addresses = lab.config.pgw_addresses[: len(weights)]
    pgws = PgwSimulator(
        lab.vip, list(zip(pgw_addresses, weights, strict=True)), netns=lab.config.peers_netns
    )
    try:
        echo(f"lab up: distributor in {lab.config.ld_netns} ({lab.config.ld_iface} "
             f"{lab.vip}), PGWs and SGWs in {lab.config.peers_netns}")
        distributor.start()
        echo("distributor forwarding")

        pgws.start()
        wait_registered(distributor, pgws.pgws)
        echo("PGWs registered: " + ", ".join(
            f"{pgw.address}:{pgw.port} weight {pgw.weight}" for pgw in pgws.pgws))

        with SgwSimulator.with_sources(
            lab.vip, sgws, lab.config.sgw_addresses, netns=lab.config.peers_netns
        ) as sgw:
            echo(f"\nround 1: {count:,} GTP-U datagrams from {sgws} SGWs at {rate:,.0f}/s")
            first = _send_round(sgw, pgws, count, rate, echo)
            _check_round(first, pgws.pgws)

            leaving = pgws.pgws[-1]
            pgws.stop_refreshing(leaving)
            assert leaving.last_refresh is not None
            wait = leaving.last_refresh + EXPIRY + EXPIRY_MARGIN - time.time()
            echo(f"\n{leaving.address}:{leaving.port} stops refreshing; waiting "
                 f"{wait:.1f} s, past its {EXPIRY:.0f} s expiry")
            time.sleep(max(0.0, wait))

            echo(f"\nround 2: {count:,} datagrams")
            second = _send_round(sgw, pgws, count, rate, echo)
            if leaving.received:
                raise DemoFailure(
                    f"{leaving.address}:{leaving.port} received {leaving.received} "
                    f"datagrams after its registration expired"
                )
            _check_round(second, [pgw for pgw in pgws.pgws if pgw is not leaving])
            echo(f"{leaving.address}:{leaving.port} got nothing after expiry; "
                 f"the others' shares held")
    finally:
        pgws.stop()
        returncode = distributor.stop()
        log = distributor.stderr
        distributor.close()
        lab.down()
        echo("lab down")

    if returncode != 0:
        raise DemoFailure(
            f"distributor exited with {returncode} on SIGTERM (expected 0):\n{log.rstrip()}"
        )
    echo("\ndemo passed: every datagram arrived intact, shares within 1%, expiry held")


def wait_registered(distributor: DistributorProcess, pgws: Sequence[SimPgw]) -> None:
    """Poll `pgwfwd status --json` until every PGW is in the distributor's table."""
    wanted = {(pgw.address, pgw.port) for pgw in pgws}
    deadline = time.monotonic() + REGISTRATION_TIMEOUT
    while time.monotonic() < deadline:
        if wanted <= status_pgws(distributor.status()):
            return
        time.sleep(0.1)
    raise DemoFailure(
        f"PGWs not in the distributor's table after {REGISTRATION_TIMEOUT:.0f} s:\n"
        f"{distributor.stderr.rstrip()}"
    )


def status_pgws(status: object) -> set[tuple[str, int]]:
    """(address, port) of each PGW that `pgwfwd status --json` lists with a resolved
    next-hop MAC, that is, one that is served."""
    assert isinstance(status, dict)
    entries = status.get("pgws", [])
    assert isinstance(entries, list)
    return {(str(entry["addr"]), int(entry["port"])) for entry in entries if entry.get("mac")}


def _send_round(
    sgw: SgwSimulator,
    pgws: PgwSimulator,
    count: int,
    rate: float,
    echo: Callable[[str], None],
) -> RoundResult:
    pgws.reset_counts()
    result = sgw.send(count, rate)
    received = pgws.wait_for(result.sent, timeout=max(10.0, 2 * count / max(rate, 1.0)))

    live = [pgw for pgw in pgws.pgws if pgw.refreshing]
    live_weight = sum(pgw.weight for pgw in live)
    echo(f"{'pgw':<21} {'weight':>6} {'expected':>9} {'received':>9} {'received/weight':>16}")
    for pgw in pgws.pgws:
        expected = pgw.weight / live_weight if pgw.refreshing and live_weight else 0.0
        echo(f"{pgw.address + ':' + str(pgw.port):<21} {pgw.weight:>6} {expected:>9.2%} "
             f"{pgw.received:>9,} {pgw.received / pgw.weight:>16.2f}")

    ratios = [pgw.received / pgw.weight for pgw in live]
    spread = min(ratios) / max(ratios) if ratios and max(ratios) > 0 else 0.0
    corrupt = sum(pgw.corrupt for pgw in pgws.pgws)
    echo(f"sent {result.sent:,} ({result.failed} send errors) in {result.elapsed:.1f} s, "
         f"received {received:,}, corrupt {corrupt}, "
         f"received/weight min/max {spread:.4f} (need >= {SHARE_TOLERANCE})")
    return RoundResult(sent=result.sent, received=received, corrupt=corrupt, spread=spread)


def _check_round(result: RoundResult, live: Sequence[SimPgw]) -> None:
    if result.corrupt:
        raise DemoFailure(f"{result.corrupt} datagrams arrived with a changed payload")
    if result.received != result.sent:
        raise DemoFailure(f"sent {result.sent} datagrams, {result.received} arrived")
    if result.spread < SHARE_TOLERANCE:
        raise DemoFailure(
            f"received/weight min/max {result.spread:.4f} is below {SHARE_TOLERANCE} for "
            + ", ".join(f"{pgw.address} ({pgw.weight})" for pgw in live)
        )


_DEMO_PID = os.getpid()


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Unwind like Ctrl-C does, so that the lab is torn down; a forked child (libraries
    # fork helpers) must not run our clean-up a second time.
    if os.getpid() != _DEMO_PID:
        os._exit(128 + signum)
    raise KeyboardInterrupt


@click.command("demo")
@click.option("--count", default=DEMO_COUNT, show_default=True,
              help="GTP-U datagrams per round.")
@click.option("--rate", default=DEMO_RATE, show_default=True,
              help="Datagrams per second the SGWs send.")
def demo_command(count: int, rate: float) -> None:
    """Run the distributor on the lab with 3 PGWs and 10 SGWs and check shares and
    expiry; exit 0 when everything held. The lab is removed in every case."""
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        run_demo(count=count, rate=rate)
    except PgwfwdError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        raise click.ClickException("interrupted; lab removed") from None
    finally:
        signal.signal(signal.SIGTERM, previous)


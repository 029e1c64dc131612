"""Registration security end to end in the lab: who may register, authenticated
registrations, and an authorised PGW served through a registration storm.

An unauthorised source is one the distributor must not serve: outside --allow, or, with
--auth-key-file, one that sends plain registrations, signs with the wrong key or replays a
registration copied off the wire. Each runs as a simulated PGW with a socket connected to
VIP:3000, so a datagram forwarded to it would arrive and be counted: none may.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from pgwfwd.auth import sign_registration
from pgwfwd.demo import wait_registered
from pgwfwd.lab import DistributorProcess, Lab, package_env
from pgwfwd.sim import PgwSimulator, SgwSimulator, SimPgw

pytestmark = pytest.mark.netns

REG_PORT = 3000
KEY = bytes(range(32))
WRONG_KEY = bytes(range(1, 33))
STORM_SECONDS = 4.0
#: Sockets per storm address: many identities, one token bucket per address.
STORM_PORTS = 16

DistributorFactory = Callable[..., DistributorProcess]


@pytest.fixture
def key_file(tmp_path: Path) -> str:
    path = tmp_path / "registration.key"
    path.write_bytes(KEY)
    path.chmod(0o600)
    return str(path)


def _registered(distributor: DistributorProcess) -> set[tuple[str, int]]:
    entries = distributor.status()["pgws"]
    assert isinstance(entries, list)
    return {(str(entry["addr"]), int(entry["port"])) for entry in entries}


def _refused(distributor: DistributorProcess) -> dict[str, int]:
    counters = distributor.status()["counters"]
    assert isinstance(counters, dict)
    return {name.removeprefix("refused_"): int(count)
            for name, count in counters["registration"].items()
            if name.startswith("refused_")}


def _send_gtpu(lab: Lab, count: int, rate: float) -> None:
    with SgwSimulator.with_sources(lab.vip, 10, lab.config.sgw_addresses,
                                   netns=lab.config.peers_netns) as sgw:
        result = sgw.send(count, rate)
    assert result.failed == 0


def _spread(pgws: Sequence[SimPgw]) -> float:
    ratios = [pgw.received / pgw.weight for pgw in pgws]
    return min(ratios) / max(ratios) if max(ratios) > 0 else 0.0


def _settle(seconds: float = 1.5) -> None:
    # Long enough for every simulated PGW to have refreshed at least once more.
    time.sleep(seconds)


@pytest.mark.parametrize("distributor", [["--allow", "198.18.0.11/32"]], indirect=True)
def test_only_allowed_sources_register(
    lab: Lab, distributor: DistributorProcess, pgw_sims: Callable[..., PgwSimulator]
) -> None:
    allowed_address, outsider_address = lab.config.pgw_addresses[:2]
    allowed = pgw_sims([(allowed_address, 10)])
    outsider = pgw_sims([(outsider_address, 10)])
    wait_registered(distributor, allowed.pgws)
    _settle()

    _send_gtpu(lab, 2000, 10_000.0)
    allowed.wait_for(2000)

    assert _registered(distributor) == {allowed.pgws[0].identity}
    assert (allowed.total_received, outsider.total_received) == (2000, 0)
    assert _refused(distributor)["not_allowed"] >= 2   # its join and a refresh at least


def test_only_authenticated_pgws_register(
    lab: Lab, start_distributor: DistributorFactory, key_file: str,
    pgw_sims: Callable[..., PgwSimulator]
) -> None:
    distributor = start_distributor("--auth-key-file", key_file)
    addresses = lab.config.pgw_addresses
    authorised = pgw_sims([(addresses[0], 10)], auth_key=KEY)
    plain = pgw_sims([(addresses[1], 10)])
    wrong_key = pgw_sims([(addresses[2], 10)], auth_key=WRONG_KEY)
    replayer = pgw_sims([(addresses[3], 10)], refresh_interval=3600.0)
    wait_registered(distributor, authorised.pgws)

    # A registration copied off the wire, replayed from the attacker's address and from
    # the authorised PGW's own identity; the original (the same weight) is accepted.
    (authorised_pgw,) = authorised.pgws
    copied = sign_registration(KEY, authorised_pgw.weight)
    authorised.send_raw(authorised_pgw, copied)
    time.sleep(0.2)
    replayer.send_raw(replayer.pgws[0], copied)
    authorised.send_raw(authorised_pgw, copied)
    _settle()

    _send_gtpu(lab, 2000, 10_000.0)
    authorised.wait_for(2000)

    assert _registered(distributor) == {authorised_pgw.identity}
    assert authorised.total_received == 2000
    assert [sim.total_received for sim in (plain, wrong_key, replayer)] == [0, 0, 0]
    refused = _refused(distributor)
    assert refused["unauthenticated"] >= 2 and refused["bad_hmac"] >= 2
    assert refused["replay"] == 2


STORM_SCRIPT = """
import json, socket, sys, time
vip, port, seconds, per_address = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), \\
    int(sys.argv[4])
addresses = sys.argv[5].split(",")
messages = [bytes.fromhex(text) for text in sys.argv[6].split(",")]
sockets = []
for address in addresses:
    for _ in range(per_address):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((address, 0))
        sock.connect((vip, port))
        sock.setblocking(False)
        sockets.append(sock)
sent = failed = 0
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    for sock in sockets:
        for message in messages:
            try:
                sock.send(message)
                sent += 1
            except OSError:
                failed += 1
received = 0
for sock in sockets:
    while True:
        try:
            sock.recv(65535)
            received += 1
        except BlockingIOError:
            break
        except OSError:
            continue
print(json.dumps({"sent": sent, "failed": failed, "received": received,
                  "sources": len(sockets)}))
"""


def _storm_messages() -> list[bytes]:
    """What an attacker without the key can send: plain, short, forged, replayed."""
    forged = [sign_registration(WRONG_KEY, 100) for _ in range(4)]
    garbage = bytes(52)
    return [(100).to_bytes(4, "big"), b"\x00\x01", *forged, garbage]


def test_authorised_pgws_are_served_through_a_registration_storm(
    lab: Lab, start_distributor: DistributorFactory, key_file: str,
    pgw_sims: Callable[..., PgwSimulator]
) -> None:
    distributor = start_distributor("--auth-key-file", key_file)
    addresses = lab.config.pgw_addresses
    authorised = pgw_sims([(addresses[0], 10), (addresses[1], 30)], auth_key=KEY)
    wait_registered(distributor, authorised.pgws)
    identities = {pgw.identity for pgw in authorised.pgws}

    # One registration of the first authorised PGW, copied off the wire to be replayed.
    copied = sign_registration(KEY, authorised.pgws[0].weight)
    authorised.send_raw(authorised.pgws[0], copied)
    messages = [*_storm_messages(), copied]

    storm_addresses = [*addresses[2:], *lab.config.sgw_addresses[:3]]
    storm = subprocess.Popen(
        lab.peers_command([sys.executable, "-c", STORM_SCRIPT, lab.vip, str(REG_PORT),
                           str(STORM_SECONDS), str(STORM_PORTS), ",".join(storm_addresses),
                           ",".join(message.hex() for message in messages)]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=package_env())
    try:
        time.sleep(0.5)
        authorised.reset_counts()
        # The SGW's datagrams and the status queries go on while the storm lasts.
        _send_gtpu(lab, 10_000, 10_000.0 / (STORM_SECONDS - 1.5))
        during = distributor.status()
        assert _registered(distributor) == identities
        out, err = storm.communicate(timeout=STORM_SECONDS + 30)
    finally:
        if storm.poll() is None:
            storm.kill()
            storm.wait()
    assert storm.returncode == 0, err
    result = json.loads(out)
    print(f"storm: {result}, refused: {_refused(distributor)}")

    received = authorised.wait_for(10_000)
    assert received == 10_000, f"{received} of 10000 arrived"
    assert _spread(authorised.pgws) >= 0.99, [pgw.received for pgw in authorised.pgws]
    assert result["received"] == 0     # no storm socket was ever served
    assert _registered(distributor) == identities
    assert isinstance(during["pgws"], list) and len(during["pgws"]) == 2

    refused = _refused(distributor)
    assert result["sent"] >= 50_000
    assert refused["rate_limited"] > 0 and refused["replay"] > 0
    assert refused["unauthenticated"] > 0 and refused["bad_hmac"] > 0
    assert refused["short"] > 0
    # Every storm datagram is counted somewhere, also those the kernel had no room for.
    assert refused["socket_full"] > 0
    assert sum(refused.values()) >= 0.99 * result["sent"], (refused, result)

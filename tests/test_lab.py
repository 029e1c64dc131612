"""The lab: what `pgwfwd lab up` builds, that it is isolated, and that down removes all
of it (also a half-built lab)."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator

import pytest
from pyroute2 import IPRoute

from pgwfwd.lab import Lab, LabConfig, in_netns, netlink_in, netns_exists

pytestmark = pytest.mark.netns


@pytest.fixture
def own_lab() -> Iterator[Lab]:
    """A lab of this module's own, apart from the session's."""
    lab = Lab(LabConfig.with_prefix("pgwfwd-labtest"))
    try:
        yield lab
    finally:
        lab.down()


def _host_links() -> list[tuple[str, str]]:
    with IPRoute() as ipr:
        return sorted((link.get("ifname"), link.get("state")) for link in ipr.get_links())


def _addresses(netns_name: str, iface: str) -> set[tuple[str, int]]:
    with netlink_in(netns_name) as ipr:
        index = ipr.link_lookup(ifname=iface)[0]
        return {
            (addr.get("address"), addr["prefixlen"])
            for addr in ipr.get_addr(index=index, family=socket.AF_INET)
        }


def _default_routes(netns_name: str) -> list[object]:
    with netlink_in(netns_name) as ipr:
        return [route for route in ipr.get_routes(family=socket.AF_INET) if route["dst_len"] == 0
                and route.get("table") == 254]


def test_lab_up_builds_the_topology_and_down_removes_it(own_lab: Lab) -> None:
    cfg = own_lab.config
    host_before = _host_links()

    own_lab.up()

    assert netns_exists(cfg.ld_netns) and netns_exists(cfg.peers_netns)
    assert _addresses(cfg.ld_netns, cfg.ld_iface) == {(cfg.vip, 24)}
    assert _addresses(cfg.peers_netns, cfg.peer_iface) == {
        (address, 24) for address in cfg.pgw_addresses + cfg.sgw_addresses
    }
    assert _default_routes(cfg.ld_netns) == []
    assert _default_routes(cfg.peers_netns) == []
    for name, iface in ((cfg.ld_netns, cfg.ld_iface), (cfg.peers_netns, cfg.peer_iface)):
        with netlink_in(name) as ipr:
            (link,) = ipr.get_links(ipr.link_lookup(ifname=iface)[0])
            assert link.get("num_rx_queues") == 2 and link.get("num_tx_queues") == 2
            (loopback,) = ipr.get_links(ipr.link_lookup(ifname="lo")[0])
            assert loopback.get("state") == "up"
    assert _host_links() == host_before

    own_lab.down()

    assert not netns_exists(cfg.ld_netns) and not netns_exists(cfg.peers_netns)
    assert _host_links() == host_before
    own_lab.down()


def test_lab_up_refuses_a_leftover_unless_told_to_replace_it(own_lab: Lab) -> None:
    own_lab.up()

    with pytest.raises(OSError, match="already up"):
        own_lab.up()
    own_lab.up(replace=True)
    assert own_lab.is_up()


def test_down_removes_a_half_built_lab(own_lab: Lab) -> None:
    subprocess.run(["ip", "netns", "add", own_lab.config.ld_netns], check=True)

    own_lab.down()

    assert not own_lab.is_up()


def test_a_datagram_crosses_from_the_peers_to_the_vip(own_lab: Lab) -> None:
    cfg = own_lab.config
    own_lab.up()

    with in_netns(cfg.ld_netns):
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with in_netns(cfg.peers_netns):
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with receiver, sender:
        receiver.bind((cfg.vip, 0))
        receiver.settimeout(5)
        sender.bind((cfg.pgw_addresses[0], 0))
        sender.sendto(b"hello", receiver.getsockname())

        data, source = receiver.recvfrom(100)
        sender_address = sender.getsockname()

    assert data == b"hello"
    assert source == sender_address


def test_ld_command_mounts_bpffs(own_lab: Lab) -> None:
    own_lab.up()

    mounts = subprocess.run(
        own_lab.ld_command(["cat", "/proc/self/mounts"]),
        capture_output=True, text=True, check=True,
    ).stdout

    assert any(line.split()[1:3] == ["/sys/fs/bpf", "bpf"] for line in mounts.splitlines())


def test_in_netns_names_a_missing_namespace() -> None:
    with pytest.raises(OSError, match="no such network namespace"):
        with in_netns("pgwfwd-no-such-netns"):
            pass

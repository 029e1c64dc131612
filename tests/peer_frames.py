"""Raw frames on the peers' end of the lab's veth, for the netns tests."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

from scapy.layers.l2 import Ether

from pgwfwd.lab import Lab, in_netns, netlink_in

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4   # sll_pkttype of what this socket itself sent


def mac_of(netns_name: str, iface: str) -> str:
    """The Ethernet address of iface inside a namespace."""
    with netlink_in(netns_name) as ipr:
        (link,) = ipr.get_links(ipr.link_lookup(ifname=iface)[0])
        return str(link.get("address"))


class PeerFrames:
    """An AF_PACKET socket on the peers' veth: sends raw frames, which can only reach the
    lab's distributor (the socket is bound to the lab's own veth and every frame that is
    long enough to carry an IPv4 destination must name the VIP), and reads what arrives."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.peer_mac = mac_of(lab.config.peers_netns, lab.config.peer_iface)
        self.ld_mac = mac_of(lab.config.ld_netns, lab.config.ld_iface)
        with in_netns(lab.config.peers_netns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind((lab.config.peer_iface, 0))
        self.sock.settimeout(0.1)

    def ether(self) -> Ether:
        return Ether(src=self.peer_mac, dst=self.ld_mac)

    def send(self, frame: bytes) -> None:
        # Network safety: an IPv4 frame to anywhere but the VIP is never sent.
        is_ipv4 = frame[12:14] == b"\x08\x00"
        assert not is_ipv4 or len(frame) < 34 or frame[30:34] == socket.inet_aton(self.lab.vip)
        self.sock.send(frame)

    def receive(self, match: Callable[[Ether], bool], timeout: float = 2.0) -> Ether | None:
        """The first frame from the distributor's side that match() accepts, or None."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data, address = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            if address[2] == PACKET_OUTGOING:
                continue
            frame = Ether(data)
            if match(frame):
                return frame
        return None

    def close(self) -> None:
        self.sock.close()

"""Next-hop MAC address of each PGW, from the kernel's routes and neighbour table.

The data plane writes the Ethernet destination itself, so it needs the MAC of the next hop
towards each PGW: the PGW itself when it is on the interface's subnet, else the gateway of
its route. The kernel resolves it for us: when the neighbour entry is missing or not usable,
a neighbour "replace" with NTF_USE makes the kernel send ARP (like `ip neigh replace ADDR dev
IF use`), and a netlink socket bound to the neighbour group reports the answer.

The kernel never uses these entries itself (AF_XDP transmits past its stack), so they go
STALE and later vanish. A STALE entry can hide a MAC change: every registration refresh of a
PGW checks its entry (at most once a second per next hop) and kicks resolution again unless
it is REACHABLE. A REACHABLE entry can hide one too: a next hop that took a new MAC without
a gratuitous ARP answers no unicast probe to its old one, and the kernel would keep the old
MAC for its reachable time (15 to 45 s) and then some. So a REACHABLE entry is re-resolved
by broadcast every REVERIFY_INTERVAL: marked failed, then resolution kicked.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTMGRP_LINK, RTMGRP_NEIGH
from pyroute2.netlink.rtnl.marshal import MarshalRtnl
from pyroute2.netlink.rtnl.ndmsg import (NTF_USE, NUD_DELAY, NUD_FAILED, NUD_NOARP,
                                         NUD_PERMANENT, NUD_PROBE, NUD_REACHABLE, NUD_STALE)

from pgwfwd.errors import RuntimeFailure

log = logging.getLogger(__name__)

PgwKey = tuple[str, int]

#: States in which the entry's link-layer address is the one to use.
USABLE_STATES = NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PROBE | NUD_PERMANENT | NUD_NOARP
#: States that need no new confirmation from the neighbour.
CONFIRMED_STATES = NUD_REACHABLE | NUD_PERMANENT | NUD_NOARP
#: A next hop's entry is checked (and resolution kicked) at most this often.
CHECK_INTERVAL = 1.0
#: A REACHABLE next hop is re-resolved by a broadcast ARP this often (seconds): how long a
#: MAC change without a gratuitous ARP can go unnoticed, against one ARP per next hop.
REVERIFY_INTERVAL = 5.0


def mac_bytes(lladdr: str | None) -> bytes | None:
    if not lladdr:
        return None
    mac = bytes.fromhex(lladdr.replace(":", ""))
    return mac if len(mac) == 6 and any(mac) else None


class NeighbourTable:
    """Tracks the next hop and its MAC for each watched PGW on one interface."""

    def __init__(self, iface: str, ifindex: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.iface = iface
        self.ifindex = ifindex
        self.clock = clock

        self._next_hop_of: dict[PgwKey, str] = {}      # PGW -> next hop address
        self._routeless: dict[PgwKey, float] = {}      # PGW without a route -> last try
        self._pgws_of: dict[str, set[PgwKey]] = {}     # next hop -> PGWs behind it
        self._macs: dict[str, bytes] = {}              # next hop -> its MAC
        self._last_check: dict[str, float] = {}        # next hop -> last look at its entry
        self._last_verify: dict[str, float] = {}       # next hop -> last broadcast ARP

        try:
            self._ipr = IPRoute()
            self._events = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW,
                                         socket.NETLINK_ROUTE)
        except OSError as error:
            raise RuntimeFailure(error.errno, f"{iface}: cannot open netlink: {error}") from None
        # Link events too: the interface vanishing ends the distributor (handle_events).
        self._events.bind((0, RTMGRP_NEIGH | RTMGRP_LINK))
        self._events.setblocking(False)
        self._marshal = MarshalRtnl()

    def fileno(self) -> int:
        """The neighbour event socket; readable means handle_events() has work."""
        return self._events.fileno()

    def mac(self, key: PgwKey) -> bytes | None:
        next_hop = self._next_hop_of.get(key)
        return self._macs.get(next_hop) if next_hop else None

    def next_hop(self, key: PgwKey) -> str | None:
        return self._next_hop_of.get(key)

    def watch(self, key: PgwKey) -> bytes | None:
        """Starts following the next hop of PGW key; returns its MAC when already known."""
        self._routeless.pop(key, None)
        next_hop = self._route(key)
        if next_hop is None:
            self._routeless[key] = self.clock()
            return None

        self._next_hop_of[key] = next_hop
        self._pgws_of.setdefault(next_hop, set()).add(key)
        if next_hop not in self._macs:
            self._check(next_hop, force=True)
        return self._macs.get(next_hop)

    def unwatch(self, key: PgwKey) -> None:
        self._routeless.pop(key, None)
        next_hop = self._next_hop_of.pop(key, None)
        if next_hop is None:
            return

        behind = self._pgws_of.get(next_hop, set())
        behind.discard(key)
        if not behind:
            self._pgws_of.pop(next_hop, None)
            self._macs.pop(next_hop, None)
            self._last_check.pop(next_hop, None)
            self._last_verify.pop(next_hop, None)

    def refreshed(self, key: PgwKey) -> bool:
        """Called on each registration refresh; True when the PGW's MAC changed."""
        before = self.mac(key)
        now = self.clock()

        if key in self._routeless:
            if now - self._routeless[key] >= CHECK_INTERVAL:
                self._retry_route(key, now)
        elif key in self._next_hop_of:
            self._check(self._next_hop_of[key])
        else:
            self.watch(key)

        return self.mac(key) != before

    def _retry_route(self, key: PgwKey, now: float) -> None:
        next_hop = self._route(key, quiet=True)
        if next_hop is None:
            self._routeless[key] = now
            return
        log.info("%s: pgw %s is now reachable through %s", self.iface, key[0], self.iface)
        self.watch(key)

    def handle_events(self) -> set[PgwKey]:
        """Reads pending neighbour events; returns the PGWs whose MAC changed."""
        changed: set[PgwKey] = set()
        while True:
            try:
                data = self._events.recv(65536)
            except BlockingIOError:
                return changed
            except OSError as error:
                if error.errno == errno.ENOBUFS:
                    # Events were lost: read the entries of every next hop again.
                    log.warning("%s: neighbour events overflowed, rereading", self.iface)
                    for next_hop in list(self._pgws_of):
                        changed |= self._check(next_hop, force=True)
                    continue
                raise

            for message in self._marshal.parse(data):
                changed |= self._apply(message)

    def close(self) -> None:
        self._events.close()
        self._ipr.close()

    def _route(self, key: PgwKey, quiet: bool = False) -> str | None:
        # quiet: a retry on every refresh must not repeat the warning of the join.
        addr = key[0]
        try:
            routes = self._ipr.route("get", dst=addr)
        except NetlinkError as error:
            if not quiet:
                log.warning("%s: no route to pgw %s: %s", self.iface, addr, error)
            return None

        route = routes[0] if routes else None
        if route is None or route.get("RTA_OIF") != self.ifindex:
            if not quiet:
                log.warning("%s: pgw %s is not reachable through %s, not forwarding to it",
                            self.iface, addr, self.iface)
            return None
        # XXX: route changes after the join are not followed; a PGW whose gateway changes is
        # sent to the old gateway until it leaves or expires.
        gateway = route.get("RTA_GATEWAY")
        return str(gateway) if gateway else addr

    def _check(self, next_hop: str, force: bool = False) -> set[PgwKey]:
        """Reads the kernel's entry for next_hop; kicks resolution unless it is confirmed."""
        now = self.clock()
        if not force and now - self._last_check.get(next_hop, -CHECK_INTERVAL) < CHECK_INTERVAL:
            return set()
        self._last_check[next_hop] = now

        state, lladdr = 0, None
        try:
            entries = self._ipr.neigh("get", dst=next_hop, ifindex=self.ifindex)
            if entries:
                state, lladdr = entries[0]["state"], entries[0].get("NDA_LLADDR")
        except NetlinkError as error:
            if error.code != errno.ENOENT:
                log.warning("%s: reading neighbour %s failed: %s", self.iface, next_hop, error)

        changed = self._learn(next_hop, state, lladdr)
        last_verify = self._last_verify.setdefault(next_hop, now)
        if not state & CONFIRMED_STATES:
            self._kick(next_hop)
        elif state & NUD_REACHABLE and now - last_verify >= REVERIFY_INTERVAL:
            self._reverify(next_hop, now)
        return changed

    def _reverify(self, next_hop: str, now: float) -> None:
        """Re-resolves next_hop by broadcast. The last MAC stays in use until the answer,
        and stays for good when none comes (as after a flush)."""
        self._last_verify[next_hop] = now
        try:
            self._ipr.neigh("change", dst=next_hop, ifindex=self.ifindex, state=NUD_FAILED)
        except NetlinkError as error:
            log.warning("%s: cannot re-resolve %s: %s", self.iface, next_hop, error)
            return
        self._kick(next_hop)

    def _kick(self, next_hop: str) -> None:
        try:
            self._ipr.neigh("replace", dst=next_hop, ifindex=self.ifindex, flags=NTF_USE)
        except NetlinkError as error:
            log.warning("%s: cannot resolve %s: %s", self.iface, next_hop, error)

    def _apply(self, message: Any) -> set[PgwKey]:
        if message.get("event") == "RTM_DELLINK" and message.get("index") == self.ifindex:
            raise RuntimeFailure(errno.ENODEV, "the interface went away")
        if message.get("family") != socket.AF_INET or message.get("ifindex") != self.ifindex:
            return set()
        next_hop = message.get("NDA_DST")
        if next_hop not in self._pgws_of:
            return set()

        if message.get("event") == "RTM_DELNEIGH":
            # The entry was garbage-collected or flushed: the last MAC most likely still
            # holds, so keep forwarding with it and ask the kernel to resolve again.
            # XXX: a next hop that really went away keeps its PGWs in the table until their
            # registrations expire, which is the contract's own liveness signal.
            self._kick(next_hop)
            return set()

        return self._learn(next_hop, message.get("state", 0), message.get("NDA_LLADDR"))

    def _learn(self, next_hop: str, state: int, lladdr: str | None) -> set[PgwKey]:
        mac = mac_bytes(lladdr) if state & USABLE_STATES else None
        if mac is None or self._macs.get(next_hop) == mac:
            return set()

        old = self._macs.get(next_hop)
        self._macs[next_hop] = mac
        if old is None:
            log.info("%s: next hop %s is at %s", self.iface, next_hop, lladdr)
        else:
            log.info("%s: next hop %s moved from %s to %s", self.iface, next_hop,
                     old.hex(":"), lladdr)
        return set(self._pgws_of.get(next_hop, set()))

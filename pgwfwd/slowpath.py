"""The slow path: GTP-U that reaches the kernel's socket on VIP:gtp-port instead of AF_XDP.

IPv4 fragments of GTP-U go to the kernel, which reassembles them; frames too big for a UMEM
frame and GTP-U on a receive queue that pgwfwd does not serve go there too. The control
thread reads these datagrams from its socket on VIP:gtp-port and hands each to SlowPath,
which decides its fate as the data plane would: an Echo Request is answered, an Echo
Response is dropped, a datagram that arrived with TTL 0 or 1 is dropped, and everything else
goes to the PGW that the published table picks (under teid the same PGW as the datagrams of
the same TEID that the data plane forwards). The distributor then sends it from its socket
on VIP:reg-port, so that it leaves as VIP:3000 like the rest, and the kernel fragments it
again on the way out.

SlowPath keeps its own copy of the last published table, so it never reads the buffers the
workers read, and its own wrr cursors over that table.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from pgwfwd import tables

GTPU_VERSION = 1
GTPU_FLAG_PT = 0x10
GTPU_FLAG_E = 0x04
GTPU_FLAGS_OPTIONAL = 0x07   # E, S, PN: the optional word follows the mandatory header
GTPU_FLAG_S = 0x02
GTPU_ECHO_REQUEST = 1
GTPU_ECHO_RESPONSE = 2
GTPU_IE_RECOVERY = 14
#: As in the data plane: a longer chain of extension headers is taken for garbage.
GTPU_MAX_EXTENSIONS = 16

_MANDATORY = struct.Struct("!BBHI")
_OPTIONAL = struct.Struct("!HBB")

#: The reasons a slow-path datagram is not forwarded, in the order status shows them.
DROP_REASONS = ("no_pgw", "ttl", "echo_response", "send_failed")


class GtpuInfo(NamedTuple):
    type: int
    teid: int
    sequence: int | None   # with the S flag only


def parse_gtpu(payload: bytes) -> GtpuInfo | None:
    """The header of a well-formed GTP-U message filling all of payload, else None.

    The same checks as the data plane: version 1, PT=1, the length field against the
    datagram, the optional word and the extension header chain within the datagram.
    """
    if len(payload) < _MANDATORY.size:
        return None
    flags, message_type, length, teid = _MANDATORY.unpack_from(payload)
    if flags >> 5 != GTPU_VERSION or not flags & GTPU_FLAG_PT:
        return None
    end = _MANDATORY.size + length
    if end != len(payload):
        return None
    if not flags & GTPU_FLAGS_OPTIONAL:
        return GtpuInfo(message_type, teid, None)

    if end < _MANDATORY.size + _OPTIONAL.size:
        return None
    sequence, _npdu, next_type = _OPTIONAL.unpack_from(payload, _MANDATORY.size)
    if not flags & GTPU_FLAG_E:
        next_type = 0

    # Each extension header: its length in 4-byte units first, the next type last.
    offset = _MANDATORY.size + _OPTIONAL.size
    for _ in range(GTPU_MAX_EXTENSIONS + 1):
        if next_type == 0:
            return GtpuInfo(message_type, teid, sequence if flags & GTPU_FLAG_S else None)
        if offset >= end:
            return None
        extension_length = payload[offset] * 4
        if extension_length == 0 or extension_length > end - offset:
            return None
        next_type = payload[offset + extension_length - 1]
        offset += extension_length
    return None


def echo_response(sequence: int | None) -> bytes:
    """The Echo Response to an Echo Request, as the data plane builds it: the request's
    sequence number and a Recovery IE with restart counter 0."""
    flags = GTPU_VERSION << 5 | GTPU_FLAG_PT | GTPU_FLAG_S
    body = _OPTIONAL.pack(sequence or 0, 0, 0) + bytes((GTPU_IE_RECOVERY, 0))
    return _MANDATORY.pack(flags, GTPU_ECHO_RESPONSE, len(body), 0) + body


class Forward(NamedTuple):
    index: int                   # the PGW's index in the published table
    destination: tuple[str, int]
    ttl: int                     # to leave with: one less than on arrival


class Reply(NamedTuple):
    data: bytes                  # back to the sender, from VIP:gtp-port


class Drop(NamedTuple):
    reason: str                  # one of DROP_REASONS


Verdict = Forward | Reply | Drop


@dataclass
class SlowPath:
    """Decides the fate of each datagram that reached the kernel; keeps its counters."""

    policy: str = "wrr"
    pgws: np.ndarray = field(default_factory=tables.empty_pgw_array, repr=False)
    slots: np.ndarray = field(default_factory=lambda: np.zeros(0, tables.SLOT_DTYPE),
                              repr=False)
    fine_slots: np.ndarray = field(default_factory=lambda: np.zeros(0, tables.SLOT_DTYPE),
                                   repr=False)
    received: int = 0
    forwarded: int = 0
    echo_replies: int = 0
    drops: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    pgw_packets: np.ndarray = field(
        default_factory=lambda: np.zeros(tables.MAX_PGWS, dtype=np.uint64), repr=False)
    pgw_bytes: np.ndarray = field(
        default_factory=lambda: np.zeros(tables.MAX_PGWS, dtype=np.uint64), repr=False)
    _cursor: int = 0
    _fine_cursor: int = 0

    def published(self, policy: str, pgws: np.ndarray, slots: np.ndarray,
                  fine_slots: np.ndarray | None) -> None:
        """Takes a copy of the table just handed to the data plane. The wrr cursors stay
        where they are, as the workers' do."""
        self.policy = policy
        self.pgws = pgws.copy()
        self.slots = slots.copy()
        self.fine_slots = (np.zeros(0, tables.SLOT_DTYPE) if fine_slots is None
                           else fine_slots.copy())

    def decide(self, payload: bytes, source: tuple[str, int], ttl: int | None) -> Verdict:
        """The fate of one datagram from source; ttl as it arrived (None: unknown)."""
        self.received += 1
        info = parse_gtpu(payload)
        if info is not None and info.type == GTPU_ECHO_REQUEST:
            return Reply(echo_response(info.sequence))
        if info is not None and info.type == GTPU_ECHO_RESPONSE:
            return Drop("echo_response")
        if ttl is not None and ttl <= 1:
            return Drop("ttl")

        index = self._select(info, source)
        if index is None or index >= tables.MAX_PGWS or not self.pgws[index]["port"]:
            return Drop("no_pgw")
        pgw = self.pgws[index]
        address = str(ipaddress.IPv4Address(int(pgw["addr"])))
        return Forward(index, (address, int(pgw["port"])), 64 if ttl is None else ttl - 1)

    def count(self, verdict: Verdict, size: int) -> None:
        """Counts a verdict once carried out; a send that failed is counted as a Drop."""
        if isinstance(verdict, Forward):
            self.forwarded += 1
            self.pgw_packets[verdict.index] += 1
            self.pgw_bytes[verdict.index] += size
        elif isinstance(verdict, Reply):
            self.echo_replies += 1
        else:
            self.drops[verdict.reason] += 1

    def counters(self) -> dict[str, object]:
        return {"received": self.received, "forwarded": self.forwarded,
                "echo_replies": self.echo_replies, "drops": dict(self.drops)}

    def _select(self, info: GtpuInfo | None, source: tuple[str, int]) -> int | None:
        n_slots = len(self.slots)
        if n_slots == 0:
            return None
        if self.policy == "teid":
            from pgwfwd import native   # the C hashes, so that both paths agree

            slot = (native.teid_slot(info.teid, n_slots) if info is not None
                    else native.flow_slot(source[0], source[1], n_slots))
            return int(self.slots[slot])

        # wrr: the next slot in send order; a fine marker defers to the fine cycle.
        position = self._cursor if self._cursor < n_slots else 0
        self._cursor = (position + 1) % n_slots
        index = int(self.slots[position])
        if index != tables.SLOT_FINE:
            return index
        n_fine = len(self.fine_slots)
        if n_fine == 0:
            return None
        position = self._fine_cursor if self._fine_cursor < n_fine else 0
        self._fine_cursor = (position + 1) % n_fine
        return int(self.fine_slots[position])

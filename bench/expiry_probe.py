"""Expiry lateness of a real Distributor: how long after its deadline a PGW leaves the table.

Run inside the lab's distributor namespace (with bpffs, see Lab.ld_command). Registers
PGWs from the peers' namespace once each, at random times over --spread seconds (0: all at
once, so that they all expire together), never refreshes them, and watches every table the
distributor publishes. A PGW's deadline is the time the registry took its registration plus
the expiry time; it has left when the first table without it is published (the data plane
switches to it at that moment). Prints one JSON line: {"lateness_ms": [...]}.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import struct
import sys
import threading
import time
from typing import Any

from pgwfwd.distributor import Distributor
from pgwfwd.lab import PGW_ADDRESSES, in_netns
from pgwfwd.native import SLOT_FINE
from pgwfwd.registry import Event


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iface", default="veth0")
    parser.add_argument("--peers-netns", required=True)
    parser.add_argument("--expiry", type=float, default=0.5)
    parser.add_argument("--pgws", type=int, default=40)
    parser.add_argument("--spread", type=float, default=1.0,
                        help="seconds over which the registrations are spread")
    args = parser.parse_args()

    distributor = Distributor(args.iface, expiry=args.expiry, queues=1)
    deadlines: dict[tuple[str, int], float] = {}
    left: dict[tuple[str, int], float] = {}
    lock = threading.Lock()

    # Deadlines as the registry sets them, in the distributor's own clock.
    handle = distributor.registry.handle_datagram

    def handle_and_note(data: bytes, source: tuple[str, int], now: float | None = None) -> Any:
        result = handle(data, source, now)
        if isinstance(result, Event):
            with lock:
                deadlines[result.entry.key] = result.entry.refreshed + args.expiry
        return result

    distributor.registry.handle_datagram = handle_and_note  # type: ignore[method-assign]

    distributor.start()
    # Every published table, as the data plane sees it.
    assert distributor._shared is not None
    publish = distributor._shared.publish

    def publish_and_note(pgws: Any, slots: Any, n_queues: int, timeout: float = 1.0,
                         **policy: Any) -> int:
        generation: int = publish(pgws, slots, n_queues, timeout, **policy)
        now = distributor.clock()
        # A PGW is in the table when a slot or a fine slot (wrr) names it.
        fine_slots = policy.get("fine_slots")
        indices = set(slots.tolist())
        if fine_slots is not None:
            indices |= set(fine_slots.tolist())
        present = {(str_addr(int(pgws[i]["addr"])), int(pgws[i]["port"]))
                   for i in indices - {SLOT_FINE}}
        with lock:
            for key, deadline in deadlines.items():
                if key not in left and key not in present and now >= deadline:
                    left[key] = now - deadline
        return generation

    distributor._shared.publish = publish_and_note  # type: ignore[method-assign]

    sockets = []
    try:
        with in_netns(args.peers_netns):
            for i in range(args.pgws):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.bind((PGW_ADDRESSES[i % len(PGW_ADDRESSES)], 0))
                sockets.append(sock)
        # One generator for all offsets (a fresh one per PGW would give them all the same).
        rng = random.Random(4)
        offsets = sorted(rng.uniform(0, args.spread) for _ in sockets)
        start = time.monotonic()
        for sock, offset in zip(sockets, offsets):
            time.sleep(max(0.0, start + offset - time.monotonic()))
            sock.sendto(struct.pack("!I", 1), (distributor.vip, distributor.reg_port))

        deadline = time.monotonic() + args.spread + args.expiry + 2.0
        while time.monotonic() < deadline:
            with lock:
                if len(left) == len(sockets):
                    break
            time.sleep(0.05)
    finally:
        for sock in sockets:
            sock.close()
        distributor.stop()

    print(json.dumps({"lateness_ms": [value * 1000 for value in left.values()],
                      "registered": len(deadlines), "expected": len(sockets)}))
    return 0 if len(left) == len(sockets) else 1


def str_addr(value: int) -> str:
    return socket.inet_ntoa(value.to_bytes(4, "big"))


if __name__ == "__main__":
    sys.exit(main())

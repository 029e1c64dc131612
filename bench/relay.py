"""The plain-socket relay that a user writes first: one UDP socket receives GTP-U, another
sends each datagram on to the next PGW of a weighted round robin, one syscall per datagram
each way (no recvmmsg/sendmmsg). A baseline for the benchmark, not a product.

Run inside the distributor's namespace; prints "ready" once its sockets are bound and
relays until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import itertools
import signal
import socket
import sys
from types import FrameType


def parse_pgw(text: str) -> tuple[str, int, int]:
    addr, port, weight = text.split(":")
    return addr, int(port), int(weight)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vip", required=True)
    parser.add_argument("--gtp-port", type=int, default=2152)
    parser.add_argument("--reg-port", type=int, default=3000)
    parser.add_argument("--pgw", action="append", type=parse_pgw, required=True,
                        metavar="ADDR:PORT:WEIGHT")
    args = parser.parse_args()

    def stop(signo: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)

    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind((args.vip, args.gtp_port))
    # From VIP:reg-port, as the wire contract says a PGW expects.
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.bind((args.vip, args.reg_port))
    cycle = itertools.cycle([(addr, port) for addr, port, weight in args.pgw
                             for _ in range(weight)])
    print("ready", flush=True)

    relayed = 0
    try:
        while True:
            data = receiver.recv(65535)
            try:
                sender.sendto(data, next(cycle))
                relayed += 1
            except OSError:
                pass   # ENOBUFS under overload: the datagram is lost, as a user's would be
    except KeyboardInterrupt:
        pass
    finally:
        receiver.close()
        sender.close()
    print(f'{{"relayed": {relayed}}}', flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

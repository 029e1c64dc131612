"""Embedding pgwfwd: forward GTP-U on IFACE for SECONDS seconds, printing the live PGW
table once a second and the drop counters at the end. Run as root: embed.py IFACE SECONDS"""

import argparse
import logging
import signal
import sys

from pgwfwd import Distributor, PgwfwdError


def run(iface: str, seconds: int) -> None:
    with Distributor(iface) as distributor:   # attaches on entry, detaches on any exit
        for _ in range(seconds):
            if distributor.wait(1.0):   # True only when the distributor failed
                sys.exit(f"{iface}: failed: {distributor.error}")
            lines = [f"{'PGW':<21} {'WEIGHT':>6} {'SHARE':>7} {'PACKETS':>9} {'AGE':>6}"]
            lines += [f"{pgw.addr + ':' + str(pgw.port):<21} {pgw.weight:>6} "
                      f"{pgw.share:>7.1%} {pgw.packets:>9} {pgw.age:>5.1f}s"
                      for pgw in distributor.pgws()]
            print("\n".join(lines), end="\n\n", flush=True)
    drops = distributor.counters()["drops"]   # the last values, kept by stop()
    print("drops:", ", ".join(f"{reason} {count}" for reason, count in drops.items()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("iface")
    parser.add_argument("seconds", type=int)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    # pgwfwd installs no signal handlers: SIGTERM must unwind through the with block too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        run(args.iface, args.seconds)
    except (PgwfwdError, OSError) as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:   # Ctrl-C: the with block has already stopped it cleanly
        sys.exit(130)

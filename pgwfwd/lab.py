"""A lab topology for pgwfwd, built entirely inside network namespaces we create.

Two namespaces joined by one veth pair, nothing else:

    netns pgwfwd-ld                       netns pgwfwd-peers
    veth0 198.18.0.1/24 (the VIP)  <--->  veth1 198.18.0.11-.19/24 (PGWs)
                                                198.18.0.101-.110/24 (SGWs)

Both ends have 2 RX/TX queues so that the distributor's --queues 2 can be tried, lo is
up in both namespaces and no namespace has a default route: traffic sent in the lab can
only reach addresses inside the lab. The host's own interfaces and routes are never
touched: the veth pair is created inside the distributor's namespace.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType

import click
from pyroute2 import IPRoute
from pyroute2.netns import setns

from pgwfwd.errors import PgwfwdError

logger = logging.getLogger(__name__)

NETNS_DIR = "/run/netns"
LD_NETNS = "pgwfwd-ld"
PEERS_NETNS = "pgwfwd-peers"
LD_IFACE = "veth0"
PEER_IFACE = "veth1"
VIP = "198.18.0.1"
PREFIXLEN = 24
PGW_ADDRESSES = tuple(f"198.18.0.{host}" for host in range(11, 20))
SGW_ADDRESSES = tuple(f"198.18.0.{host}" for host in range(101, 111))
QUEUES = 2
LINK_UP_TIMEOUT = 5.0
FORWARDING_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0

# `ip netns exec` remounts /sys for the command, without /sys/fs/bpf; libxdp wants
# bpffs there. The mount lives only in the command's own mount namespace.
_MOUNT_BPFFS_AND_EXEC = 'mount -t bpf bpf /sys/fs/bpf 2>/dev/null; exec "$@"'


class LabError(PgwfwdError, OSError):
    """The lab could not be built or used."""


def netns_exists(name: str) -> bool:
    """True when a named network namespace exists (as `ip netns` names them)."""
    return os.path.exists(os.path.join(NETNS_DIR, name))


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the block with the calling thread inside the named network namespace.

    Sockets created in the block stay in that namespace after it ends. Only the calling
    thread moves (setns is per thread); other threads are unaffected.
    """
    path = os.path.join(NETNS_DIR, name)
    try:
        target_fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise LabError(f"{name}: no such network namespace (is the lab up?)") from None

    saved_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        setns(target_fd)
        try:
            yield
        finally:
            setns(saved_fd)
    finally:
        os.close(target_fd)
        os.close(saved_fd)


def netlink_in(name: str) -> IPRoute:
    """A netlink socket inside the named namespace.

    Made with setns in this thread rather than with pyroute2's netns= argument, which
    forks a child process: a forked copy of a program that handles SIGTERM or SIGINT
    (the demo does) would run that program's clean-up code a second time.
    """
    with in_netns(name):
        return IPRoute()


def _run_ip(args: list[str]) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: {result.stderr.strip()}")


@dataclass(frozen=True)
class LabConfig:
    """Names and addresses of one lab; the defaults are the lab that the CLI builds."""

    ld_netns: str = LD_NETNS
    peers_netns: str = PEERS_NETNS
    ld_iface: str = LD_IFACE
    peer_iface: str = PEER_IFACE
    vip: str = VIP
    prefixlen: int = PREFIXLEN
    pgw_addresses: tuple[str, ...] = PGW_ADDRESSES
    sgw_addresses: tuple[str, ...] = SGW_ADDRESSES
    queues: int = QUEUES

    @classmethod
    def with_prefix(cls, prefix: str) -> LabConfig:
        """A lab whose namespaces are named PREFIX-ld and PREFIX-peers."""
        return cls(ld_netns=f"{prefix}-ld", peers_netns=f"{prefix}-peers")


@dataclass
class Lab:
    """Builds and removes the lab; usable as a context manager (down on exit, always)."""

    config: LabConfig = field(default_factory=LabConfig)

    @property
    def vip(self) -> str:
        return self.config.vip

    def is_up(self) -> bool:
        return netns_exists(self.config.ld_netns) or netns_exists(self.config.peers_netns)

    def up(self, replace: bool = False) -> None:
        """Build the lab. With replace, a lab left over from an earlier run is removed
        first; without it, a leftover is an error (it may belong to a running demo)."""
        cfg = self.config
        if self.is_up():
            if not replace:
                raise LabError(
                    f"{cfg.ld_netns}: lab already up (remove it with `pgwfwd lab down`)"
                )
            self.down()

        try:
            self._build()
        except BaseException:
            # A half-built lab is removed, also on Ctrl-C.
            self.down()
            raise

        logger.info(
            "%s: lab up, vip %s in %s, peers in %s",
            cfg.ld_iface, cfg.vip, cfg.ld_netns, cfg.peers_netns,
        )

    def _build(self) -> None:
        cfg = self.config
        for name in (cfg.ld_netns, cfg.peers_netns):
            _run_ip(["netns", "add", name])

        with netlink_in(cfg.ld_netns) as ld, netlink_in(cfg.peers_netns) as peers:
            peers_fd = os.open(os.path.join(NETNS_DIR, cfg.peers_netns), os.O_RDONLY)
            try:
                ld.link(
                    "add", ifname=cfg.ld_iface, kind="veth",
                    num_tx_queues=cfg.queues, num_rx_queues=cfg.queues,
                    peer={
                        "ifname": cfg.peer_iface, "net_ns_fd": peers_fd,
                        "num_tx_queues": cfg.queues, "num_rx_queues": cfg.queues,
                    },
                )
            finally:
                os.close(peers_fd)

            _configure_side(ld, cfg.ld_iface, [cfg.vip], cfg.prefixlen)
            _configure_side(
                peers, cfg.peer_iface,
                list(cfg.pgw_addresses) + list(cfg.sgw_addresses), cfg.prefixlen,
            )
            _wait_running(ld, cfg.ld_iface)
            _wait_running(peers, cfg.peer_iface)

    def down(self) -> None:
        """Remove the lab, or whatever part of it exists; doing nothing is fine."""
        cfg = self.config

        # Delete the veth pair explicitly: a namespace that a process still holds would
        # otherwise outlive its name, and the pair with it.
        for name, iface in ((cfg.ld_netns, cfg.ld_iface), (cfg.peers_netns, cfg.peer_iface)):
            if not netns_exists(name):
                continue
            with contextlib.suppress(Exception), netlink_in(name) as ipr:
                for index in ipr.link_lookup(ifname=iface):
                    ipr.link("del", index=index)

        removed = []
        for name in (cfg.ld_netns, cfg.peers_netns):
            if netns_exists(name):
                _run_ip(["netns", "delete", name])
                removed.append(name)
        if removed:
            logger.info("%s: lab down, removed %s", cfg.ld_iface, " ".join(removed))

    def ld_command(self, argv: Sequence[str]) -> list[str]:
        """argv run inside the distributor's namespace, with bpffs at /sys/fs/bpf."""
        return netns_command(self.config.ld_netns, argv, mount_bpffs=True)

    def peers_command(self, argv: Sequence[str]) -> list[str]:
        """argv run inside the peers' namespace."""
        return netns_command(self.config.peers_netns, argv)

    def __enter__(self) -> Lab:
        self.up(replace=True)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()


class DistributorProcess:
    """`pgwfwd run` as a subprocess inside the lab's distributor namespace.

    Runs the same pgwfwd as this process (its package directory goes first on
    PYTHONPATH) with the same interpreter; stderr goes to a file that start() watches
    for the "forwarding" line and that callers can show when something fails.
    """

    def __init__(self, lab: Lab, args: Sequence[str] = ()) -> None:
        self.lab = lab
        self.args = list(args)
        self.process: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="pgwfwd-run-", suffix=".log")

    @property
    def argv(self) -> list[str]:
        pgwfwd_argv = [sys.executable, "-m", "pgwfwd", "run", "--iface",
                       self.lab.config.ld_iface, *self.args]
        return self.lab.ld_command(pgwfwd_argv)

    @property
    def stderr(self) -> str:
        with open(self._log.name, encoding="utf-8", errors="replace") as log:
            return log.read()

    def start(self, wait: bool = True, timeout: float = FORWARDING_TIMEOUT) -> None:
        """Start it and, with wait, return once it logs that it is forwarding."""
        self.process = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
            env=package_env(),
        )
        if wait:
            self.wait_forwarding(timeout)

    def wait_forwarding(self, timeout: float = FORWARDING_TIMEOUT) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "forwarding" in self.stderr:
                return
            if self.process.poll() is not None:
                raise LabError(
                    f"{self.lab.config.ld_iface}: distributor exited with "
                    f"{self.process.returncode} before forwarding:\n{self.stderr.rstrip()}"
                )
            time.sleep(0.05)
        raise LabError(
            f"{self.lab.config.ld_iface}: distributor not forwarding after {timeout:.0f} s:"
            f"\n{self.stderr.rstrip()}"
        )

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, then wait; SIGKILL if it does not stop in time. Returns the exit
        code (None if it had to be killed)."""
        if self.process is None:
            return None
        if self.process.poll() is not None:
            return self.process.returncode

        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return None

    def close(self) -> None:
        self.stop()
        self._log.close()

    def status(self) -> dict[str, object]:
        """What `pgwfwd status --json` says about the running instance."""
        argv = self.lab.ld_command([sys.executable, "-m", "pgwfwd", "status", "--json"])
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=10, env=package_env(),
        )
        if result.returncode != 0:
            raise LabError(
                f"{self.lab.config.ld_iface}: pgwfwd status failed "
                f"({result.returncode}): {result.stderr.strip()}"
            )
        status: dict[str, object] = json.loads(result.stdout)
        return status

    def __enter__(self) -> DistributorProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def package_env() -> dict[str, str]:
    """This process's environment with this pgwfwd's directory first on PYTHONPATH, so
    that a child runs the very same code, installed or not."""
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        path for path in (package_parent, env.get("PYTHONPATH")) if path
    )
    return env


def netns_command(name: str, argv: Sequence[str], mount_bpffs: bool = False) -> list[str]:
    """The command line that runs argv inside a named namespace via `ip netns exec`."""
    if not mount_bpffs:
        return ["ip", "netns", "exec", name, *argv]
    return ["ip", "netns", "exec", name, "sh", "-c", _MOUNT_BPFFS_AND_EXEC, "--", *argv]


def _configure_side(ipr: IPRoute, iface: str, addresses: list[str], prefixlen: int) -> None:
    index = ipr.link_lookup(ifname=iface)[0]
    for address in addresses:
        ipr.addr("add", index=index, address=address, prefixlen=prefixlen)
    ipr.link("set", index=index, state="up")
    ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


def _wait_running(ipr: IPRoute, iface: str) -> None:
    """Wait for carrier, so that the first packets sent in the lab are not lost."""
    index = ipr.link_lookup(ifname=iface)[0]
    deadline = time.monotonic() + LINK_UP_TIMEOUT
    while time.monotonic() < deadline:
        link = ipr.get_links(index)[0]
        if link.get("state") == "up" and link.get("IFLA_CARRIER") == 1:
            return
        time.sleep(0.02)
    raise LabError(f"{iface}: no carrier after {LINK_UP_TIMEOUT:.0f} s")


@click.group("lab")
def lab_group() -> None:
    """Build or remove the lab: two network namespaces joined by a veth pair."""


@lab_group.command("up")
@click.option("--replace", is_flag=True, help="Remove a lab left over from an earlier run.")
def lab_up(replace: bool) -> None:
    """Create netns pgwfwd-ld (veth0, the VIP) and pgwfwd-peers (veth1, PGWs and SGWs)."""
    lab = Lab()
    try:
        lab.up(replace=replace)
    except LabError as exc:
        raise click.ClickException(str(exc)) from None

    cfg = lab.config
    click.echo(f"{cfg.ld_netns}: {cfg.ld_iface} {cfg.vip}/{cfg.prefixlen}")
    click.echo(
        f"{cfg.peers_netns}: {cfg.peer_iface} PGWs {cfg.pgw_addresses[0]}-"
        f"{cfg.pgw_addresses[-1]}, SGWs {cfg.sgw_addresses[0]}-{cfg.sgw_addresses[-1]}"
    )
    # This very interpreter, so that the line works whether or not a venv is active.
    run_line = shlex.join(lab.ld_command([sys.executable, "-m", "pgwfwd", "run", "--iface",
                                          cfg.ld_iface]))
    click.echo(f"run the distributor: {run_line}")


@lab_group.command("down")
def lab_down() -> None:
    """Remove the lab's namespaces and veth pair (nothing to do is fine)."""
    Lab().down()

"""The `pgwfwd` command: a thin shell over pgwfwd.Distributor and its control socket."""

from __future__ import annotations

import importlib
import json
import logging
import resource
import signal
import sys
from types import FrameType
from typing import Any

import click

from pgwfwd import auth
from pgwfwd.distributor import Distributor, control_socket_path, control_socket_paths, query
from pgwfwd.errors import ConfigError, NotRunningError, PgwfwdError
from pgwfwd.registry import MAX_PGWS
from pgwfwd.tables import POLICIES

log = logging.getLogger(__name__)


class CliError(click.ClickException):
    """A one-line "Error: ..." on stderr and an exit code: 2 for bad settings, 1 otherwise."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class LazyGroup(click.Group):
    """A group whose heavier subcommands are imported only when used.

    A subcommand whose module cannot be imported still shows in the help and says why when
    run, so the rest of the CLI keeps working.
    """

    def __init__(self, *args: Any, lazy: dict[str, tuple[str, str]] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy or {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.lazy:
            return super().get_command(ctx, cmd_name)

        module_name, attribute = self.lazy[cmd_name]
        try:
            command = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as error:
            return _unavailable(cmd_name, error)
        if not isinstance(command, click.Command):
            return _unavailable(cmd_name, TypeError(f"{module_name}.{attribute} is no command"))
        return command


def error_message(error: BaseException) -> str:
    """The message of error without the "[Errno N]" that str() puts before an OSError's."""
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    return str(error)


def _unavailable(name: str, error: Exception) -> click.Command:
    def fail() -> None:
        raise CliError(f"pgwfwd {name} is not available: {error}")

    return click.Command(name, callback=fail, help=f"(not available: {error})")


@click.group(cls=LazyGroup, lazy={
    "sim": ("pgwfwd.sim", "sim_group"),
    "lab": ("pgwfwd.lab", "lab_group"),
    "demo": ("pgwfwd.demo", "demo_command"),
})
def main() -> None:
    """pgwfwd: distributes GTP-U among registered PGWs over AF_XDP."""


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    # pyroute2 narrates every netlink message at debug level: keep it and the asyncio loop
    # it runs one level down. Its import resets its logger, so import it first.
    import pyroute2  # noqa: F401

    for name in ("pyroute2", "asyncio"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    # libxdp and libbpf print straight to stderr: their warnings and notes only with -v.
    from pgwfwd.native import set_library_verbosity

    set_library_verbosity(2 if verbose else 0)


@main.command()
@click.option("--iface", required=True, help="Interface that SGWs and PGWs reach.")
@click.option("--vip", default=None, help="Address SGWs send to [first IPv4 of the interface].")
@click.option("--gtp-port", default=2152, show_default=True, type=click.IntRange(1, 65535),
              help="UDP port that SGWs send GTP-U to.")
@click.option("--reg-port", default=3000, show_default=True, type=click.IntRange(1, 65535),
              help="UDP port that PGWs register on; also the source port of what they get.")
@click.option("--expiry", default=3.0, show_default=True, type=click.FloatRange(min=0.001),
              help="Seconds after its last registration that a PGW stops receiving.")
@click.option("--queues", default=None, type=click.IntRange(1, 64),
              help="Receive queues to serve [all, at most one per CPU].")
@click.option("--policy", default="wrr", show_default=True, type=click.Choice(POLICIES),
              help="wrr: spread datagrams by weight; teid: keep each GTP-U tunnel on one "
                   "PGW (consistent hash of the TEID).")
@click.option("--allow", multiple=True, metavar="CIDR",
              help="Network whose addresses may register (repeatable) [the subnets of the "
                   "interface's addresses].")
@click.option("--max-pgws", default=MAX_PGWS, show_default=True,
              type=click.IntRange(1, MAX_PGWS), help="Most PGWs registered at once.")
@click.option("--reg-rate", default=auth.DEFAULT_RATE, show_default=True,
              type=click.FloatRange(min=0), help="Registrations per second per source "
              "address; a registered PGW's refresh every second is never limited (0: off).")
@click.option("--reg-burst", default=auth.DEFAULT_BURST, show_default=True,
              type=click.IntRange(min=1), help="Registrations a source address may send at "
              "once above --reg-rate.")
@click.option("--auth-key-file", default=None, metavar="PATH",
              help="Accept only authenticated registrations, signed with the key in PATH "
                   "(raw bytes, at least 16).")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def run(iface: str, vip: str | None, gtp_port: int, reg_port: int, expiry: float,
        queues: int | None, policy: str, allow: tuple[str, ...], max_pgws: int,
        reg_rate: float, reg_burst: int, auth_key_file: str | None, verbose: bool) -> None:
    """Forward GTP-U on IFACE in the foreground until SIGINT or SIGTERM."""
    setup_logging(verbose)
    raise_file_limit(max_pgws + 256)
    try:
        distributor = Distributor(iface, vip=vip, gtp_port=gtp_port, reg_port=reg_port,
                                  expiry=expiry, queues=queues, policy=policy,
                                  allow=allow or None, max_pgws=max_pgws, reg_rate=reg_rate,
                                  reg_burst=reg_burst, auth_key_file=auth_key_file)
    except ConfigError as error:
        raise CliError(error_message(error), exit_code=2) from None
    except (PgwfwdError, OSError) as error:
        raise CliError(error_message(error)) from None

    # The handler only notes the signal: the main thread does the stopping, outside of it.
    signalled: list[int] = []

    def note_signal(signum: int, frame: FrameType | None) -> None:
        signalled.append(signum)

    previous = {sig: signal.signal(sig, note_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        distributor.start()
        while not signalled and not distributor.wait(0.2):
            pass
    except ConfigError as error:
        raise CliError(error_message(error), exit_code=2) from None
    except (PgwfwdError, OSError) as error:
        raise CliError(error_message(error)) from None
    finally:
        distributor.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    if distributor.error is not None:
        raise CliError(f"{iface}: {error_message(distributor.error)}")


def raise_file_limit(wanted: int) -> None:
    """Each registered PGW has a socket of its own: make room for them, within the hard
    limit (a distributor that runs out serves the rest through the shared socket)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


@main.command()
@click.option("--iface", default=None, help="Only the instance on this interface.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON status.")
def status(iface: str | None, as_json: bool) -> None:
    """Show the PGW table and counters of the pgwfwd instances in this network namespace."""
    answers = [answer for _, answer in _ask_instances(iface, {"cmd": "status"}, "the status")]

    if as_json:
        if len(answers) > 1:
            names = ", ".join(str(answer.get("iface")) for answer in answers)
            raise CliError(f"pgwfwd runs on {names}: choose one with --iface")
        click.echo(json.dumps(answers[0], indent=2))
        return
    click.echo("\n\n".join(format_status(answer) for answer in answers))


@main.command()
@click.option("--iface", default=None, help="The instance on this interface.")
@click.argument("name", metavar="NAME", type=click.Choice(POLICIES))
def policy(iface: str | None, name: str) -> None:
    """Switch the selection policy of the running instance to NAME.

    wrr spreads datagrams by weight; teid keeps each GTP-U tunnel on one PGW. The switch
    loses no datagram.
    """
    instances = _ask_instances(iface, {"cmd": "ping"}, "the instance")
    if len(instances) > 1:
        names = ", ".join(_iface_of(path) for path, _ in instances)
        raise CliError(f"pgwfwd runs on {names}: choose one with --iface")

    path = instances[0][0]
    try:
        answer = query(path, {"cmd": "policy", "policy": name})
    except (OSError, ValueError) as error:
        raise CliError(f"cannot set the policy through {path}: {error_message(error)}") from None
    if not isinstance(answer, dict) or not answer.get("ok"):
        message = answer.get("error") if isinstance(answer, dict) else answer
        raise CliError(f"{_iface_of(path)}: {message}")
    click.echo(f"{_iface_of(path)}: policy {answer['policy']}")


def _ask_instances(iface: str | None, request: dict[str, Any],
                   what: str) -> list[tuple[str, Any]]:
    """(control socket path, answer) of each instance that answers request; CliError when
    none runs (on iface, or in this network namespace)."""
    paths = [control_socket_path(iface)] if iface else control_socket_paths()
    answers = []
    for path in paths:
        try:
            answers.append((path, query(path, request)))
        except NotRunningError:
            continue
        except (OSError, ValueError) as error:
            raise CliError(f"cannot read {what} from {path}: {error_message(error)}") from None

    if not answers:
        where = f"on {iface}" if iface else "in this network namespace"
        raise CliError(f"no pgwfwd is running {where}")
    return answers


def _iface_of(path: str) -> str:
    """The interface in a control socket's name, <netns inode>-<iface>.sock."""
    name = path.rsplit("/", 1)[-1]
    return name.split("-", 1)[-1].removesuffix(".sock")


def format_status(status: dict[str, Any]) -> str:
    """An aligned, human-readable rendering of one control socket status answer."""
    # Under wrr a PGW's share is of the datagrams; under teid, of the hash table's slots.
    policy = status.get("policy", "wrr")
    header = (f"{status['iface']}: forwarding GTP-U to {status['vip']}:{status['gtp_port']}, "
              f"policy {policy}, registrations on port {status['reg_port']}, "
              f"{status['queues']} queues, expiry {status['expiry']:g} s, "
              f"up {status['uptime']:.0f} s")
    lines = [header]

    share = "SLOTS" if policy == "teid" else "SHARE"
    rows = [("PGW", "WEIGHT", share, "PACKETS", "AGE", "NEXT HOP MAC")]
    for pgw in status["pgws"]:
        rows.append((f"{pgw['addr']}:{pgw['port']}", str(pgw["weight"]),
                     f"{100 * pgw['share']:.2f}%", str(pgw["packets"]), f"{pgw['age']:.1f}s",
                     pgw["mac"] or "unresolved"))
    if len(rows) == 1:
        lines.append("no PGW registered")
    else:
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            cells = [cell.ljust(width) if i in (0, 5) else cell.rjust(width)
                     for i, (cell, width) in enumerate(zip(row, widths))]
            lines.append("  ".join(cells).rstrip())

    counters = status["counters"]
    lines.append(f"rx {counters['rx_packets']} packets, tx {counters['tx_packets']} packets, "
                 f"echo replies {counters.get('echo_replies', 0)}, "
                 f"forwarded non-GTP-U {counters.get('not_gtpu', 0)}")
    drops = {name: n for name, n in counters["drops"].items() if n}
    lines.append("drops: " + (", ".join(f"{name} {n}" for name, n in drops.items()) or "none"))
    lines.append("xdp: " + ", ".join(f"{name} {n}" for name, n in counters["xdp"].items()))
    settings = status.get("registration")
    if settings:
        rate = (f"{settings['rate']:g}/s per address (burst {settings['burst']})"
                if settings["rate"] else "no rate limit")
        lines.append(f"registration: from {', '.join(settings['allow'])}, at most "
                     f"{settings['max_pgws']} PGWs, {rate}, "
                     + ("authenticated only" if settings["authenticated"]
                        else "no authentication"))
    # Refusals on a line of their own: they are what an operator looks for.
    registration = counters["registration"]
    accepted = {name: n for name, n in registration.items() if not name.startswith("refused_")}
    refused = {name.removeprefix("refused_"): n for name, n in registration.items()
               if name.startswith("refused_")}
    lines.append("registrations: " + ", ".join(f"{name} {n}" for name, n in accepted.items()))
    lines.append("refused registrations: " + ", ".join(f"{name} {n}"
                                                       for name, n in refused.items()))
    # GTP-U that the kernel got (reassembled fragments, frames too big for a UMEM frame).
    slowpath = counters.get("slowpath") or {"received": counters.get("gtp_slowpath", 0),
                                             "forwarded": 0, "echo_replies": 0, "drops": {}}
    slow_drops = ", ".join(f"{name} {n}" for name, n in slowpath["drops"].items() if n)
    lines.append(f"slow path (via the kernel): received {slowpath['received']}, forwarded "
                 f"{slowpath['forwarded']}, echo replies {slowpath['echo_replies']}, drops: "
                 f"{slow_drops or 'none'}")
    return "\n".join(lines)

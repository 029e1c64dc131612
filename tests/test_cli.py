"""The pgwfwd command as a user meets it, without root: errors and exit codes."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from pgwfwd import cli, distributor
from pgwfwd.cli import format_status, main


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()  # click 8.2+: stdout and stderr apart


@pytest.fixture
def empty_run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(distributor, "RUN_DIR", str(tmp_path))
    return tmp_path


def test_run_on_missing_interface_is_one_error_line(runner: CliRunner) -> None:
    result = runner.invoke(main, ["run", "--iface", "doesnotexist"])

    assert result.exit_code == 2
    assert result.stderr.splitlines() == ["Error: interface doesnotexist does not exist"]
    assert result.stdout == ""


def test_run_with_vip_not_on_interface_is_one_error_line(runner: CliRunner) -> None:
    result = runner.invoke(main, ["run", "--iface", "lo", "--vip", "198.18.0.1"])

    assert result.exit_code == 2
    assert result.stderr.splitlines() == ["Error: 198.18.0.1 is not an address of interface lo"]


def test_run_with_bad_vip_is_one_error_line(runner: CliRunner) -> None:
    result = runner.invoke(main, ["run", "--iface", "lo", "--vip", "not-an-address"])

    assert result.exit_code == 2
    assert result.stderr.splitlines() == ["Error: not-an-address is not an IPv4 address"]


def test_status_with_nothing_running(runner: CliRunner, empty_run_dir: Path) -> None:
    result = runner.invoke(main, ["status"])

    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "Error: no pgwfwd is running in this network namespace"]


def test_status_skips_a_stale_socket_file(runner: CliRunner, empty_run_dir: Path) -> None:
    stale = Path(distributor.control_socket_path("veth0"))
    stale.touch()

    result = runner.invoke(main, ["status", "--iface", "veth0"])

    assert result.exit_code == 1
    assert result.stderr.splitlines() == ["Error: no pgwfwd is running on veth0"]


def test_subcommands_are_listed(runner: CliRunner) -> None:
    result = runner.invoke(main, ["--help"])

    assert result.exit_code == 0
    for name in ("run", "status", "policy", "sim", "lab", "demo"):
        assert f"  {name} " in result.stdout


def test_unimportable_subcommand_says_why(runner: CliRunner,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    group = main
    assert isinstance(group, cli.LazyGroup)
    monkeypatch.setitem(group.lazy, "broken", ("pgwfwd.no_such_module", "command"))

    result = runner.invoke(main, ["broken"])

    assert result.exit_code == 1
    assert result.stderr.startswith("Error: pgwfwd broken is not available: ")


STATUS = {
    "iface": "veth0", "vip": "198.18.0.1", "gtp_port": 2152, "reg_port": 3000,
    "expiry": 3.0, "queues": 2, "pid": 1, "uptime": 12.0, "generation": 4,
    "pgws": [
        {"addr": "198.18.0.11", "port": 40000, "weight": 10, "share": 0.25, "packets": 2500,
         "bytes": 1, "age": 0.4, "mac": "02:00:00:00:00:01"},
        {"addr": "198.18.0.12", "port": 40000, "weight": 30, "share": 0.75, "packets": 7500,
         "bytes": 1, "age": 0.9, "mac": None},
    ],
    "counters": {"rx_packets": 10001, "rx_bytes": 1, "tx_packets": 10000, "tx_bytes": 1,
                 "drops": {"no_pgw": 1, "ttl": 0}, "registration": {"joins": 2},
                 "gtp_slowpath": 0, "xdp": {"redirected": 10001}, "queues": []},
}


def test_status_table_is_aligned() -> None:
    lines = format_status(json.loads(json.dumps(STATUS))).splitlines()

    header, first, second = lines[1:4]
    assert header.split() == ["PGW", "WEIGHT", "SHARE", "PACKETS", "AGE", "NEXT", "HOP", "MAC"]
    assert first.split() == ["198.18.0.11:40000", "10", "25.00%", "2500", "0.4s",
                             "02:00:00:00:00:01"]
    assert second.split()[-1] == "unresolved"
    assert header.index("SHARE") + len("SHARE") == first.index("25.00%") + len("25.00%")
    assert "drops: no_pgw 1" in lines


def test_status_header_and_counters_show_the_policy() -> None:
    status = json.loads(json.dumps(STATUS))
    status["counters"].update(echo_replies=3, not_gtpu=7)

    wrr = format_status({**status, "policy": "wrr"}).splitlines()
    teid = format_status({**status, "policy": "teid"}).splitlines()

    assert ", policy wrr, " in wrr[0] and ", policy teid, " in teid[0]
    assert wrr[1].split()[2] == "SHARE" and teid[1].split()[2] == "SLOTS"
    assert "rx 10001 packets, tx 10000 packets, echo replies 3, forwarded non-GTP-U 7" in wrr


def test_run_with_unknown_policy_is_a_usage_error(runner: CliRunner) -> None:
    result = runner.invoke(main, ["run", "--iface", "lo", "--policy", "rr"])

    assert result.exit_code == 2
    assert "Invalid value for '--policy': 'rr' is not one of 'wrr', 'teid'." in result.stderr


def test_policy_with_unknown_name_is_a_usage_error(runner: CliRunner,
                                                   empty_run_dir: Path) -> None:
    result = runner.invoke(main, ["policy", "rr"])

    assert result.exit_code == 2
    assert "Invalid value for 'NAME': 'rr' is not one of 'wrr', 'teid'." in result.stderr


def test_policy_with_nothing_running(runner: CliRunner, empty_run_dir: Path) -> None:
    Path(distributor.control_socket_path("veth0")).touch()   # stale: nothing answers

    result = runner.invoke(main, ["policy", "teid"])

    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "Error: no pgwfwd is running in this network namespace"]


@pytest.fixture
def control_socket(empty_run_dir: Path) -> Iterator[distributor.Distributor]:
    """A distributor on lo that is not forwarding but answers on its control socket."""
    instance = distributor.Distributor("lo")
    instance._claim_control_socket()
    server = instance._server
    assert server is not None
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield instance
    finally:
        server.shutdown()
        thread.join()
        instance._close_control_socket()


def test_policy_switches_a_running_instance(runner: CliRunner,
                                            control_socket: distributor.Distributor,
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pgwfwd.distributor")

    switched = runner.invoke(main, ["policy", "--iface", "lo", "teid"])
    again = runner.invoke(main, ["policy", "teid"])
    status = runner.invoke(main, ["status", "--iface", "lo"])

    assert (switched.exit_code, switched.stdout) == (0, "lo: policy teid\n")
    assert (again.exit_code, again.stdout) == (0, "lo: policy teid\n")
    assert control_socket.policy == "teid"
    assert [r.getMessage() for r in caplog.records] == ["lo: policy wrr -> teid"]
    assert status.exit_code == 0 and ", policy teid, " in status.stdout.splitlines()[0]


def test_policy_needs_iface_when_several_run(runner: CliRunner,
                                             control_socket: distributor.Distributor) -> None:
    other = distributor.control_socket_path("veth9")
    os.symlink(control_socket.control_path, other)

    result = runner.invoke(main, ["policy", "wrr"])

    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "Error: pgwfwd runs on lo, veth9: choose one with --iface"]

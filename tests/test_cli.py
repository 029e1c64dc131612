"""The pgwfwd command as a user meets it, without root: errors and exit codes."""

from __future__ import annotations

import json
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
    for name in ("run", "status", "sim", "lab", "demo"):
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

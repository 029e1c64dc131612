"""Parts of the distributor that need no root: settings checks and log rate limiting."""

from __future__ import annotations

import logging

import pytest

from pgwfwd import ConfigError, Distributor
from pgwfwd.distributor import _RateLimitedLog, rx_queue_count


@pytest.mark.parametrize("kwargs, message", [
    ({"iface": "doesnotexist"}, "interface doesnotexist does not exist"),
    ({"iface": "lo", "vip": "198.18.0.1"}, "198.18.0.1 is not an address of interface lo"),
    ({"iface": "lo", "vip": "1.2.3"}, "1.2.3 is not an IPv4 address"),
    ({"iface": "lo", "gtp_port": 3000}, "the gtp port and the registration port must differ"),
    ({"iface": "lo", "reg_port": 0}, "registration port must be 1..65535, not 0"),
    ({"iface": "lo", "expiry": 0}, "expiry must be positive, not 0"),
    ({"iface": "lo", "queues": 65}, "interface lo has"),
])
def test_bad_settings_are_config_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        Distributor(**kwargs)  # type: ignore[arg-type]

    assert str(error.value).startswith(message)
    assert isinstance(error.value, ValueError)


def test_defaults_on_loopback() -> None:
    distributor = Distributor("lo")

    assert distributor.vip == "127.0.0.1"
    assert distributor.n_queues == rx_queue_count("lo") == 1
    assert not distributor.running
    distributor.stop()   # never started: nothing to do, no error


def test_refusals_are_logged_at_a_limited_rate(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    limited = _RateLimitedLog(10.0, lambda: now[0])
    caplog.set_level(logging.WARNING, logger="pgwfwd.distributor")

    for _ in range(5):
        limited.warning("short", "veth0: ignored registration: %s", "short")
        now[0] += 1.0
    now[0] = 10.0
    limited.warning("short", "veth0: ignored registration: %s", "short")
    limited.warning("other", "veth0: ignored registration: %s", "other")

    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        "veth0: ignored registration: short",
        "veth0: ignored registration: short (4 more since the last report)",
        "veth0: ignored registration: other",
    ]

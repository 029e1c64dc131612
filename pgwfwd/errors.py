"""Exceptions of pgwfwd.

Every exception is a PgwfwdError and also the builtin that fits it, so callers may catch either:
a bad setting is a ValueError, a failure of the system (a socket, netlink, the data plane) an
OSError.
"""

from __future__ import annotations


class PgwfwdError(Exception):
    """Base of every error that pgwfwd raises on purpose."""


class ConfigError(PgwfwdError, ValueError):
    """A setting is wrong: unknown interface, VIP not on it, bad port or queue count."""


class RuntimeFailure(PgwfwdError, OSError):
    """The system refused something while running: a socket, netlink, a worker."""


class AlreadyRunningError(RuntimeFailure):
    """Another pgwfwd already serves this interface in this network namespace."""


class NotRunningError(RuntimeFailure):
    """No pgwfwd instance answers on a control socket."""

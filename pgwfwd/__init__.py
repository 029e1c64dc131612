"""pgwfwd: a load distributor of GTP-U for packet gateways, over AF_XDP."""

from pgwfwd.distributor import Distributor, PgwView
from pgwfwd.errors import (AlreadyRunningError, ConfigError, NotRunningError, PgwfwdError,
                           RuntimeFailure)

__all__ = ["AlreadyRunningError", "ConfigError", "Distributor", "NotRunningError",
           "PgwView", "PgwfwdError", "RuntimeFailure"]

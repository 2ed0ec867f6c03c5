"""sluice: a pluggable L7 proxy filter framework.

The public API is what this module exports; everything else is internal.
Write a filter by subclassing ``Filter``, register it from a plugin module
with ``@hookimpl def sluice_filters(): return [MyFilter]``, and declare the
module as an entry point in the ``sluice`` group.
"""

from .edge.transport import ClientTransport, ServerTransport, Transport
from .errors import ClientGone, ConfigError, UpstreamError
from .hookspecs import hookimpl
from .messages import Headers, Request, Response
from .protocol.events import ProtocolError
from .proxy.context import Context
from .proxy.filters import CONTINUE, Continue, Filter, FilterConfig, LocalReply, SettingsOnly
from .proxy.flags import FLAGS, Flag
from .proxy.routes import RetryPolicy, Route
from .upstream.cluster import Balancer, BalancerConfig, Cluster, Endpoint

__version__ = "0.1.0"

__all__ = [
    "CONTINUE",
    "FLAGS",
    "Balancer",
    "BalancerConfig",
    "ClientGone",
    "ClientTransport",
    "Cluster",
    "ConfigError",
    "Context",
    "Continue",
    "Endpoint",
    "Filter",
    "FilterConfig",
    "Flag",
    "Headers",
    "LocalReply",
    "ProtocolError",
    "Request",
    "Response",
    "RetryPolicy",
    "Route",
    "ServerTransport",
    "SettingsOnly",
    "Transport",
    "UpstreamError",
    "hookimpl",
]

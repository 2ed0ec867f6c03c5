"""sluice: a pluggable L7 proxy filter framework.

The public API is what this module exports; everything else is internal.
Write a filter by subclassing ``Filter``, register it from a plugin module
with ``@hookimpl def sluice_filters(): return [MyFilter]``, and declare the
module as an entry point in the ``sluice`` group.
"""

from .cluster import Balancer, Cluster, Endpoint
from .context import Context
from .errors import ConfigError
from .filters import CONTINUE, Continue, Filter, FilterConfig, LocalReply
from .hookspecs import hookimpl
from .messages import Headers, Request, Response
from .routes import Route
from .transport import ClientTransport, ServerTransport, Transport

__version__ = "0.1.0"

__all__ = [
    "CONTINUE",
    "Balancer",
    "ClientTransport",
    "Cluster",
    "ConfigError",
    "Context",
    "Continue",
    "Endpoint",
    "Filter",
    "FilterConfig",
    "Headers",
    "LocalReply",
    "Request",
    "Response",
    "Route",
    "ServerTransport",
    "Transport",
    "hookimpl",
]

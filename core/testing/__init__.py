"""The plugin author kit: everything a sluice plugin's own tests need.

- ``serve(config, extra=...)``: a real proxy, in process, for the length of a block.
- ``Origin`` / ``Reply`` / ``Recorded``: a real, scriptable upstream that records requests.
- ``run_filter(...)``: one filter driven through its phases with no sockets.
- ``contract``: the filter-contract battery.
- the pytest plugin (``sluice.testing.plugin``, loaded through the ``pytest11``
  entry point): fixtures ``origin``, ``sluice_proxy`` and ``sluice_client``.

Install with ``pip install sluice[testing]`` (pytest, pytest-trio, httpx).
"""

from .origin import Origin, Recorded, Reply
from .proxy import Running, serve
from .run_filter import FilterRun, build_filter, run_filter

__all__ = ["FilterRun", "Origin", "Recorded", "Reply", "Running", "build_filter", "run_filter", "serve"]

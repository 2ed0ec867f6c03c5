"""sluice's own logs: structlog, JSON lines on stderr, filtered by level.

(Access logs are a plugin's business; these are the proxy's diagnostics.)

The level can change while sluice runs (``set_level``, the admin
listener's ``POST /log-level``), in every worker at once: it is one byte of
memory shared with every process forked after this module was imported,
which the workers are (``edge/workers.py`` forks them from the master), and
a worker that is replaced inherits it too. So the level is filtered by the
first processor, not by structlog's filtering wrapper class, whose level is
fixed once a logger is cached.
"""

from __future__ import annotations

import logging
import mmap
import sys

import structlog

__all__ = ["LEVELS", "configure", "current_level", "set_level"]

LEVELS = ("debug", "info", "warning", "error")
_NUMBERS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
            "error": logging.ERROR}
# structlog's method names -> their level; any other method is never dropped.
_METHOD_LEVEL = {**_NUMBERS, "warn": logging.WARNING, "exception": logging.ERROR,
                 "critical": logging.CRITICAL, "fatal": logging.CRITICAL}
_shared = mmap.mmap(-1, 1)  # anonymous and MAP_SHARED: forked processes see one byte
_shared[0] = logging.INFO


def _by_level(logger, method_name: str, event_dict: dict) -> dict:
    if _METHOD_LEVEL.get(method_name, logging.CRITICAL) < _shared[0]:
        raise structlog.DropEvent
    return event_dict


def set_level(name: str) -> None:
    """Log at ``name`` (one of ``LEVELS``) from now on, in this process and
    in every process sharing its level (the workers of one master)."""
    _shared[0] = _NUMBERS[name]


def current_level() -> str:
    """The level logged at now."""
    return next((n for n, v in _NUMBERS.items() if v == _shared[0]), "info")


def configure(level: str = "info") -> None:
    set_level(level if level in _NUMBERS else "info")
    structlog.configure(
        processors=[
            _by_level,
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        # One write per line: with --workers N, processes share stderr, and
        # print()'s separate write of the newline let their lines interleave.
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )

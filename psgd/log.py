"""Logging: one format for every psgd process (time, role, level, message) on stderr.

Diagnostics go through the standard ``logging`` module under the ``psgd`` logger (each
module logs to ``logging.getLogger(__name__)``); the user-facing progress lines and
summaries stay plain output. ``psgd -v``/``-q`` (repeatable) or ``PSGD_LOG_LEVEL``
(DEBUG, INFO, WARNING, ERROR) set the level; the default is INFO.
"""

from __future__ import annotations

import logging
import os
import sys

FORMAT = "%(asctime)s.%(msecs)03d %(role)s %(levelname)s %(message)s"
DATE_FORMAT = "%H:%M:%S"
DEFAULT_LEVEL = logging.INFO
LEVEL_ENV = "PSGD_LOG_LEVEL"


class _Role(logging.Filter):
    def __init__(self, role: str):
        super().__init__()
        self.role = role

    def filter(self, record: logging.LogRecord) -> bool:
        record.role = self.role
        return True


def level_from(verbose: int = 0, quiet: int = 0, env: str | None = None) -> int:
    """The level: ``PSGD_LOG_LEVEL`` (or INFO), each -v one step more, each -q one less."""
    name = (env if env is not None else os.environ.get(LEVEL_ENV, "")).strip().upper()
    level = logging.getLevelName(name) if name else DEFAULT_LEVEL
    if not isinstance(level, int):
        raise ValueError(f"{LEVEL_ENV}={name!r} is not one of DEBUG, INFO, WARNING, ERROR")
    return min(logging.CRITICAL, max(logging.DEBUG, level + 10 * (quiet - verbose)))


def setup(role: str, level: int = DEFAULT_LEVEL) -> None:
    """Send the ``psgd`` logger's records to stderr in the one format, tagged ``role``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
    handler.addFilter(_Role(role))
    logger = logging.getLogger("psgd")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
    logging.raiseExceptions = False  # a line that cannot be written (a full disk) is dropped, not fatal
    os.environ[LEVEL_ENV] = logging.getLevelName(level)  # the processes a launcher starts log alike

"""Corral's own log lines, the same in every process (CLI, controller, ingress, replicas).

Ray forwards each worker's stderr to the driver, so a line logged in a replica
shows in the ``corral serve`` terminal, prefixed with the process it came from.
"""

from __future__ import annotations

import logging
import sys

ROOT = "corral"
FORMAT = "%(levelname)s %(name)s: %(message)s"


def setup_logging(level: str = "info") -> None:
    """Send the ``corral.*`` loggers to stderr at ``level``; safe to call twice."""
    logger = logging.getLogger(ROOT)
    logger.setLevel(level.upper())
    if not any(getattr(h, "_corral", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        handler._corral = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.propagate = False  # Ray and Serve set up root handlers of their own

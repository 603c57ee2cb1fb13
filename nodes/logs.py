"""Corral's own log lines, the same in every process (CLI, controller, ingress, replicas).

Ray forwards each worker's stderr to the driver, so a line logged in a replica
shows in the ``corral serve`` terminal, prefixed with the process it came from.
"""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar

ROOT = "corral"
FORMAT = "%(levelname)s %(name)s: %(req)s%(message)s"

# The id of the HTTP request being served (set by deployments/context.py), so that
# every line logged while serving it says which request it belongs to.
request_id_var: ContextVar[str | None] = ContextVar("corral_request_id", default=None)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        rid = request_id_var.get()
        record.req = f"[req={rid}] " if rid else ""
        return True


def setup_logging(level: str = "info") -> None:
    """Send the ``corral.*`` loggers to stderr at ``level``; safe to call twice."""
    logger = logging.getLogger(ROOT)
    logger.setLevel(level.upper())
    if not any(getattr(h, "_corral", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        handler.addFilter(_RequestIdFilter())
        handler._corral = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.propagate = False  # Ray and Serve set up root handlers of their own

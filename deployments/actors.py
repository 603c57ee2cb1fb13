"""The named Ray actors the ingress and the CLI look up: the controller (placements and
routes) and the library service (pulls and creates), both detached, on the head."""

from __future__ import annotations

NAMESPACE = "corral"
CONTROLLER_ACTOR = "corral-controller"
LIBRARY_ACTOR = "corral-library"

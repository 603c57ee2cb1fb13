"""How long a placement taken out of the routes may still get requests: pure bookkeeping.

An ingress asks the controller for a model's routes (``ensure``) and uses the answer
for ``ROUTES_TTL`` seconds before it asks again. A placement the controller takes out
of the routes may therefore still get requests from every ingress that took the routes
before, until that ingress asks again (it has acknowledged the new routes) or its copy
expires. ``RouteLeases`` remembers when each ingress (its ``origin``) last took each
model's routes, and says when a removal is drained.

Before this, the controller slept ``ROUTES_TTL + 0.5`` s with its change lock held
for every removal. Most removals are of idle models (eviction takes the least recently
used, keep-alive the idle) whose routes no ingress has taken for longer than that, and
are drained at once; a busy model's is drained as soon as each ingress using it has
asked again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# An ingress's copy of the routes is used until it is ROUTES_TTL old by the ingress's
# clock, which starts after the answer travelled back: this covers that trip.
MARGIN = 0.5
# A request that picked a placement just before its ingress asked again may still be on
# its way to it: a removal acknowledged by a new ask waits this much more.
GRACE = 0.1


@dataclass
class RouteLeases:
    """When each origin last took each model's routes (see module docstring)."""

    ttl: float
    _taken: dict[str, dict[str, float]] = field(default_factory=dict)

    def took(self, model: str, origin: str, now: float) -> None:
        """``origin`` took ``model``'s routes at ``now``."""
        self._taken.setdefault(model, {})[origin] = now

    def drained_at(self, model: str, removed: float) -> float:
        """When no ingress still routes ``model``'s requests by routes taken before
        ``removed`` (when a placement was taken out of them); ``removed`` if none does."""
        until = removed
        for taken in self._taken.get(model, {}).values():
            if taken >= removed:  # asked again since: it holds the new routes
                until = max(until, taken + GRACE)
            else:
                until = max(until, taken + self.ttl + MARGIN)
        return until

    def forget_expired(self, now: float) -> None:
        """Drop what can no longer delay a removal (every lease older than its expiry)."""
        for model in list(self._taken):
            live = {o: t for o, t in self._taken[model].items() if now - t <= self.ttl + MARGIN}
            if live:
                self._taken[model] = live
            else:
                del self._taken[model]

"""The controller's desired state on disk, so that a restarted controller picks up where
the last one stopped.

What the controller alone knows is kept here: the models file last applied (its
specs), the models loaded on demand, the placements that run (so that a new
controller adopts their Serve applications instead of loading them again) and
the placements lost with a node and not yet put back. Pulled models and API
keys are on disk already (the store, the key file).

The file is JSON, written atomically whenever the state changes, and read once
when a controller starts. A file that cannot be read is set aside (renamed to
``*.bad``) with a warning: the cluster then starts from nothing declared,
which is what a first start looks like, rather than not at all.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cluster.planner import Placement
from cluster.spec import ModelSpec
from nodes.store import atomic_write

log = logging.getLogger("corral.state")

STATE_FILE = "controller-state.json"
FORMAT = 1


@dataclass(frozen=True)
class SavedState:
    """What a controller needs to come back as it was."""

    declared: tuple[ModelSpec, ...] = ()  # the models file last applied, in its order
    on_demand: tuple[str, ...] = ()  # models loaded by a request, not declared
    placements: tuple[Placement, ...] = ()  # what ran
    lost: tuple[Placement, ...] = ()  # lost with their node, not yet placed elsewhere
    saved_at: float = field(default=0.0, compare=False)  # seconds since the epoch

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "saved_at": self.saved_at,
                "declared": [_finite(s.model_dump()) for s in self.declared],
                "on_demand": list(self.on_demand),
                "placements": [asdict(p) for p in self.placements],
                "lost": [asdict(p) for p in self.lost],
            },
            indent=1,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> SavedState:
        """Parse what ``to_json`` wrote; ``ValueError`` says what is wrong."""
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a Corral controller state of format {FORMAT}")
        try:
            return cls(
                declared=tuple(ModelSpec.model_validate(s) for s in data["declared"]),
                on_demand=tuple(str(m) for m in data["on_demand"]),
                placements=tuple(_placement(p) for p in data["placements"]),
                lost=tuple(_placement(p) for p in data.get("lost", [])),
                saved_at=float(data.get("saved_at", 0.0)),
            )
        except (KeyError, TypeError, ValidationError) as exc:
            raise ValueError(f"a field is missing or wrong: {exc}") from None


_PLACEMENT_FIELDS = {f.name for f in fields(Placement)}


def _placement(data: dict[str, Any]) -> Placement:
    unknown = set(data) - _PLACEMENT_FIELDS
    if unknown:
        raise TypeError(f"unknown placement fields {sorted(unknown)}")
    return Placement(**data)


def _finite(value: Any) -> Any:
    """``value`` with infinite durations (keep_alive -1, "forever") written as -1, which the
    spec reads back as forever; JSON has no infinity."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, float) and math.isinf(value):
        return -1
    return value


def load_state(path: Path) -> SavedState | None:
    """The state saved at ``path``; None if there is none or it cannot be read (then the
    file is renamed ``*.bad`` and a warning says why)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read the saved controller state %s: %s; starting afresh", path, exc)
        return None
    try:
        return SavedState.from_json(text)
    except ValueError as exc:
        bad = path.with_name(path.name + ".bad")
        path.replace(bad)
        log.warning(
            "the saved controller state %s is unreadable (%s); moved it to %s and starting "
            "with nothing declared: apply your models file again",
            path,
            exc,
            bad,
        )
        return None


def save_state(path: Path, state: SavedState) -> None:
    """Write ``state`` to ``path`` atomically (the old file or the new, never half)."""
    atomic_write(path, state.to_json().encode())

"""``models.yaml``: which models run, how many replicas, and where.

A file holds a list under ``models:``; each entry names a model and says how
it should run (see ``configs/models.yaml`` for every field with its default).
Mistakes are reported as ``file:line: models[i].field: what is allowed``,
every mistake of the file at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cluster import yamlfile
from nodes.durations import parse_duration
from nodes.models import check_name

GpuMode = Literal["auto", "required", "never"]
Strategy = Literal["spread", "pack"]
DEFAULT_KEEP_ALIVE = 300.0  # Ollama's 5 minutes


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Replicas(_Strict):
    """How many replicas may run: ``min`` always, up to ``max`` under load."""

    min: int = Field(default=1, ge=0, description="replicas that always run (0: load on demand)")
    max: int = Field(default=0, ge=0, description="the most replicas under load (default: min)")

    @model_validator(mode="after")
    def _max_default(self) -> Replicas:
        if self.max == 0:
            object.__setattr__(self, "max", max(self.min, 1))
        elif self.max < self.min:
            raise ValueError(f"max ({self.max}) must be at least min ({self.min})")
        return self


class Placement(_Strict):
    """Which nodes may run the model, and how replicas spread over them."""

    nodes: list[str] | None = Field(
        default=None, description="only these nodes (names as `corral nodes` shows them)"
    )
    labels: dict[str, str] = Field(
        default_factory=dict, description="only nodes whose Ray labels have all these values"
    )
    gpu: GpuMode = Field(
        default="auto",
        description="auto: as many layers on the GPU as fit, the rest in RAM; "
        "required: only where the whole model fits in VRAM; never: CPU only",
    )
    strategy: Strategy = Field(
        default="spread",
        description="spread: replicas on different nodes; pack: as few nodes as possible",
    )

    @field_validator("nodes")
    @classmethod
    def _some_nodes(cls, nodes: list[str] | None) -> list[str] | None:
        if nodes is not None and not nodes:
            raise ValueError("an empty list allows no node; leave `nodes` out to allow any")
        return nodes


class Autoscaling(_Strict):
    """When replicas are added under load and removed after it."""

    target: float = Field(
        default=2.0, gt=0, description="requests in flight per replica before another is added"
    )
    upscale_delay: float = Field(
        default=5.0, description="how long the load stays above target before a replica is added"
    )
    downscale_delay: float = Field(
        default=60.0,
        description="how long the load stays low before a replica is removed (-1: never)",
    )

    @field_validator("upscale_delay", "downscale_delay", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float:
        return parse_duration(value)


class ModelSpec(_Strict):
    """One entry of ``models:``."""

    name: str = Field(description="the name clients ask for, e.g. llama3.2:1b")
    source: str | None = Field(
        default=None,
        description="where the weights come from: a model Corral has (default: the name) "
        "or the path of a .gguf file on the head node",
    )
    projector: str | None = Field(
        default=None,
        description="a vision model's projector (mmproj): the path of its .gguf file on the "
        "head node (default: the library model's own, if it has one)",
    )
    context: int | None = Field(
        default=None, ge=64, description="context length in tokens (default: corral.yaml num_ctx)"
    )
    replicas: Replicas = Field(default_factory=Replicas)
    placement: Placement = Field(default_factory=Placement)
    keep_alive: float = Field(
        default=DEFAULT_KEEP_ALIVE,
        description="unload replicas above min after this long idle (5m, 1h, 0, -1 = never)",
    )
    pinned: bool = Field(default=False, description="never evicted to make room for another")
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    threads: int | None = Field(
        default=None, ge=1, description="CPU threads per replica (default: the node's cores)"
    )
    engine: Literal["llama.cpp", "fake"] = Field(
        default="llama.cpp",
        description="llama.cpp runs the model; fake answers with deterministic words at a set "
        "pace, for testing routing and scaling without the CPU cost",
    )
    engine_options: dict[str, Any] = Field(
        default_factory=dict,
        description="settings of the engine; fake: token_delay, prompt_delay, reply_tokens, "
        "load_delay (seconds or counts)",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        return check_name(name)

    @field_validator("replicas", mode="before")
    @classmethod
    def _replicas_number(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            return {"min": value, "max": max(value, 1)}  # `replicas: 2` means exactly two
        return value

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float:
        return parse_duration(value)


class ModelsFile(_Strict):
    models: list[ModelSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> ModelsFile:
        seen: dict[str, int] = {}
        for i, spec in enumerate(self.models):
            if spec.name in seen:
                raise _Duplicate(spec.name, seen[spec.name], i)
            seen[spec.name] = i
        return self


class _Duplicate(ValueError):
    def __init__(self, name: str, first: int, again: int) -> None:
        super().__init__(f"{name} is declared twice")
        self.name, self.first, self.again = name, first, again


def load_models(path: str | Path) -> list[ModelSpec]:
    """The model specs in ``path``; ``yamlfile.ConfigError`` lists every mistake with its line.

    A ``source`` that is a relative path is taken relative to the file.
    """
    doc = yamlfile.load(path)
    data = _resolve_sources(doc.data, Path(doc.path).parent)
    try:
        return list(ModelsFile.model_validate(data).models)
    except ValidationError as exc:
        duplicate = _duplicate_in(exc)
        if duplicate is not None:
            line = doc.line_of(("models", duplicate.again, "name")) or 1
            first = doc.line_of(("models", duplicate.first, "name")) or 1
            raise yamlfile.ConfigError(
                f"{doc.path}:{line}: models[{duplicate.again}].name: {duplicate.name} is "
                f"declared twice (first at line {first}); merge the two entries"
            ) from None
        raise yamlfile.ConfigError(_explain(exc, doc)) from None


def _resolve_sources(data: dict[str, Any], base: Path) -> dict[str, Any]:
    models = data.get("models")
    if not isinstance(models, list):
        return data
    resolved = []
    for entry in models:
        for key in ("source", "projector"):
            path = entry.get(key) if isinstance(entry, dict) else None
            if isinstance(path, str) and path.endswith(".gguf") and not Path(path).is_absolute():
                entry = {**entry, key: str((base / path).resolve())}
        resolved.append(entry)
    return {**data, "models": resolved}


def _duplicate_in(exc: ValidationError) -> _Duplicate | None:
    for err in exc.errors():
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, _Duplicate):
            return cause
    return None


def _explain(exc: ValidationError, doc: yamlfile.YamlDocument) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        line = doc.line_of(loc) or 1
        message = yamlfile.explain_error(err).removeprefix("Value error, ")
        given = err.get("input")
        shown = err["type"] not in ("missing", "extra_forbidden") and repr(given) not in message
        if shown and not isinstance(given, dict | list):
            message += f" (got {given!r})"
        lines.append(f"{doc.path}:{line}: {where or 'models'}: {message}")
    return "\n".join(lines)

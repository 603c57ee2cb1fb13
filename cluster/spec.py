"""``models.yaml``: which models run, how many replicas, and where.

A file holds a list under ``models:``; each entry names a model and says how
it should run (see ``configs/models.yaml`` for every field with its default).
Mistakes are reported as ``file:line: models[i].field: what is allowed``,
every mistake of the file at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from cluster import yamlfile
from nodes.durations import parse_duration
from nodes.engine import DEFAULT_PARALLEL, MAX_PARALLEL, FlashAttn, KvCacheType, LlamaSettings
from nodes.models import check_name

GpuMode = Literal["auto", "required", "never"]
Strategy = Literal["spread", "pack"]
SplitMode = Literal["auto", "never"]
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
    split: SplitMode = Field(
        default="auto",
        description="auto: when no single node can hold one replica, split its layers over "
        "the fewest nodes that can (llama.cpp RPC, one replica); never: whole replicas only",
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
        default=2.0,
        gt=0,
        description="requests in flight per slot (parallel) before another replica is added",
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


_DEFAULT_LLAMA = LlamaSettings()
MAX_BATCH = 1 << 20  # tokens: far beyond any context llama.cpp opens


class Llama(_Strict):
    """llama.cpp's settings for one model (``nodes.engine.LlamaSettings``)."""

    flash_attn: FlashAttn = Field(
        default=_DEFAULT_LLAMA.flash_attn,
        description="flash attention: auto (on where the backend has it: the CPU, CUDA for "
        "the usual head sizes), on, off; it shrinks the compute buffer at long contexts",
    )
    kv_cache_type: KvCacheType = Field(
        default=_DEFAULT_LLAMA.kv_cache_type,
        description="type of the KV cache: f16, or q8_0/q4_0 for about a half/a quarter "
        "of its memory (these need flash attention)",
    )
    batch: int = Field(
        default=_DEFAULT_LLAMA.batch,
        ge=1,
        le=MAX_BATCH,
        description="the most tokens one decode call takes (n_batch)",
    )
    ubatch: int = Field(
        default=_DEFAULT_LLAMA.ubatch,
        ge=1,
        le=MAX_BATCH,
        description="tokens per compute pass (n_ubatch, at most batch): sizes the compute "
        "buffer, which holds the logits of this many tokens",
    )
    mlock: bool = Field(
        default=_DEFAULT_LLAMA.mlock, description="lock the weights in RAM (never swapped)"
    )
    mmap: bool = Field(
        default=_DEFAULT_LLAMA.mmap,
        description="map the file instead of reading it into memory",
    )
    unified_kv: bool = Field(
        default=_DEFAULT_LLAMA.unified_kv,
        description="one KV cache shared by the slots (a long request may use what short "
        "ones leave); false: each slot its share of the context, and answers that do not "
        "depend on what else runs",
    )
    prompt_cache: int | None = Field(
        default=_DEFAULT_LLAMA.prompt_cache,
        ge=0,
        description="tokens of prompts kept in RAM when a new request takes their slot, "
        "copied back when a later request shares them (the next turn of a conversation "
        "that left its slot); default: a quarter of the context, at most a quarter of "
        "the KV cache's memory, in RAM; 0: off",
    )

    @field_validator("flash_attn", mode="before")
    @classmethod
    def _on_off(cls, value: Any) -> Any:
        if isinstance(value, bool):  # YAML reads a bare on/off as true/false
            return "on" if value else "off"
        return value

    @field_validator("kv_cache_type")
    @classmethod
    def _quantized_needs_flash(cls, kv: str, info: ValidationInfo) -> str:
        if kv != "f16" and info.data.get("flash_attn") == "off":
            raise ValueError(
                f"a {kv} KV cache needs flash attention (llama.cpp refuses a quantized V "
                f"cache without it): set flash_attn to auto or on, or use f16"
            )
        return kv

    @field_validator("ubatch")
    @classmethod
    def _ubatch_within_batch(cls, ubatch: int, info: ValidationInfo) -> int:
        batch = info.data.get("batch")
        if batch is not None and ubatch > batch:
            raise ValueError(f"ubatch ({ubatch}) must be at most batch ({batch})")
        return ubatch

    def settings(self) -> LlamaSettings:
        return LlamaSettings(**self.model_dump())


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
    parallel: int | None = Field(
        default=None,
        ge=1,
        le=MAX_PARALLEL,
        description="requests a replica decodes together (its slots; more wait in its "
        f"queue); they share the context's KV cache (default: {DEFAULT_PARALLEL} for "
        "llama.cpp, 1 for fake)",
    )
    llama: Llama = Field(
        default_factory=Llama,
        description="llama.cpp's settings: flash_attn, kv_cache_type, batch, ubatch, mlock, mmap",
    )
    engine_options: dict[str, Any] = Field(
        default_factory=dict,
        description="settings of the fake engine: token_delay, prompt_delay, reply_tokens, "
        "load_delay (seconds or counts); llama.cpp takes `parallel` and `llama:` instead",
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

    @field_validator("engine_options")
    @classmethod
    def _options_of_the_fake_engine(cls, options: dict[str, Any], info: ValidationInfo) -> dict:
        if options and info.data.get("engine", "llama.cpp") == "llama.cpp":
            keys = ", ".join(sorted(map(str, options)))
            raise ValueError(
                f"engine_options are for the fake engine (got {keys}); llama.cpp takes "
                f"`parallel` and a `llama:` block (flash_attn, kv_cache_type, batch, ubatch, "
                f"mlock, mmap)"
            )
        return options

    @property
    def slots(self) -> int:
        """``parallel``, or the engine's default when the file leaves it out."""
        if self.parallel is not None:
            return self.parallel
        return DEFAULT_PARALLEL if self.engine == "llama.cpp" else 1

    def llama_settings(self) -> LlamaSettings:
        """The llama.cpp settings the engine opens its context with."""
        return self.llama.settings()


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
    return _models_of(yamlfile.load(path), Path(path).parent)


def parse_models(text: str, name: str, base: Path) -> list[ModelSpec]:
    """The model specs in ``text`` (a models file sent over the API, called ``name`` in
    errors); a relative ``.gguf`` path is taken relative to ``base``."""
    return _models_of(yamlfile.parse(text, name), base)


def dump_models(specs: list[ModelSpec]) -> str:
    """A models file that ``parse_models`` reads back as ``specs``: each setting a spec
    gives, defaults left out."""
    if not specs:
        return "models: []\n"
    models = [s.model_dump(mode="json", exclude_defaults=True) for s in specs]
    return yaml.safe_dump({"models": models}, sort_keys=False, allow_unicode=True)


def _models_of(doc: yamlfile.YamlDocument, base: Path) -> list[ModelSpec]:
    data = _resolve_sources(doc.data, base)
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

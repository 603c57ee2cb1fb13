"""Server settings: defaults < ``corral.yaml`` < ``CORRAL_*`` environment < command-line flags.

Every setting documents itself (the same text shows in ``corral serve --help``
and in ``configs/corral.yaml``). An unknown key in the file is an error with
its line number, not a silent default.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, InitSettingsSource, SettingsConfigDict

from cluster import yamlfile
from deployments.routing import Strategy
from nodes.agent import NodeSettings

ENV_PREFIX = "CORRAL_"
DEFAULT_PORT = 11434  # Ollama's, so Ollama clients work unchanged


class AuthSettings(BaseModel):
    """Who may call the API (keys come from ``corral keys create``)."""

    model_config = ConfigDict(extra="forbid")

    required: bool = Field(
        default=False,
        description="Refuse every request without a valid API key, even before any key "
        "exists. Without it, keys are needed once the first one is created.",
    )


class CorralSettings(BaseSettings):
    """Settings of one Corral server (the ingress, the controller, the replicas it starts)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid"
    )

    host: str = Field(
        default=f"127.0.0.1:{DEFAULT_PORT}",
        description="Address the API listens on, HOST:PORT (like OLLAMA_HOST). "
        "Use 0.0.0.0:11434 to serve the LAN.",
    )
    ray_address: str | None = Field(
        default=None,
        description="Ray cluster to join (HEAD_IP:6379). Unset: start a private one-box cluster.",
    )
    state_dir: Path = Field(
        default=Path("~/.corral"),
        description="Where Corral keeps its state: the Ray token, the API keys (as hashes), "
        "the controller's state (the applied models file, what runs where), the models "
        "(unless `models` says otherwise).",
    )
    models: Path | None = Field(
        default=None,
        description="Where models are stored, in Ollama's layout (blobs/, manifests/); "
        "point it at ~/.ollama/models to serve what Ollama pulled. Unset: STATE_DIR/models.",
    )
    num_ctx: int = Field(
        default=4096,
        ge=256,
        le=1_048_576,
        description="Context length (tokens) of a model replica unless the model says otherwise.",
    )
    num_threads: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="CPU threads per replica. Unset: the box's physical cores.",
    )
    max_queue: int = Field(
        default=64,
        ge=1,
        le=100_000,
        description="Requests one replica holds (running + waiting); more wait at the ingress.",
    )
    stream_interval: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="Seconds between the messages of a stream after the first token, "
        "up to 3 times that while a replica runs several streams; batching tokens leaves "
        "the CPU to the model (0: a message per token).",
    )
    load_timeout: float = Field(
        default=600.0,
        gt=0,
        description="Seconds a request waits for its model to load (a cold start) before it "
        "fails with 503; the load itself goes on.",
    )
    max_body: ByteSize = Field(
        default=ByteSize(32 * 1024**2),
        ge=1024,
        description="The largest request body the API reads, e.g. 32MiB; larger ones get 413. "
        "Model uploads (/api/blobs) are not limited.",
    )
    routing: Strategy = Field(
        default="least_loaded",
        description="How the API picks among a model's placements: least_loaded (fewest "
        "requests per replica); round_robin and random are there to compare against.",
    )
    prefix_routing: bool = Field(
        default=True,
        description="Send a conversation's next turn to the placement that served it last, "
        "whose cache holds its earlier turns, unless that one is busier than the least-loaded "
        "by more than 2 requests per replica.",
    )
    policy_interval: float = Field(
        default=0.5,
        gt=0,
        le=60,
        description="Seconds between two runs of the autoscaling and keep-alive policy.",
    )
    rpc_ports: tuple[int, int] = Field(
        default=(50052, 50067),
        description="The ports, first and last, where a box's RPC workers listen while a "
        "model split over boxes needs them (llama.cpp RPC: no authentication, so the "
        "firewall must open them only between the cluster's boxes).",
    )
    dashboard: bool = Field(
        default=True,
        description="Start Ray's dashboard on 127.0.0.1:8265 (private cluster only).",
    )
    node: NodeSettings = Field(
        default_factory=NodeSettings,
        description="How this box joins the cluster (corral node start): name, reserves, caps, "
        "ports. Environment: CORRAL_NODE__RESERVE_RAM=4GiB and so on.",
    )
    auth: AuthSettings = Field(
        default_factory=AuthSettings,
        description="API keys: once `corral keys create` made one, every request needs "
        "`Authorization: Bearer <key>` (GET / stays open for health checks).",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info",
        description="Verbosity of Corral's own logs; debug adds a line per HTTP request.",
    )

    @field_validator("rpc_ports")
    @classmethod
    def _check_rpc_ports(cls, value: tuple[int, int]) -> tuple[int, int]:
        first, last = value
        if not 1024 <= first <= last <= 65535:
            raise ValueError(f"{first}-{last}: give the first and last port, 1024 to 65535")
        return value

    @field_validator("host")
    @classmethod
    def _check_host(cls, value: str) -> str:
        parse_host(value)
        return value

    @property
    def listen(self) -> tuple[str, int]:
        """The (host, port) the API binds."""
        return parse_host(self.host)

    @property
    def state_path(self) -> Path:
        return self.state_dir.expanduser()

    @property
    def models_path(self) -> Path:
        """The model store's root (``models``, else ``STATE_DIR/models``)."""
        return (self.models or self.state_dir / "models").expanduser()


def parse_host(value: str) -> tuple[str, int]:
    """``HOST:PORT``, ``HOST``, ``:PORT`` or ``http://HOST:PORT`` -> (host, port)."""
    text = value.strip().removeprefix("http://").rstrip("/")
    if "://" in text:
        raise ValueError(f"{value!r}: use HOST:PORT (plain HTTP), e.g. 127.0.0.1:11434")
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, str(DEFAULT_PORT)
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r}: the port must be a number from 1 to 65535")
    return host.strip("[]") or "127.0.0.1", int(port)


def load_settings(config: str | Path | None = None, **overrides: Any) -> CorralSettings:
    """Settings from ``config`` (or ``$CORRAL_CONFIG``), the environment and ``overrides``.

    ``overrides`` are command-line values; ``None`` means "not given".
    Raises ``yamlfile.ConfigError`` with a message that says what to fix.
    """
    config = config or os.environ.get(f"{ENV_PREFIX}CONFIG") or None
    doc = yamlfile.load(config) if config else None
    file_values = doc.data if doc else {}

    class _WithFile(CorralSettings):
        @classmethod
        def settings_customise_sources(  # type: ignore[override]
            cls, settings_cls, init_settings, env_settings, **_: Any
        ):
            return init_settings, env_settings, InitSettingsSource(settings_cls, file_values)

    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        loaded = _WithFile(**given)
    except ValidationError as exc:
        raise _settings_error(exc, doc, given) from None
    # A plain CorralSettings (not the local subclass) so it pickles to Ray actors;
    # model_validate (unlike the constructor) reads no environment again.
    return CorralSettings.model_validate(loaded.model_dump())


def _settings_error(
    exc: ValidationError, doc: yamlfile.YamlDocument | None, given: dict[str, Any]
) -> yamlfile.ConfigError:
    """Name where each bad value came from: the flag, the variable, or the file line."""
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = str(loc[0]) if loc else ""
        env = ENV_PREFIX + "__".join(str(p).upper() for p in loc)
        if key in given:  # a flag; for node settings the flag is the inner name
            where = "--" + str(loc[-1] if key == "node" else key).replace("_", "-")
        elif env in os.environ:
            where = env
        elif doc is not None:
            where = f"{doc.path}:{doc.line_of(loc) or 1}: {'.'.join(map(str, loc))}"
        else:
            where = key
        lines.append(f"{where}: {yamlfile.explain_error(err)}")
    return yamlfile.ConfigError("\n".join(lines))

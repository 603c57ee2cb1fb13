"""Ollama wire types: requests as Ollama's clients send them, responses as they read them.

The shapes follow Ollama's ``api/types.go`` and the official ``ollama`` Python
client. Requests keep fields we do not know (Ollama adds fields often and
clients send them); ``ignored_fields`` lists them so the serving layer can log
them. Fields we know but cannot honour are refused in ``serving.py`` with a
message, never silently dropped.

Responses are serialised without ``None`` fields, as Ollama's ``omitempty``
leaves them out: a streamed piece has no ``done_reason``, a model without a
system prompt no ``system``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    Field,
)

from deployments.protocol_base import KeepAlive, LenientRequest

# Ollama lower-cases roles before it looks at them ("User" is "user").
Role = Annotated[
    Literal["system", "user", "assistant", "tool"],
    BeforeValidator(lambda v: v.lower() if isinstance(v, str) else v),
]
# "model", or "name" as clients older than Ollama 0.5 send it.
ModelName = Annotated[str, Field(min_length=1, validation_alias=AliasChoices("model", "name"))]


class OllamaRequest(LenientRequest):
    """Base for Ollama request bodies (``deployments/protocol_base.py``)."""


class ToolCallFunctionIn(BaseModel):
    index: int | None = None
    name: str
    arguments: dict[str, Any] | str | None = None  # an object; a JSON string from some clients


class ToolCallIn(BaseModel):
    id: str | None = None
    function: ToolCallFunctionIn


class Message(OllamaRequest):
    role: Role
    # null reads as empty text, as Go decodes it into a string
    content: Annotated[str, BeforeValidator(lambda v: "" if v is None else v)] = ""
    images: list[str] | None = None
    tool_calls: list[ToolCallIn] | None = None  # an assistant turn's calls
    thinking: str | None = None  # an assistant turn's thinking
    tool_name: str | None = None  # a tool turn: the tool that answered (Ollama's field)
    tool_call_id: str | None = None  # ... or the call it answers (Open WebUI sends this)


class GenerationFields(OllamaRequest):
    """What /api/chat and /api/generate share."""

    model: str = Field(min_length=1)
    stream: bool = True  # Ollama streams unless told not to
    format: Any = None  # "json" or a JSON schema; checked in serving.py
    options: dict[str, Any] | None = None
    keep_alive: KeepAlive = None
    think: bool | str | None = None
    logprobs: bool | None = None


class ChatRequest(GenerationFields):
    messages: list[Message] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None  # checked by nodes.chat_output.calls
    # Corral's extension, OpenAI's values: "auto", "none", "required" or a named function.
    tool_choice: str | dict[str, Any] | None = None


class GenerateRequest(GenerationFields):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None
    images: list[str] | None = None


class EmbedRequest(OllamaRequest):
    model: str = Field(min_length=1)
    input: str | list[str] = ""
    truncate: bool | None = None
    options: dict[str, Any] | None = None
    keep_alive: KeepAlive = None
    dimensions: int | None = Field(default=None, ge=1)


class EmbeddingsRequest(OllamaRequest):
    """The legacy /api/embeddings: one prompt, one vector."""

    model: str = Field(min_length=1)
    prompt: str = ""
    options: dict[str, Any] | None = None
    keep_alive: KeepAlive = None


class ModelRequest(OllamaRequest):
    """A request about one model of the library (show, delete)."""

    model: ModelName


class ShowRequest(ModelRequest):
    verbose: bool = False


class PullRequest(ModelRequest):
    insecure: bool = False
    stream: bool = True


class CreateRequest(ModelRequest):
    stream: bool = True
    from_: str | None = Field(default=None, alias="from")
    files: dict[str, str] | None = None
    adapters: dict[str, str] | None = None
    template: str | None = None
    system: str | None = None
    parameters: dict[str, Any] | None = None
    license: str | list[str] | None = None
    messages: list[dict[str, Any]] | None = None
    quantize: str | None = Field(
        default=None, validation_alias=AliasChoices("quantize", "quantization")
    )
    modelfile: str | None = None  # Ollama's create before 0.5: refused with a pointer


class CopyRequest(OllamaRequest):
    source: str = Field(min_length=1)
    destination: str = Field(min_length=1)


# -- responses -----------------------------------------------------------------------


class ToolCallFunctionOut(BaseModel):
    index: int
    name: str
    arguments: dict[str, Any]


class ToolCallOut(BaseModel):
    id: str
    function: ToolCallFunctionOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    thinking: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChunk(BaseModel):
    """One object of a chat stream; the last one (``done``) also carries ``Metrics``."""

    model: str
    created_at: str
    message: AssistantMessage
    done: bool
    done_reason: str | None = None


class GenerateChunk(BaseModel):
    """One object of a generate stream; the last one (``done``) also carries ``Metrics``."""

    model: str
    created_at: str
    response: str
    thinking: str | None = None
    done: bool
    done_reason: str | None = None


class Metrics(BaseModel):
    """Token counts and durations in nanoseconds, ending a generation."""

    total_duration: int
    load_duration: int
    prompt_eval_count: int
    prompt_eval_duration: int
    eval_count: int
    eval_duration: int


class EmbedResponse(BaseModel):
    model: str
    embeddings: list[list[float]]
    total_duration: int
    load_duration: int
    prompt_eval_count: int


class EmbeddingsResponse(BaseModel):
    embedding: list[float]


class Details(BaseModel):
    parent_model: str = ""
    format: str = "gguf"
    family: str = ""
    families: list[str] = Field(default_factory=list)
    parameter_size: str = ""
    quantization_level: str = ""


class ListedModel(BaseModel):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: Details


class TagsResponse(BaseModel):
    models: list[ListedModel]


class Placement(BaseModel):
    """Corral's extension to /api/ps: where a model runs."""

    node: str
    replicas: int
    status: str
    slots: int = 0  # requests its replicas run at once, together
    in_flight: int = 0  # requests running or waiting on them now


class RunningModel(BaseModel):
    name: str
    model: str
    size: int  # bytes of RAM and VRAM, every replica together
    digest: str
    details: Details
    expires_at: str
    size_vram: int
    context_length: int
    placements: list[Placement]


class PsResponse(BaseModel):
    models: list[RunningModel]


class ShowResponse(BaseModel):
    license: str | None = None
    modelfile: str
    parameters: str | None = None
    template: str | None = None
    system: str | None = None
    details: Details
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str


class VersionResponse(BaseModel):
    version: str

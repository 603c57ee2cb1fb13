"""OpenAI Responses API wire types: requests as clients send them.

Input items are told apart by ``type`` (a message may leave it out, as OpenAI
allows). Unknown fields are kept and logged, as on the other OpenAI routes.
Response objects and stream events are plain dicts built in ``serving.py``, in
the shapes of OpenAI's ``Response`` and its typed stream events.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from deployments.openai.protocol import OpenAIRequest
from deployments.protocol_base import KeepAlive


class Part(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextPart(Part):
    type: Literal["input_text", "output_text", "summary_text", "reasoning_text"]
    text: str


class ImagePart(Part):
    type: Literal["input_image"]
    image_url: str | None = None  # a data: URL (nothing is fetched)
    file_id: str | None = None
    detail: str | None = None


class RefusedPart(Part):
    """Kinds of content Corral refuses by name."""

    type: Literal["input_file", "input_audio", "refusal"]


ContentPart = Annotated[TextPart | ImagePart | RefusedPart, Field(discriminator="type")]


class Item(BaseModel):
    model_config = ConfigDict(extra="allow")


class MessageItem(Item):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]


class FunctionCallItem(Item):
    """A call an earlier answer made."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str | dict[str, Any] | None = None


class FunctionCallOutputItem(Item):
    """The result of a call."""

    type: Literal["function_call_output"]
    call_id: str
    output: str | list[ContentPart]


class ReasoningItem(Item):
    """An earlier answer's reasoning, sent back."""

    type: Literal["reasoning"]
    summary: list[TextPart] = Field(default_factory=list)
    content: list[TextPart] | None = None


class OtherItem(Item):
    """Any other kind of item (server tools' calls ...): refused by name in serving.py."""

    type: str


def _item_kind(value: Any) -> str:
    kind = value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", "")
    return kind if isinstance(kind, str) and kind in _KNOWN_ITEMS else "other"


_KNOWN_ITEMS = {"message", "function_call", "function_call_output", "reasoning"}

InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")]
    | Annotated[OtherItem, Tag("other")],
    Discriminator(_item_kind),
]


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="allow")

    format: TextFormat | None = None


class Reasoning(BaseModel):
    model_config = ConfigDict(extra="allow")

    effort: str | None = None
    summary: str | None = None


class ResponsesRequest(OpenAIRequest):
    model: str = Field(min_length=1)
    input: str | list[InputItem]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None  # function tools; checked in serving.py
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    text: TextConfig | None = None
    reasoning: Reasoning | None = None
    stream: bool = False
    store: bool | None = None  # accepted and ignored: nothing is stored
    previous_response_id: str | None = None  # refused: Corral keeps no responses
    conversation: str | dict[str, Any] | None = None  # refused, likewise
    background: bool | None = None
    metadata: dict[str, Any] | None = None
    user: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    # llama.cpp's and Ollama's extensions, as on the chat route
    top_k: int | None = Field(default=None, ge=0)
    seed: int | None = None
    keep_alive: KeepAlive = None

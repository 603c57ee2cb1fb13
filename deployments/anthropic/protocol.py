"""Anthropic Messages API wire types: requests as its clients send them, answers as they read them.

As on the OpenAI routes, requests accept fields Corral does not know (Anthropic
adds new ones, and Claude Code sends ``metadata``, ``cache_control`` and betas);
``ignored_fields`` lists them for the serving layer to log. Content blocks Corral
cannot use (documents, server tools) are refused in ``serving.py`` with a message.

Streamed answers are SSE events ``event: <type>`` / ``data: <json>``, built as
plain dicts in ``serving.py`` in the order Anthropic sends them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from deployments.openai.protocol import OpenAIRequest
from deployments.protocol_base import KeepAlive


class Block(BaseModel):
    """Base for content blocks: extra fields (``cache_control``, ``citations``) are kept."""

    model_config = ConfigDict(extra="allow")


class TextBlock(Block):
    type: Literal["text"]
    text: str


class ImageSource(Block):
    type: Literal["base64", "url", "file"]
    media_type: str | None = None
    data: str | None = None  # base64, for type "base64"
    url: str | None = None  # for type "url": only data: URLs (nothing is fetched)


class ImageBlock(Block):
    type: Literal["image"]
    source: ImageSource


class ToolUseBlock(Block):
    """A tool call an assistant turn made."""

    type: Literal["tool_use"]
    id: str
    name: str
    input: Any = None  # an object of arguments; checked in serving.py


class ToolResultBlock(Block):
    """The result of a call, in a user turn."""

    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[Annotated[TextBlock | ImageBlock, Field(discriminator="type")]] | None = (
        None
    )
    is_error: bool | None = None


class ThinkingBlock(Block):
    """An assistant turn's thinking, sent back (its ``signature`` means nothing here)."""

    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(Block):
    type: Literal["redacted_thinking"]
    data: str = ""


class DocumentBlock(Block):
    """Accepted so that it can be refused by name, not as a shapeless validation error."""

    type: Literal["document", "search_result", "server_tool_use", "web_search_tool_result"]


ContentBlock = Annotated[
    TextBlock
    | ImageBlock
    | ToolUseBlock
    | ToolResultBlock
    | ThinkingBlock
    | RedactedThinkingBlock
    | DocumentBlock,
    Field(discriminator="type"),
]


class MessageIn(Block):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class ToolChoice(Block):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class Thinking(Block):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(default=None, ge=0)


class OutputConfig(Block):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None


class AnthropicRequest(OpenAIRequest):
    """Fields shared by a message and a token count."""

    model: str = Field(min_length=1)
    messages: list[MessageIn] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[dict[str, Any]] | None = None  # checked by nodes.chat_output.calls
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None  # its effort: a thinking level


class MessagesRequest(AnthropicRequest):
    max_tokens: int = Field(ge=1)  # required, as Anthropic requires it
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    stream: bool = False
    metadata: dict[str, Any] | None = None
    # how long the model stays loaded after this request (Ollama's keep_alive), an extension
    keep_alive: KeepAlive = None


class CountTokensRequest(AnthropicRequest):
    pass


# -- answers ---------------------------------------------------------------------------


class Usage(BaseModel):
    input_tokens: int
    output_tokens: int


class Message(BaseModel):
    """A whole answer; ``content`` holds text, thinking and tool_use blocks as dicts."""

    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[dict[str, Any]]
    stop_reason: str | None
    stop_sequence: str | None = None
    usage: Usage


class TokenCount(BaseModel):
    input_tokens: int

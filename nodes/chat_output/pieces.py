"""What a parser makes of a model's output: answer text, thinking, and tool calls."""

from __future__ import annotations

from dataclasses import dataclass

from nodes.chat_output.calls import ToolCall


@dataclass(frozen=True, slots=True)
class Text:
    """Part of the answer (the message's content)."""

    text: str


@dataclass(frozen=True, slots=True)
class Thought:
    """Part of the model's thinking, without its tags."""

    text: str


Piece = Text | Thought | ToolCall


def merge(pieces: list[Piece]) -> list[Piece]:
    """Adjacent texts (and adjacent thoughts) joined; empty ones dropped."""
    out: list[Piece] = []
    for piece in pieces:
        if isinstance(piece, Text | Thought) and not piece.text:
            continue
        if out and type(out[-1]) is type(piece) and isinstance(piece, Text | Thought):
            out[-1] = type(piece)(out[-1].text + piece.text)  # type: ignore[union-attr]
        else:
            out.append(piece)
    return out

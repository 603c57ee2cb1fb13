"""An engine's output, read as its plan says: text in, generation events out.

Shared by both engines so that the layers above see the same events whichever
runs: ``TextDelta`` for the answer, ``ThinkingDelta`` for thinking, and one
``ToolCallEvent`` per whole call, numbered and given an id (Ollama's
``call_`` and eight letters or digits; nine letters or digits for Mistral,
whose templates insist on that when the call comes back in the history).
"""

from __future__ import annotations

import secrets
import string
from collections.abc import Callable
from dataclasses import replace

from nodes.chat_output.calls import ToolCall
from nodes.chat_output.pieces import Piece, Text, Thought
from nodes.chat_output.plan import OutputPlan
from nodes.engine import GenerationEvent, TextDelta, ThinkingDelta, ToolCallEvent

_LOWER = string.ascii_lowercase + string.digits
_ALNUM = string.ascii_letters + string.digits


def new_call_id(family: str | None) -> str:
    """A fresh id for a call the model made."""
    if family == "mistral":
        return "".join(secrets.choice(_ALNUM) for _ in range(9))
    return "call_" + "".join(secrets.choice(_LOWER) for _ in range(8))


class OutputReader:
    """Feeds output text through the plan's parser (if any) and numbers the calls."""

    def __init__(
        self, plan: OutputPlan | None, new_id: Callable[[str | None], str] = new_call_id
    ) -> None:
        self._family = plan.family if plan else None
        self._parser = plan.parser() if plan else None
        self._new_id = new_id
        self.calls = 0  # tool calls read so far

    def feed(self, text: str) -> list[GenerationEvent]:
        if self._parser is None:
            return [TextDelta(text)] if text else []
        return self._events(self._parser.feed(text))

    def finish(self) -> list[GenerationEvent]:
        return self._events(self._parser.finish()) if self._parser else []

    def _events(self, pieces: list[Piece]) -> list[GenerationEvent]:
        events: list[GenerationEvent] = []
        for piece in pieces:
            if isinstance(piece, Text):
                events.append(TextDelta(piece.text))
            elif isinstance(piece, Thought):
                events.append(ThinkingDelta(piece.text))
            else:
                events.append(ToolCallEvent(self.calls, self._with_id(piece)))
                self.calls += 1
        return events

    def _with_id(self, call: ToolCall) -> ToolCall:
        return call if call.id else replace(call, id=self._new_id(self._family))

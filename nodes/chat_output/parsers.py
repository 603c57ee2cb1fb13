"""Streaming parsers of a model's output, one per tool-call format, behind one interface.

Each is fed the output as it is generated (``feed``) and told when it ends
(``finish``); each returns the pieces it is sure of. Text that may still turn
out to be a tool call is held back, and only that; markup of a call never
reaches the answer. Text that only looked like a call (a JSON answer, a
mention of ``<tool_call>`` in prose that never closes into a valid call) is
released as text once that is clear.

* ``TaggedCalls``: calls between an opening and a closing tag, anywhere in the
  output: Hermes and Qwen's ``<tool_call>{"name": ..., "arguments": ...}</tool_call>``,
  and SmolLM2's list of calls between the same tags.
* ``MistralCalls``: ``[TOOL_CALLS]`` followed by a JSON array of calls (Mistral
  Nemo, Small 3.1) or by ``name[ARGS]{...}`` (later Mistral templates).
* ``LeadingJsonCalls``: the whole output is a JSON call (or array of calls),
  optionally after Llama 3.1's ``<|python_tag|>``: Llama 3.x and the fallback
  for templates whose markup is unknown. The name must be one of the tools
  offered, so a JSON answer stays an answer.
* ``ThinkingSplitter``: ``<think>…</think>`` (or the tags a template declares)
  at the start of the output is thinking, as Ollama's thinking parser reads it.

``ChatOutputParser`` chains a thinking splitter and a tool-call parser.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection
from typing import Protocol

from nodes.chat_output.calls import ToolCall
from nodes.chat_output.jsonscan import calls_from, json_end, load
from nodes.chat_output.pieces import Piece, Text, Thought, merge
from nodes.chat_output.template import Family


class OutputParser(Protocol):
    """Turns streamed output text into pieces (see the module docstring)."""

    def feed(self, text: str) -> list[Piece]: ...

    def finish(self) -> list[Piece]: ...


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``tag``."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class _Calls:
    """Shared by the tool-call parsers: the text streamed before a call's mark, and
    whitespace right after a call, which is not an answer."""

    def __init__(self) -> None:
        self.called = False
        self._after_call = False
        self._buf = ""  # what came and is not sent yet

    def _up_to(self, mark: str, out: list[Piece]) -> bool:
        """Send the buffered text before ``mark`` to ``out``; whether ``mark`` is there (the
        buffer then starts with it). Without it, an end that may begin it stays buffered."""
        at = self._buf.find(mark)
        if at < 0:
            keep = partial_suffix(self._buf, mark)
            out += self._text(self._buf[: len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep :]
            return False
        out += self._text(self._buf[:at])
        self._buf = self._buf[at:]
        return True

    def _text(self, text: str) -> list[Piece]:
        if self._after_call:
            text = text.lstrip()
            self._after_call = not text
        return [Text(text)] if text else []

    def _calls(self, calls: list[ToolCall]) -> list[Piece]:
        self.called = self._after_call = True
        return list(calls)


class _MarkedCalls(_Calls, ABC):
    """Calls that each start with a ``mark``: text until a mark, then the call once it is
    whole (``_take``), then text again."""

    mark: str  # what opens a call

    def __init__(self) -> None:
        super().__init__()
        self._inside = False  # the buffer starts with a call's mark

    def feed(self, text: str) -> list[Piece]:
        self._buf += text
        out: list[Piece] = []
        while True:
            if not self._inside:
                if not self._up_to(self.mark, out):
                    return merge(out)
                self._inside = True
            taken = self._take()
            if taken is None:
                return merge(out)
            out += taken
            self._inside = False

    @abstractmethod
    def _take(self) -> list[Piece] | None:
        """The call the buffer starts with, taken off it once it is whole (None until then)."""


class TaggedCalls(_MarkedCalls):
    """Calls written as ``OPEN {json} CLOSE`` (Hermes, Qwen)."""

    def __init__(self, opening: str = "<tool_call>", closing: str = "</tool_call>") -> None:
        super().__init__()
        self.opening, self.closing = opening, closing
        self.mark = opening

    def _take(self) -> list[Piece] | None:
        end = self._buf.find(self.closing, len(self.opening))
        if end < 0:
            return None
        pieces = self._call(self._buf[: end + len(self.closing)], end)
        self._buf = self._buf[end + len(self.closing) :]
        return pieces

    def _call(self, raw: str, end: int) -> list[Piece]:
        # One call, or (SmolLM2) a list of them, between the tags.
        calls = calls_from(load(raw[len(self.opening) : end].strip()))
        return self._calls(calls) if calls else [Text(raw)]

    def finish(self) -> list[Piece]:
        raw, self._buf = self._buf, ""
        if self._inside:  # the model stopped before the closing tag: calls if they are whole
            self._inside = False
            return self._call(raw, len(raw))
        return merge(self._text(raw))


class MistralCalls(_MarkedCalls):
    """``[TOOL_CALLS][{...}, ...]`` or ``[TOOL_CALLS]name[ARGS]{...}`` (Mistral)."""

    MARK, ARGS = "[TOOL_CALLS]", "[ARGS]"
    mark = MARK

    def _take(self) -> list[Piece] | None:
        """The calls after the mark once they are whole (None until then)."""
        self._buf = self._buf.removeprefix(self.MARK)
        body = self._buf.lstrip()
        skipped = len(self._buf) - len(body)
        if not body:
            return None
        if body[0] == "[":
            end = json_end(body)
            if end is None:
                return None
            calls = calls_from(load(body[:end]))
            self._buf = body[end:]
            return self._calls(calls) if calls else [Text(self.MARK + body[:end])]
        args = body.find(self.ARGS)
        if args < 0:
            return None
        start = body.find("{", args)
        end = json_end(body, start) if start >= 0 else None
        if end is None:
            return None
        name = body[:args].split("[CALL_ID]")[0].strip()
        arguments = load(body[start:end])
        self._buf = body[end:]
        if name and isinstance(arguments, dict):
            return self._calls([ToolCall(name=name, arguments=arguments)])
        return [Text(self.MARK + " " * skipped + body[:end])]

    def finish(self) -> list[Piece]:
        out: list[Piece] = []
        if self._inside:
            out = self._take() or []
            if not out and self._buf.strip():  # cut short: what there is, as text
                out = [Text(self.MARK + self._buf)]
            self._buf, self._inside = "", False
        out += self._text(self._buf)
        self._buf = ""
        return merge(out)


class LeadingJsonCalls(_Calls):
    """The output is a JSON call or array of calls, maybe after ``<|python_tag|>``."""

    PYTHON_TAG = "<|python_tag|>"

    def __init__(self, names: Collection[str]) -> None:
        super().__init__()
        self.names = set(names)
        self._decided = False  # the output was found not to start with a call

    def feed(self, text: str) -> list[Piece]:
        if self._decided:
            return self._text(text) if text else []
        self._buf += text
        out: list[Piece] = []
        while True:
            body = self._buf.lstrip()
            if self.called:  # Llama 3 separates calls with ";"
                body = body.removeprefix(";").lstrip()
            if body.startswith(self.PYTHON_TAG):
                body = body[len(self.PYTHON_TAG) :].lstrip()
            if not body or (self.PYTHON_TAG.startswith(body) and not self.called):
                return merge(out)  # only whitespace, or maybe the tag: wait
            if body[0] not in "{[":
                return merge(out + self._give_up())
            end = json_end(body)
            if end is None:
                return merge(out)
            calls = calls_from(load(body[:end]), self.names)
            if calls is None:
                return merge(out + self._give_up())
            out += self._calls(calls)
            self._buf = body[end:]

    def _give_up(self) -> list[Piece]:
        self._decided = True
        text, self._buf = self._buf, ""
        return self._text(text)

    def finish(self) -> list[Piece]:
        if self._decided:
            return []
        return merge(self._give_up())


class ThinkingSplitter:
    """Thinking between two tags at the start of the output, then the answer.

    ``thinking`` is True when the prompt already opened the tag (the template
    ends its generation prompt with it, as DeepSeek-R1's does). Whitespace
    right after either tag is dropped, as Ollama drops it.
    """

    def __init__(self, opening: str, closing: str, *, thinking: bool = False) -> None:
        self.opening, self.closing = opening, closing
        self._state = "eat" if thinking else "look"  # look, eat, think, after, done
        self._buf = ""

    def feed(self, text: str) -> list[Piece]:
        self._buf += text
        out: list[Piece] = []
        while self._buf:
            if self._state == "look":
                body = self._buf.lstrip()
                if body.startswith(self.opening):
                    self._buf, self._state = body[len(self.opening) :], "eat"
                    continue
                if not body or self.opening.startswith(body):
                    break
                self._state = "done"
            elif self._state in ("eat", "after"):
                self._buf = self._buf.lstrip()
                if not self._buf:
                    break
                self._state = "think" if self._state == "eat" else "done"
            elif self._state == "think":
                at = self._buf.find(self.closing)
                if at >= 0:
                    out.append(Thought(self._buf[:at]))
                    self._buf, self._state = self._buf[at + len(self.closing) :], "after"
                    continue
                keep = partial_suffix(self._buf, self.closing)
                out.append(Thought(self._buf[: len(self._buf) - keep]))
                self._buf = self._buf[len(self._buf) - keep :]
                break
            else:  # done: the rest is the answer
                out.append(Text(self._buf))
                self._buf = ""
        return merge(out)

    def finish(self) -> list[Piece]:
        rest, self._buf = self._buf, ""
        if self._state == "think":  # never closed: it was all thinking
            return merge([Thought(rest)])
        if self._state == "look":  # only whitespace, or a start of the tag
            return merge([Text(rest)])
        return merge([Text(rest)]) if self._state == "done" else []


def tool_call_parser(family: Family, names: Collection[str]) -> OutputParser:
    """The parser of tool calls for a template ``family``, offered tools ``names``."""
    if family in ("hermes", "hermes_list"):
        return TaggedCalls()
    if family == "mistral":
        return MistralCalls()
    return LeadingJsonCalls(names)


class ChatOutputParser:
    """Thinking first (if it splits any), then tool calls (if it parses any)."""

    def __init__(self, thinking: ThinkingSplitter | None, calls: OutputParser | None) -> None:
        self._thinking = thinking
        self._calls = calls

    def feed(self, text: str) -> list[Piece]:
        pieces = self._thinking.feed(text) if self._thinking else [Text(text)]
        return self._through_calls(pieces, final=False)

    def finish(self) -> list[Piece]:
        pieces = self._thinking.finish() if self._thinking else []
        return self._through_calls(pieces, final=True)

    def _through_calls(self, pieces: list[Piece], *, final: bool) -> list[Piece]:
        if self._calls is None:
            return merge(pieces)
        out: list[Piece] = []
        for piece in pieces:
            out += self._calls.feed(piece.text) if isinstance(piece, Text) else [piece]
        if final:
            out += self._calls.finish()
        return merge(out)

"""The Ollama Modelfile: what ``corral create -f Modelfile`` reads.

``parse_modelfile`` turns the text into a ``Modelfile`` (FROM, PARAMETER,
TEMPLATE, SYSTEM, LICENSE, and a second FROM for a vision model's projector),
and ``ModelfileError`` names the line that is wrong. ``model_file`` and
``is_gguf`` tell a GGUF file from a model name and from a Modelfile. Nothing
here talks to a server.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ModelfileError(ValueError):
    """A Modelfile that cannot be used, and on which line (0: the file as a whole)."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line


@dataclass(frozen=True)
class Modelfile:
    """What a Modelfile asks for, as ``/api/create`` fields."""

    source: str  # FROM: a GGUF path (relative to the Modelfile's folder) or a model name
    parameters: dict[str, Any] = field(default_factory=dict)
    # A second FROM, as Ollama takes a vision model: the projector's GGUF file (the server
    # tells the model from the projector by their headers, so the order does not matter).
    projector: str | None = None
    template: str | None = None
    system: str | None = None
    license: str | None = None


_INSTRUCTIONS = "FROM, PARAMETER, TEMPLATE, SYSTEM or LICENSE"
_UNSUPPORTED = {"adapter", "draft", "message", "parser", "renderer", "requires"}
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_PARAMETER_NAME = re.compile(r"[A-Za-z0-9_]+")


def parse_modelfile(text: str) -> Modelfile:
    """The instructions of an Ollama Modelfile; ``ModelfileError`` names the bad line."""
    lines = text.removeprefix("\ufeff").splitlines()
    values: dict[str, Any] = {"parameters": {}}
    licenses: list[str] = []
    from_line = 0
    i = 0
    while i < len(lines):
        number, line = i + 1, lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.replace("\t", " ").partition(" ")
        instruction = word.lower()
        if instruction in _UNSUPPORTED:
            raise ModelfileError(number, f"{word.upper()} is not supported by Corral")
        if instruction not in ("from", "parameter", "template", "system", "license"):
            raise ModelfileError(number, f"unknown instruction {word!r}: use {_INSTRUCTIONS}")
        rest = rest.strip()
        if rest.startswith('"""'):
            value, i = _triple_quoted(rest[3:], lines, i, number)
        else:
            value = _unquote(rest, number)
        if not value and instruction in ("from", "parameter"):
            raise ModelfileError(number, f"{word.upper()} needs a value")
        if instruction == "from":
            if "projector" in values:
                raise ModelfileError(
                    number, "a third FROM: give a model and at most one projector (mmproj)"
                )
            if from_line:
                values["projector"] = value
            else:
                values["source"], from_line = value, number
        elif instruction == "parameter":
            name, value = _parameter(rest, number)
            if name == "stop":
                values["parameters"].setdefault("stop", []).append(value)
            else:
                values["parameters"][name] = value
        elif instruction == "license":
            licenses.append(value)
        else:
            values[instruction] = value
    if not from_line:
        raise ModelfileError(0, "no FROM line: start with FROM ./model.gguf or FROM <model name>")
    if licenses:
        values["license"] = "\n\n".join(licenses)
    return Modelfile(**values)


def _triple_quoted(start: str, lines: list[str], i: int, number: int) -> tuple[str, int]:
    """The text up to the closing ``\"\"\"`` (kept verbatim) and the index of the next line."""
    body = start
    while '"""' not in body:
        if i >= len(lines):
            raise ModelfileError(number, 'the """ opened here is never closed')
        body += "\n" + lines[i]
        i += 1
    value, _, after = body.partition('"""')
    if after.strip():
        raise ModelfileError(i, f'unexpected text after the closing """: {after.strip()!r}')
    return value, i


def _unquote(text: str, number: int) -> str:
    if text.startswith('"'):
        if len(text) < 2 or not text.endswith('"'):
            raise ModelfileError(number, f"the quote in {text!r} is never closed")
        return text[1:-1]
    return text


def _parameter(rest: str, number: int) -> tuple[str, Any]:
    """``PARAMETER name value``: the name and the value (a number or bool when it is one;
    a ``stop`` sequence stays text)."""
    name, _, value = rest.partition(" ")
    value = _unquote(value.strip(), number)
    if not _PARAMETER_NAME.fullmatch(name) or not value:
        raise ModelfileError(number, "PARAMETER needs a name and a value, like: PARAMETER top_k 20")
    if name == "stop":
        return name, value
    if _NUMBER.fullmatch(value):
        return name, float(value) if re.search(r"[.eE]", value) else int(value)
    if value.lower() in ("true", "false"):
        return name, value.lower() == "true"
    return name, value


def model_file(source: str, folder: Path) -> Path | None:
    """The GGUF file FROM names (``~`` expanded, relative to ``folder``), None for a model name."""
    path = folder / Path(source).expanduser()
    if path.is_dir():
        raise ModelfileError(0, f"FROM {source}: {path} is a folder, not a GGUF file")
    if path.is_file():
        return path
    if source.startswith(("/", "./", "../", "~")) or source.lower().endswith(".gguf"):
        raise ModelfileError(0, f"FROM {source}: there is no file {path}")
    return None


def is_gguf(path: Path) -> bool:
    """A GGUF file rather than a Modelfile: by its name, or by its first four bytes."""
    if path.suffix.lower() == ".gguf":
        return True
    with path.open("rb") as file:
        return file.read(4) == b"GGUF"

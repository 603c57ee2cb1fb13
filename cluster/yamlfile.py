"""YAML config files whose errors name the file, the line and the field.

``load(path)`` parses a file (``parse(text, path)`` text that came from elsewhere, such
as the dashboard, under the name ``path``) and remembers the line of every key and list item,
so that pydantic's errors (which know only the field path) can be reported as
``file:line: field: problem`` (see ``YamlDocument.line_of``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

Loc = tuple[str | int, ...]


class ConfigError(Exception):
    """A config file a person must fix; the message says where and how."""


class YamlDocument:
    """A parsed YAML mapping plus the line number of each of its nodes."""

    def __init__(self, path: Path, data: dict[str, Any], lines: dict[Loc, int]) -> None:
        self.path = path
        self.data = data
        self._lines = lines

    def line_of(self, loc: Loc) -> int | None:
        """Line (1-based) of the deepest node of ``loc`` that exists in the file."""
        for end in range(len(loc), -1, -1):
            if (line := self._lines.get(loc[:end])) is not None:
                return line
        return None


def load(path: str | Path) -> YamlDocument:
    """Parse ``path``, which must hold a mapping (an empty file is an empty mapping)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the file: {exc.strerror}") from None
    return parse(text, path)


def parse(text: str, path: str | Path) -> YamlDocument:
    """Parse ``text``, which must hold a mapping; errors name it ``path``."""
    path = Path(path)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    if data is None:
        return YamlDocument(path, {}, {})
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: the file must be a mapping of settings (key: value)")
    lines: dict[Loc, int] = {}
    _index(root, (), lines)
    return YamlDocument(path, data, lines)


def _index(node: yaml.Node, loc: Loc, lines: dict[Loc, int]) -> None:
    lines.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = (*loc, key.value)
            lines[child] = key.start_mark.line + 1
            _index(value, child, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index(item, (*loc, i), lines)


def explain_error(err: dict[str, Any]) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown setting (check the spelling; see the commented example config)"
    if err["type"] == "missing":
        return "required setting is missing"
    return str(err["msg"])

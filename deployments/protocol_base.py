"""What every API's request types and serving share: lenient bodies and common refusals.

Clients send fields Corral does not know (every API adds new ones often), so
request bodies keep them (``LenientRequest``, ``extra="allow"``) and the
serving layer logs what it ignores (``log_ignored``) instead of refusing the
request. Fields Corral knows but cannot honour are refused with a message that
names them; the refusals that more than one API makes are here, so that each
reads the same on every route.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, model_validator

from nodes.durations import parse_duration
from nodes.errors import InvalidRequest

# Ollama's keep_alive ("5m", 300, 0, -1); on the other APIs an extension.
KeepAlive = Annotated[
    float | None, BeforeValidator(lambda v: None if v is None else parse_duration(v))
]

MAX_STOP_SEQUENCES = 16

# Fields that more than one API has and Corral cannot honour, and why.
_REFUSED = {
    "logprobs": "logprobs are not supported.",
    "suffix": "Fill-in-the-middle (suffix) is not supported.",
}


def refuse_lone_surrogates(data: Any) -> Any:
    """``data`` unchanged; ``InvalidRequest`` naming the first string that is not Unicode text.

    JSON may escape half of a UTF-16 pair ("\\ud800"); Python decodes it into a
    string that no encoder takes, so it would fail deep inside an engine. It is
    refused here, with the path of the field, for every request body.
    """
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:  # not recursive: a body may nest as deep as the JSON parser allows
        value, path = stack.pop()
        if isinstance(value, str):
            if not value.isascii():
                try:
                    value.encode()
                except UnicodeEncodeError:
                    where = f"'{path}'" if path else "The body"
                    raise InvalidRequest(
                        f"{where} holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff "
                        f"escape), which is not text. Send valid Unicode.",
                        param=path or None,
                    ) from None
        elif isinstance(value, dict):
            for key, item in value.items():
                name = str(key).encode(errors="backslashreplace").decode()  # a bad key: \\udc00
                at = f"{path}.{name}" if path else name
                stack.extend([(key, at), (item, at)])
        elif isinstance(value, list):
            stack.extend((item, f"{path}.{i}" if path else str(i)) for i, item in enumerate(value))
    return data


class LenientRequest(BaseModel):
    """Base for request bodies: unknown fields are kept (and logged), not refused."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def valid_unicode(cls, data: Any) -> Any:
        return refuse_lone_surrogates(data)

    def ignored_fields(self) -> list[str]:
        """The fields the client sent that this request type does not know."""
        return sorted(self.model_extra or {})


def log_ignored(
    log: logging.Logger,
    request: LenientRequest,
    options: Mapping[str, Any] | None = None,
    honoured: Collection[str] = (),
) -> None:
    """Log, on the API's ``log``, the fields of ``request`` Corral ignores, and the
    ``options`` (Ollama's) that are not among those ``honoured``."""
    if ignored := request.ignored_fields():
        log.info("ignoring fields Corral does not support: %s", ", ".join(ignored))
    if unused := sorted(set(options or {}).difference(honoured)):
        log.info("ignoring options Corral cannot set per request: %s", ", ".join(unused))


def refuse_unsupported(request: BaseModel, *fields: str) -> None:
    """``InvalidRequest`` for the first of ``fields`` (``logprobs``, ``suffix``) that
    ``request`` sets."""
    for name in fields:
        if getattr(request, name):
            raise InvalidRequest(_REFUSED[name], param=name)


def stop_sequences(stop: str | Sequence[str] | None, param: str = "stop") -> tuple[str, ...]:
    """The stop sequences of a request (one string or a list), at most ``MAX_STOP_SEQUENCES``."""
    sequences = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(sequences) > MAX_STOP_SEQUENCES:
        raise InvalidRequest(f"At most {MAX_STOP_SEQUENCES} stop sequences.", param=param)
    return sequences


def refuse_empty_texts(texts: Sequence[str], param: str = "input") -> None:
    """``InvalidRequest`` naming the first empty string among inputs to embed."""
    for i, text in enumerate(texts):
        if not text:
            raise InvalidRequest(f"{param} must not contain empty strings.", param=f"{param}.{i}")

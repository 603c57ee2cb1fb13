"""Images as clients send them: OpenAI's ``data:`` URLs and Ollama's base64 strings.

Nothing leaves the box (DESIGN.md, decision 11), so an ``http(s)`` image URL is
refused with a 400 that says how to send the image instead, never fetched.
What the bytes are is llama.cpp's to judge (mtmd decodes them); here they only
have to be base64.
"""

from __future__ import annotations

import base64
import binascii
import re

from nodes.errors import InvalidRequest

_DATA_URL = re.compile(
    r"^data:(?P<type>[^;,]*)(?P<params>(?:;[^;,]*)*),(?P<data>.*)$", re.DOTALL | re.IGNORECASE
)
_SPACE = re.compile(r"\s+")


def image_from_url(url: str, param: str) -> bytes:
    """The image an OpenAI ``image_url.url`` holds: a base64 ``data:`` URL, checked."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme in ("http", "https"):
        raise InvalidRequest(
            "Corral does not fetch images from the network (nothing leaves the box): send the "
            "image itself, as a data: URL (data:image/png;base64,...).",
            param=param,
        )
    match = _DATA_URL.match(url.strip())
    if match is None:
        raise InvalidRequest(
            "An image must be a data: URL (data:image/png;base64,...).", param=param
        )
    kind = match["type"].strip().lower()
    if kind and not kind.startswith("image/"):
        raise InvalidRequest(f"The data: URL holds {kind}, not an image.", param=param)
    if ";base64" not in match["params"].lower():
        raise InvalidRequest(
            "The image's data: URL must be base64-encoded (data:image/png;base64,...).",
            param=param,
        )
    return image_from_base64(match["data"], param)


def image_from_base64(data: str, param: str) -> bytes:
    """The bytes of a base64 image (Ollama's ``images``; a ``data:`` URL is taken too)."""
    if data.lstrip()[:5].lower() == "data:":
        return image_from_url(data.strip(), param)
    text = _SPACE.sub("", data)
    try:
        image = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("An image is not valid base64.", param=param) from None
    if not image:
        raise InvalidRequest("An image is empty.", param=param)
    return image

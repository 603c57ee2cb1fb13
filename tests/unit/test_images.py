"""Images as the APIs take them: data: URLs and base64, their refusals, and where they
land in the engine's messages (no engine here: test_engine_vision.py runs them)."""

from __future__ import annotations

import base64

import pytest

from deployments.images import image_from_base64, image_from_url
from deployments.ollama import protocol as op
from deployments.ollama.serving import chat_to_engine as ollama_chat
from deployments.ollama.serving import generate_to_engine, modelfile, show_response
from deployments.openai import protocol as oa
from deployments.openai.serving import chat_to_engine as openai_chat
from nodes.engine import IMAGE_MARKER
from nodes.errors import InvalidRequest
from nodes.models import LocalModel
from tests.support.vision_model import png

PNG = png()
B64 = base64.b64encode(PNG).decode()
TEXT_ONLY = LocalModel(name="m:latest", path="/models/m.gguf", size=10, modified_at=0.0)
VISION = LocalModel(
    name="eyes:latest",
    path="/models/eyes.gguf",
    size=20,
    modified_at=0.0,
    projector="/models/mmproj.gguf",
    projector_digest="sha256:" + "a" * 64,
)


@pytest.mark.parametrize(
    "url",
    [
        f"data:image/png;base64,{B64}",
        f"DATA:image/PNG;BASE64,{B64}",
        f"data:;base64,{B64}",  # no media type: the bytes decide
        f"data:image/png;name=x.png;base64,{B64[:40]}\n{B64[40:]}",  # a wrapped line
        f"data:image/png;base64,{B64.rstrip('=')}",  # padding left out
    ],
)
def test_a_base64_data_url_gives_the_image_bytes(url):
    assert image_from_url(url, "p") == PNG


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("https://example.com/cat.png", "does not fetch images from the network"),
        ("http://10.0.0.5/cat.png", "does not fetch images from the network"),
        ("file:///etc/passwd", "must be a data: URL"),
        ("cat.png", "must be a data: URL"),
        ("", "must be a data: URL"),
        ("data:image/png,rawbytes", "base64-encoded"),
        (f"data:text/plain;base64,{B64}", "not an image"),
        ("data:image/png;base64,not*base64!", "not valid base64"),
        ("data:image/png;base64,", "empty"),
        ("data:image/png;base64,\u00e9\u00e9\u00e9\u00e9", "not valid base64"),
    ],
)
def test_what_is_not_a_base64_data_url_is_a_400_naming_the_field(url, words):
    with pytest.raises(InvalidRequest, match=words) as err:
        image_from_url(url, "messages.0.content.1.image_url.url")
    assert err.value.param == "messages.0.content.1.image_url.url"


def test_ollamas_base64_images_and_data_urls():
    assert image_from_base64(B64, "images.0") == PNG
    assert image_from_base64(f"data:image/png;base64,{B64}", "images.0") == PNG
    for bad in ("%%%", "", "   "):
        with pytest.raises(InvalidRequest) as err:
            image_from_base64(bad, "images.0")
        assert err.value.param == "images.0"


def openai_request(*parts) -> oa.ChatCompletionRequest:
    return oa.ChatCompletionRequest.model_validate(
        {"model": "eyes", "messages": [{"role": "user", "content": list(parts)}]}
    )


def image_part(url: str = f"data:image/png;base64,{B64}") -> dict:
    return {"type": "image_url", "image_url": {"url": url, "detail": "auto"}}


def test_openai_image_parts_stand_where_they_are_among_the_texts():
    request = openai_request(
        {"type": "text", "text": "Compare"},
        image_part(),
        {"type": "text", "text": "and"},
        image_part(),
    )
    [message] = openai_chat(request).messages
    assert message.content == f"Compare\n{IMAGE_MARKER}\nand\n{IMAGE_MARKER}"
    assert message.images == (PNG, PNG)


def test_openai_remote_image_url_is_a_400():
    with pytest.raises(InvalidRequest, match="network") as err:
        openai_chat(openai_request({"type": "text", "text": "x"}, image_part("https://x/y.png")))
    assert err.value.param == "messages.0.content.1.image_url.url"


def test_ollama_images_go_before_the_words_of_their_turn():
    request = op.ChatRequest.model_validate(
        {"model": "eyes", "messages": [{"role": "user", "content": "What?", "images": [B64, B64]}]}
    )
    [message] = ollama_chat(request, VISION).messages
    assert message.content == f"{IMAGE_MARKER}{IMAGE_MARKER}\nWhat?"
    assert message.images == (PNG, PNG)
    generate = op.GenerateRequest.model_validate({"model": "eyes", "prompt": "", "images": [B64]})
    [user] = generate_to_engine(generate, VISION).messages
    assert user.content == IMAGE_MARKER and user.images == (PNG,)


def test_ollama_refusals_name_the_field():
    chat = op.ChatRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x", "images": [B64]}]}
    )
    with pytest.raises(InvalidRequest, match="takes text only") as err:
        ollama_chat(chat, TEXT_ONLY)
    assert err.value.param == "messages.0.images"
    bad = op.ChatRequest.model_validate(
        {"model": "eyes", "messages": [{"role": "user", "content": "x", "images": ["??"]}]}
    )
    with pytest.raises(InvalidRequest, match="base64") as err:
        ollama_chat(bad, VISION)
    assert err.value.param == "messages.0.images.0"
    raw = op.GenerateRequest.model_validate(
        {"model": "eyes", "prompt": "x", "raw": True, "images": [B64]}
    )
    with pytest.raises(InvalidRequest, match="without raw") as err:
        generate_to_engine(raw, VISION)
    assert err.value.param == "raw"


def test_show_lists_vision_and_the_projector_for_a_vision_model():
    shown = show_response(VISION, {"general.architecture": "llama"})
    assert shown.capabilities == ["completion", "vision"]
    assert show_response(TEXT_ONLY, {}).capabilities == ["completion"]
    lines = modelfile(VISION).splitlines()
    assert "FROM /models/eyes.gguf" in lines and "FROM /models/mmproj.gguf" in lines

"""Images with the official ``openai`` and ``ollama`` clients, against the session's
Corral on Ray (real replicas, real engine, llama.cpp's mtmd).

``vision:135m`` is the starter model plus a synthetic projector (random weights,
``tests/support/vision_model.py``), created from two uploaded GGUFs: the answer is
nonsense, but the image bytes go through the projector into the context, so they
count in the prompt's tokens.
"""

from __future__ import annotations

import base64

import ollama
import openai
import pytest

from tests.support.vision_model import IMAGE_TOKENS, png

STARTER = "smollm2:135m"
QUESTION = "What is in this picture?"
PNG = png(seed=7)
DATA_URL = f"data:image/png;base64,{base64.b64encode(PNG).decode()}"


@pytest.fixture(scope="module")
def client(corral) -> ollama.Client:
    return ollama.Client(host=corral.url, timeout=300)


def openai_messages(url: str | None) -> list[dict]:
    parts: list[dict] = [{"type": "text", "text": QUESTION}]
    if url is not None:
        parts.append({"type": "image_url", "image_url": {"url": url}})
    return [{"role": "user", "content": parts}]


def test_openai_image_chat(openai_client, vision_model):
    def ask(url: str | None):
        return openai_client.chat.completions.create(
            model=vision_model, messages=openai_messages(url), max_tokens=8, temperature=0
        )

    text_only, with_image = ask(None), ask(DATA_URL)
    # the image's embeddings, and the newline between the text part and the image
    grown = with_image.usage.prompt_tokens - text_only.usage.prompt_tokens
    assert grown == IMAGE_TOKENS + 1
    assert with_image.choices[0].message.content
    assert with_image.usage.completion_tokens > 0


def test_openai_image_chat_streamed(openai_client, vision_model):
    stream = openai_client.chat.completions.create(
        model=vision_model,
        messages=openai_messages(DATA_URL),
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].usage.prompt_tokens > IMAGE_TOKENS


def test_openai_refuses_a_remote_image_and_images_for_a_text_model(openai_client, vision_model):
    with pytest.raises(openai.BadRequestError, match="does not fetch images"):
        openai_client.chat.completions.create(
            model=vision_model, messages=openai_messages("https://example.com/cat.png")
        )
    with pytest.raises(openai.BadRequestError, match="takes text only"):
        openai_client.chat.completions.create(model=STARTER, messages=openai_messages(DATA_URL))


def test_ollama_image_chat_and_generate(client, vision_model):
    plain = client.chat(
        model=vision_model,
        messages=[{"role": "user", "content": QUESTION}],
        options={"temperature": 0, "num_predict": 8},
    )
    seen = client.chat(
        model=vision_model,
        messages=[{"role": "user", "content": QUESTION, "images": [PNG]}],
        options={"temperature": 0, "num_predict": 8},
    )
    assert seen.prompt_eval_count - plain.prompt_eval_count == IMAGE_TOKENS + 1
    assert seen.message.content and seen.eval_count > 0
    pieces = list(
        client.generate(
            model=vision_model,
            prompt=QUESTION,
            images=[PNG],
            options={"temperature": 0, "num_predict": 8},
            stream=True,
        )
    )
    assert "".join(p.response for p in pieces)
    assert pieces[-1].done and pieces[-1].prompt_eval_count > IMAGE_TOKENS


def test_ollama_refuses_images_for_a_text_model_and_shows_vision(client, vision_model):
    with pytest.raises(ollama.ResponseError, match="takes text only") as err:
        client.chat(model=STARTER, messages=[{"role": "user", "content": "x", "images": [PNG]}])
    assert err.value.status_code == 400
    starter = client.show(STARTER).capabilities  # completion, tools: the same template
    assert "vision" not in starter
    assert client.show(vision_model).capabilities == [*starter, "vision"]
    listed = {m.model: m for m in client.list().models}
    assert listed[vision_model].size > listed[STARTER].size  # the projector counts too

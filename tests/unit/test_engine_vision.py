"""LlamaCppEngine with a projector: image bytes through mtmd into the prompt.

The vision model is the starter model plus a synthetic LLaVA-style projector
(tests/support/vision_model.py): its answer is nonsense, but the image is
decoded, encoded by the projector and decoded into the context, so it counts
in the prompt's tokens, and a repeated image is reused from the cache.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodes.engine import (
    IMAGE_MARKER,
    ChatMessage,
    EngineSpec,
    Finished,
    GenerateRequest,
    Prompt,
    SamplingParams,
    TextDelta,
    load_engine,
    with_images,
)
from nodes.errors import InvalidRequest, ModelLoadFailed
from nodes.multimodal import image_position_id
from tests.support.vision_model import IMAGE_TOKENS, png, write_projector

GREEDY = SamplingParams(temperature=0, max_tokens=8)


@pytest.fixture(scope="module")
def projector(tmp_path_factory) -> Path:
    return write_projector(tmp_path_factory.mktemp("vision") / "mmproj.gguf")


@pytest.fixture(scope="module")
def engine(starter_path: Path, projector: Path) -> Iterator:
    spec = EngineSpec(
        model="vision:135m",
        path=str(starter_path),
        projector=str(projector),
        n_ctx=1024,
        n_threads=2,
    )
    engine = load_engine(spec)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def text_only(starter_path: Path) -> Iterator:
    engine = load_engine(
        EngineSpec(model="smollm2:135m", path=str(starter_path), n_ctx=512, n_threads=2)
    )
    yield engine
    engine.close()


def look(*images: bytes, text: str = "What is in the picture?") -> GenerateRequest:
    message = ChatMessage("user", with_images(text, len(images)), images=images)
    return GenerateRequest(messages=(message,), params=GREEDY)


def run(engine, request: GenerateRequest) -> tuple[str, Finished]:
    events = list(engine.generate(engine.encode(request), request.params, threading.Event()))
    assert isinstance(events[-1], Finished)
    return "".join(e.text for e in events if isinstance(e, TextDelta)), events[-1]


def test_an_image_counts_in_the_prompt_and_gets_an_answer(engine):
    text_tokens = len(engine.encode(look(text="What is in the picture?")))
    prompt = engine.encode(look(png()))
    assert isinstance(prompt, Prompt) and prompt.images == (png(),)
    # the image's 16 embeddings, and the newline between it and the words
    assert len(prompt) == text_tokens + IMAGE_TOKENS + 1
    assert prompt.count(image_position_id(png())) == IMAGE_TOKENS
    text, finished = run(engine, look(png()))
    assert finished.usage.prompt_tokens == len(prompt)
    assert finished.usage.completion_tokens > 0 and text


def test_the_answer_depends_on_the_image_and_a_repeat_is_the_same(engine):
    first, _ = run(engine, look(png(seed=1)))
    again, _ = run(engine, look(png(seed=1)))  # the image comes from the cache
    other, _ = run(engine, look(png(seed=2)))
    after, _ = run(engine, look(png(seed=1)))  # ... and a changed image is evaluated again
    assert first == again == after
    assert other != first


def test_two_images_and_a_text_turn_after_them(engine):
    two = look(png(seed=3), png(seed=4), text="Compare them.")
    assert len(engine.encode(two)) > 2 * IMAGE_TOKENS
    run(engine, two)
    text, finished = run(engine, GenerateRequest(messages=(ChatMessage("user", "Hi"),)))
    assert finished.reason in ("stop", "length")


def test_an_undecodable_image_or_a_stray_marker_is_a_400(engine):
    with pytest.raises(InvalidRequest, match="not an image llama.cpp can decode"):
        engine.encode(look(b"not an image at all"))
    stray = ChatMessage("user", f"{IMAGE_MARKER} {IMAGE_MARKER}", images=(png(),))
    with pytest.raises(InvalidRequest, match="image markers"):
        engine.encode(GenerateRequest(messages=(stray,)))


def test_a_text_only_model_refuses_images(text_only):
    with pytest.raises(InvalidRequest, match="takes text only"):
        text_only.encode(look(png()))


def test_a_projector_for_another_embedding_size_does_not_load(starter_path, tmp_path):
    wrong = write_projector(tmp_path / "wrong.gguf", n_embd_text=64)
    spec = EngineSpec(model="v", path=str(starter_path), projector=str(wrong), n_ctx=256)
    with pytest.raises(ModelLoadFailed, match="projector"):
        load_engine(spec)

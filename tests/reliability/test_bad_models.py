"""A model whose file is broken is refused with a clear error, and nothing loops.

On the session's simulated cluster, with the official ``ollama`` client: a
GGUF cut short is refused by ``create``; a model created from a good file
whose blob is then cut short on disk is refused when it is asked for (the
controller re-reads a changed file before it plans a load), every time it is
asked, without hanging, without a Serve application left retrying, and
without disturbing the models that work.
"""

from __future__ import annotations

import time

import ollama
import pytest
from ray import serve

NAME = "broken:cut"
GOOD = "smollm2:135m"


@pytest.fixture(scope="module")
def client(corral) -> ollama.Client:
    return ollama.Client(host=corral.url, timeout=180)


@pytest.fixture(scope="module")
def broken(corral, client, starter_path, tmp_path_factory):
    """A model created from a good file whose blob is then cut short on disk (a failing
    disk, a copy interrupted by hand): planning still reads its header; loading fails."""
    good = tmp_path_factory.mktemp("broken") / "m.gguf"
    good.write_bytes(starter_path.read_bytes() + b"\0" * 32)  # its own blob, not the starter's
    digest = client.create_blob(good)
    done = list(client.create(model=NAME, files={"m.gguf": digest}, stream=True))
    assert done[-1].status == "success"
    blob = corral.settings.models_path / "blobs" / digest.replace(":", "-")
    size = blob.stat().st_size
    with blob.open("r+b") as f:
        f.truncate(size * 2 // 3)
    yield NAME
    client.delete(NAME)


def test_a_truncated_gguf_is_refused_at_create(client, starter_path, tmp_path):
    cut = tmp_path / "cut.gguf"
    data = starter_path.read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])
    digest = client.create_blob(cut)
    with pytest.raises(ollama.ResponseError) as err:
        list(client.create(model="cut:1", files={"cut.gguf": digest}, stream=True))
    assert "truncated or corrupt" in err.value.error
    assert "cut:1" not in {m.model for m in client.list().models}


def apps_of(model: str) -> list[str]:
    slug = model.replace(":", "-")
    return [name for name in serve.status().applications if slug in name]


def test_a_truncated_gguf_fails_to_load_with_the_reason_and_does_not_loop(client, broken):
    for attempt in range(2):  # asked again: the same clear refusal, not a hang
        started = time.monotonic()
        with pytest.raises(ollama.ResponseError) as err:
            client.generate(model=broken, prompt="Hi", options={"num_predict": 4})
        took = time.monotonic() - started
        assert err.value.status_code == 500, err.value
        assert "truncated or corrupt" in err.value.error, err.value.error
        assert took < 120, (attempt, took)
    # No crash loop: nothing of the broken model stays deployed, now or a little later.
    for _ in range(3):
        assert apps_of(broken) == []
        time.sleep(1)
    assert broken not in {m.model for m in client.ps().models}


def test_the_working_models_keep_serving(client, broken):
    with pytest.raises(ollama.ResponseError):
        client.generate(model=broken, prompt="Hi")
    reply = client.generate(model=GOOD, prompt="Hi", options={"num_predict": 4})
    assert reply.done and reply.response

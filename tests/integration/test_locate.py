"""A node that must run a model it lacks fetches the file from the head's API.

``locate`` is what every replica runs before it loads (``ServedReplica``); here
it runs against the session's real Corral, whose ``/api/blobs`` serves the
head's store, with a fresh directory as the node's own store.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import replace

import ollama
import pytest

from nodes.engine import EngineSpec
from nodes.errors import ModelLoadFailed
from nodes.locate import locate
from nodes.store import Store

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def uploaded(corral, starter_path) -> str:
    """The starter model's digest, uploaded to the head's store as a client would."""
    return ollama.Client(host=corral.url).create_blob(starter_path)


def spec(path: str, digest: str, fetch_from: str) -> EngineSpec:
    return EngineSpec(model="x:latest", path=path, digest=digest, fetch_from=fetch_from)


def test_a_file_on_shared_storage_is_used_in_place(tmp_path, starter_path, corral, uploaded):
    store = Store(tmp_path)
    found = asyncio.run(locate(spec(str(starter_path), uploaded, corral.url), store))
    assert found.path == str(starter_path)
    assert not store.has_blob(uploaded)  # nothing copied


def test_a_missing_file_is_fetched_from_the_head_and_verified(tmp_path, corral, uploaded):
    store = Store(tmp_path)
    found = asyncio.run(locate(spec("/elsewhere/model.gguf", uploaded, corral.url), store))
    assert found.path == str(store.blob_path(uploaded))
    digest = hashlib.sha256(store.blob_path(uploaded).read_bytes()).hexdigest()
    assert f"sha256:{digest}" == uploaded
    # Next time the node has its own copy and fetches nothing.
    again = asyncio.run(
        locate(spec("/elsewhere/model.gguf", uploaded, "http://127.0.0.1:9"), store)
    )
    assert again.path == found.path


def test_a_blob_the_head_lacks_fails_the_load_with_the_reason(tmp_path, corral):
    store = Store(tmp_path)
    missing = "sha256:" + "0" * 64
    with pytest.raises(ModelLoadFailed, match="fetching it from the head failed"):
        asyncio.run(locate(spec("/elsewhere/model.gguf", missing, corral.url), store))
    assert not store.has_blob(missing)
    assert not any(store.root.rglob("*0000000000*"))  # no partial file left behind


def test_an_unreachable_head_says_how_to_fix_it(tmp_path, uploaded):
    store = Store(tmp_path)
    with pytest.raises(ModelLoadFailed, match="reachable from every node"):
        asyncio.run(locate(spec("/elsewhere/model.gguf", uploaded, "http://127.0.0.1:9"), store))


def test_a_vision_models_projector_is_found_like_its_model(
    tmp_path, corral, uploaded, projector_path
):
    projector = ollama.Client(host=corral.url).create_blob(projector_path)
    store = Store(tmp_path)
    wanted = replace(
        spec("/elsewhere/model.gguf", uploaded, corral.url),
        projector="/elsewhere/mmproj.gguf",
        projector_digest=projector,
    )
    found = asyncio.run(locate(wanted, store))
    assert found.projector == str(store.blob_path(projector))
    assert store.blob_path(projector).read_bytes() == projector_path.read_bytes()
    in_place = replace(wanted, projector=str(projector_path))  # shared storage: used there
    assert asyncio.run(locate(in_place, store)).projector == str(projector_path)

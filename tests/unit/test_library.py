"""The model library (cluster/library.py) on a store in a temporary directory: what
the controller does for create, copy, delete, show and pull, without Ray."""

from __future__ import annotations

import asyncio

import pytest

from cluster.library import Library
from nodes.errors import InvalidRequest, ModelNotFound
from nodes.models import STARTER_MODEL


@pytest.fixture
def library(tmp_path) -> Library:
    return Library(tmp_path / "models")


def create(library: Library, name: str, recipe: dict) -> list[str]:
    async def run() -> list[str]:
        return [p["status"] async for p in library.create(name, recipe)]

    return asyncio.run(run())


def test_the_starter_model_is_there_from_the_start(library, starter_path):
    [starter] = library.models()
    assert starter.name == STARTER_MODEL and starter.builtin
    assert starter.path == str(starter_path)
    model, info = library.show("smollm2:135m")
    assert model is starter or model.name == starter.name
    assert info["general.architecture"] == "llama" and info["general.parameter_count"] > 10**8
    with pytest.raises(ModelNotFound):
        library.get("ghost:7b")
    with pytest.raises(InvalidRequest):
        library.get("../../etc/passwd")


def test_create_from_an_uploaded_blob_with_system_and_parameters(library, starter_path):
    digest = library.store.add_file(starter_path)
    statuses = create(
        library,
        "mine",
        {"files": {"m.gguf": digest}, "system": "Be brief.", "parameters": {"temperature": 0}},
    )
    assert statuses[0] == f"using existing layer {digest}" and statuses[-1] == "success"
    model = library.get("mine:latest")
    assert model.model_digest == digest and model.system == "Be brief."
    assert model.parameters == {"temperature": 0}
    assert model.details.family == "llama"


def test_create_from_the_built_in_model_copies_it_into_the_store_once(library):
    statuses = create(library, "terse:v1", {"from": STARTER_MODEL, "system": "Terse."})
    assert statuses[0].startswith("copying smollm2:135m")
    terse = library.get("terse:v1")
    assert not terse.builtin and terse.details.parent_model == STARTER_MODEL
    statuses = create(library, "terse:v2", {"from": "terse:v1"})
    assert statuses[0] == f"using existing layer {terse.model_digest}"
    assert library.get("terse:v2").system == "Terse."  # inherited


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ({}, "from` or `files"),
        ({"files": {"m.gguf": "sha256:" + "1" * 64}}, "upload it first"),
        ({"files": {"a.gguf": "sha256:" + "1" * 64, "b.bin": "sha256:" + "2" * 64}}, "exactly"),
        ({"from": STARTER_MODEL, "adapters": {"x": "y"}}, "adapters"),
    ],
)
def test_create_refuses_what_it_cannot_make(library, recipe, message):
    with pytest.raises(InvalidRequest, match=message):
        create(library, "x", recipe)
    assert [m.name for m in library.models()] == [STARTER_MODEL]


def test_create_refuses_a_blob_that_is_not_gguf(library, tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a model at all")
    digest = library.store.add_file(junk)
    with pytest.raises(InvalidRequest, match="m.gguf: .*not a GGUF file"):
        create(library, "x", {"files": {"m.gguf": digest}})


def test_copy_and_delete(library):
    library.copy(STARTER_MODEL, "copy:v1")
    assert library.get("copy:v1").model_digest
    library.copy("copy:v1", "copy:v2")
    library.delete("copy:v1")
    assert library.get("copy:v2")  # its blobs are still there for v2
    with pytest.raises(ModelNotFound):
        library.get("copy:v1")
    with pytest.raises(InvalidRequest, match="ships with Corral"):
        library.delete(STARTER_MODEL)
    with pytest.raises(ModelNotFound):
        library.delete("ghost:7b")


def test_pull_refuses_a_path_on_the_server(library, starter_path):
    async def pull() -> None:
        async for _ in library.pull(str(starter_path)):
            pass

    with pytest.raises(InvalidRequest, match="corral create NAME -f"):
        asyncio.run(pull())
    assert [m.name for m in library.models()] == [STARTER_MODEL]

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
        ({"files": {"a.gguf": "sha256:" + "1" * 64, "b.bin": "sha256:" + "2" * 64}}, ".gguf files"),
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


@pytest.fixture
def projector_digest(library, tmp_path) -> str:
    from tests.support.vision_model import write_projector

    return library.store.add_file(write_projector(tmp_path / "mmproj.gguf"))


def test_create_a_vision_model_from_a_model_and_a_projector(
    library, starter_path, projector_digest
):
    digest = library.store.add_file(starter_path)
    files = {"mmproj.gguf": projector_digest, "model.gguf": digest}  # in any order
    statuses = create(library, "eyes", {"files": files})
    assert f"using existing layer {projector_digest} (projector)" in statuses
    model = library.get("eyes")
    assert model.model_digest == digest and model.projector_digest == projector_digest
    assert model.projector == str(library.store.blob_path(projector_digest))
    manifest = library.store.manifest("eyes")
    kinds = [layer["mediaType"] for layer in manifest["layers"]]
    assert kinds[:2] == [
        "application/vnd.ollama.image.model",
        "application/vnd.ollama.image.projector",
    ]
    # a copy from it keeps the projector; a text model plus a projector becomes a vision model
    create(library, "eyes:v2", {"from": "eyes", "system": "Look."})
    assert library.get("eyes:v2").projector_digest == projector_digest
    create(library, "eyes:v3", {"from": STARTER_MODEL, "files": {"p.gguf": projector_digest}})
    assert library.get("eyes:v3").projector_digest == projector_digest
    library.delete("eyes")
    assert library.store.has_blob(projector_digest)  # eyes:v2 and v3 still use it


def test_create_refuses_two_models_or_a_projector_alone(library, starter_path, projector_digest):
    digest = library.store.add_file(starter_path)
    with pytest.raises(InvalidRequest, match="one model GGUF and at most one projector"):
        create(library, "x", {"files": {"a.gguf": digest, "b.gguf": digest}})
    with pytest.raises(InvalidRequest, match="A projector needs its model"):
        create(library, "x", {"files": {"p.gguf": projector_digest}})


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

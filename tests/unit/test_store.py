"""The model store: Ollama's layout read as Ollama writes it, names that cannot escape the
root, writes that a failure leaves whole, and blobs deleted only when nothing uses them."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from nodes.errors import InvalidRequest, ModelLoadFailed, ModelNotFound, PullFailed
from nodes.models import ModelDetails
from nodes.store import ModelRef, Store
from tests.support.oci import (
    LICENSE,
    PARAMS,
    SYSTEM,
    TEMPLATE,
    file_sha256,
    ollama_model,
    write_ollama_layout,
)

STARTER = ("registry.ollama.ai", "library", "smollm2", "135m")


@pytest.fixture(scope="module")
def starter_digest(starter_path) -> str:
    return file_sha256(starter_path)


@pytest.fixture(scope="module")
def shared(tmp_path_factory, starter_path, starter_digest) -> Store:
    """A store holding the starter GGUF, for the tests that create models from it: reading
    a GGUF header takes seconds, and is cached per file."""
    store = Store(tmp_path_factory.mktemp("shared"))
    assert store.add_file(starter_path) == starter_digest
    return store


@pytest.fixture
def ollama_dir(tmp_path, starter_path, starter_digest) -> Path:
    """A directory exactly as Ollama leaves ~/.ollama/models after three pulls."""
    root = tmp_path / "models"
    model = ollama_model(starter_path, gguf_digest=starter_digest)
    write_ollama_layout(root, STARTER, model)
    write_ollama_layout(root, ("registry.ollama.ai", "someone", "smol", "latest"), model)
    bare = ollama_model(
        starter_path, gguf_digest=starter_digest, template=None, system=None, params=None
    )
    write_ollama_layout(root, ("registry.example.com:5000", "team", "smol", "q4"), bare)
    return root


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


# -- names --


@pytest.mark.parametrize(
    ("name", "parts", "display"),
    [
        ("llama3.2", STARTER[:2] + ("llama3.2", "latest"), "llama3.2:latest"),
        ("llama3.2:1b", STARTER[:2] + ("llama3.2", "1b"), "llama3.2:1b"),
        ("registry.ollama.ai/library/qwen:7b", STARTER[:2] + ("qwen", "7b"), "qwen:7b"),
        (
            "someone/smol",
            ("registry.ollama.ai", "someone", "smol", "latest"),
            "someone/smol:latest",
        ),
        (
            "hf.co/Org/Repo-GGUF:Q4_K_M",
            ("hf.co", "Org", "Repo-GGUF", "Q4_K_M"),
            "hf.co/Org/Repo-GGUF:Q4_K_M",
        ),
        (
            "localhost:5000/ns/m",
            ("localhost:5000", "ns", "m", "latest"),
            "localhost:5000/ns/m:latest",
        ),
    ],
)
def test_names_parse_and_display_as_ollama_does(name, parts, display):
    ref = ModelRef.parse(name)
    assert (ref.host, ref.namespace, ref.model, ref.tag) == parts
    assert ref.display == display
    assert ref.registry_path == f"{parts[1]}/{parts[2]}"


HOSTILE_NAMES = [
    "..",
    "../x",
    "../../etc/passwd",
    "a/../b",
    "ns/..:latest",
    "x:..",
    "x:../../y",
    "/etc/passwd",
    "/abs/ns/model",
    "a//b",
    "a/b/c/d",
    "ns/m:t/x",
    "m:t:u",
    "..\\..\\windows",
    "a\x00b",
    ".hidden",
    "ns/.m",
    "-rf",
    "",
    "   ",
    "x" * 300,
    "localhost:5000/m",
    "m:",
    "~/m",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_a_hostile_name_is_refused_before_any_path_is_built(tmp_path, name, starter_digest):
    root = tmp_path / "store"
    store = Store(root)
    outside = tmp_path / "outside"
    outside.mkdir()
    before = tree(tmp_path)
    with pytest.raises(InvalidRequest):
        ModelRef.parse(name)
    for call in (
        lambda: store.get(name),
        lambda: store.manifest(name),
        lambda: store.remove(name),
        lambda: store.copy(name, "fine:tag"),
        lambda: store.copy("fine:tag", name),
        lambda: store.put_manifest(name, {"layers": []}),
        lambda: store.create(name, starter_digest),
    ):
        with pytest.raises(InvalidRequest) as caught:
            call()
        assert caught.value.kind == "invalid_request"
    assert tree(tmp_path) == before
    assert not root.exists()


@pytest.mark.parametrize(
    "digest",
    ["sha256:../../x", "sha256:" + "A" * 64, "md5:" + "0" * 32, "sha256-" + "0" * 63, "", "0" * 64],
)
def test_a_bad_digest_is_refused(tmp_path, digest):
    store = Store(tmp_path)
    with pytest.raises(InvalidRequest, match="sha256:<64 lowercase hex digits>"):
        store.blob_path(digest)
    with pytest.raises(InvalidRequest):
        asyncio.run(store.save_stream(digest, _chunks([b"x"])))
    assert not any(tmp_path.iterdir())


def test_blob_paths_follow_ollamas_names(tmp_path):
    store = Store(tmp_path)
    hexa = "ab" * 32
    assert store.blob_path(f"sha256:{hexa}") == tmp_path / "blobs" / f"sha256-{hexa}"
    assert store.blob_path(f"sha256-{hexa}") == store.blob_path(f"sha256:{hexa}")
    assert store.partial_path(f"sha256:{hexa}").parent == tmp_path / "blobs"


# -- Ollama's own layout --


def test_a_directory_laid_out_by_ollama_just_works(ollama_dir, starter_path, starter_digest):
    store = Store(ollama_dir)
    models = store.models()
    assert [m.name for m in models] == [
        "registry.example.com:5000/team/smol:q4",
        "smollm2:135m",
        "someone/smol:latest",
    ]
    model = store.get("smollm2:135m")
    manifest_path = ollama_dir.joinpath("manifests", *STARTER)
    manifest_bytes = manifest_path.read_bytes()
    manifest = json.loads(manifest_bytes)
    assert model == models[1]
    assert model.path == str(ollama_dir / "blobs" / starter_digest.replace(":", "-"))
    assert Path(model.path).read_bytes()[:4] == b"GGUF"
    assert model.digest == hashlib.sha256(manifest_bytes).hexdigest()  # what /api/tags shows
    assert model.model_digest == starter_digest
    layers = [*manifest["layers"], manifest["config"]]
    assert model.size == sum(x["size"] for x in layers)
    assert model.size > starter_path.stat().st_size
    assert model.modified_at == manifest_path.stat().st_mtime
    # details come from the config blob as Ollama wrote it (not recomputed from the GGUF)
    assert model.details == ModelDetails(
        format="gguf",
        family="llama",
        families=("llama",),
        parameter_size="134.52M",
        quantization_level="Q4_1",
    )
    assert model.template == TEMPLATE
    assert model.system == SYSTEM
    assert model.parameters == PARAMS
    assert model.license == LICENSE
    assert not model.builtin
    assert store.get("registry.ollama.ai/library/smollm2:135m") == model

    bare = store.get("registry.example.com:5000/team/smol:q4")
    assert (bare.template, bare.system, bare.parameters) == (None, None, {})
    assert bare.license == LICENSE
    assert bare.model_digest == model.model_digest
    assert store.manifest("smollm2:135m") == manifest


def test_details_come_from_the_gguf_when_the_config_says_nothing(
    shared, starter_path, starter_digest
):
    model = ollama_model(starter_path, gguf_digest=starter_digest)
    config = json.dumps({"rootfs": {"type": "layers"}}).encode()
    digest = "sha256:" + hashlib.sha256(config).hexdigest()
    model.blobs[digest] = config
    model.manifest["config"] = {"mediaType": "x", "digest": digest, "size": len(config)}
    write_ollama_layout(shared.root, ("registry.ollama.ai", "bare", "smol", "latest"), model)
    details = shared.get("bare/smol").details
    assert (details.family, details.parameter_size, details.quantization_level) == (
        "llama",
        "135M",
        "Q4_1",
    )


def test_broken_manifests_are_skipped_and_named(ollama_dir, starter_digest, caplog):
    store = Store(ollama_dir)
    manifests = ollama_dir / "manifests" / "registry.ollama.ai" / "library"
    (manifests / "corrupt").mkdir()
    (manifests / "corrupt" / "latest").write_text("{not json")
    (manifests / "lost").mkdir()
    lost = {"layers": [{"mediaType": "application/vnd.ollama.image.model", "size": 1}]}
    lost["layers"][0]["digest"] = "sha256:" + "0" * 64
    (manifests / "lost" / "latest").write_text(json.dumps(lost))
    (manifests / "adapter").mkdir()
    (manifests / "adapter" / "latest").write_text(json.dumps({"layers": []}))
    (manifests / "smollm2" / ".135m.tmp-0123").write_text("half a manifest")
    assert [m.name for m in store.models()] == [
        "registry.example.com:5000/team/smol:q4",
        "smollm2:135m",
        "someone/smol:latest",
    ]
    assert "corrupt" in caplog.text and "lost" in caplog.text
    with pytest.raises(ModelLoadFailed, match="corrupt"):
        store.get("corrupt")
    with pytest.raises(ModelLoadFailed, match="pull the model again"):
        store.get("lost")
    with pytest.raises(ModelNotFound):
        store.get("adapter")
    with pytest.raises(ModelNotFound):
        store.get("nothing:here")


# -- writes --


def test_create_writes_ollamas_layers_and_reads_back(shared, starter_path, starter_digest):
    store = shared
    assert store.blob_path(starter_digest).read_bytes() == starter_path.read_bytes()
    model = store.create(
        "mine:v1",
        starter_digest,
        template=TEMPLATE,
        system=SYSTEM,
        parameters=PARAMS,
        license=LICENSE,
        parent="smollm2:135m",
    )
    assert model.name == "mine:v1"
    assert (model.template, model.system, model.parameters, model.license) == (
        TEMPLATE,
        SYSTEM,
        PARAMS,
        LICENSE,
    )
    assert model.details == ModelDetails(
        family="llama",
        families=("llama",),
        parameter_size="135M",
        quantization_level="Q4_1",
        parent_model="smollm2:135m",
    )
    manifest = store.manifest("mine:v1")
    assert manifest["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert manifest["config"]["mediaType"] == "application/vnd.docker.container.image.v1+json"
    kinds = [x["mediaType"].rsplit(".", 1)[1] for x in manifest["layers"]]
    assert kinds == ["model", "template", "system", "license", "params"]
    written = store.manifests.joinpath(*STARTER[:2], "mine", "v1").read_bytes()
    assert model.digest == hashlib.sha256(written).hexdigest()
    assert not [p for p in store.root.rglob("*") if ".tmp-" in p.name]


def test_create_refuses_a_blob_the_store_lacks(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(InvalidRequest, match="upload it first"):
        store.create("m", "sha256:" + "1" * 64)
    assert not store.manifests.exists()


def test_a_manifest_never_points_at_a_missing_blob(tmp_path, starter_path, starter_digest):
    store = Store(tmp_path)
    model = ollama_model(starter_path, gguf_digest=starter_digest)
    with pytest.raises(InvalidRequest, match="refers to blobs the store lacks"):
        store.put_manifest("smollm2:135m", model.manifest)
    assert store.manifest("smollm2:135m") is None
    for digest, content in model.blobs.items():
        data = content.read_bytes() if isinstance(content, Path) else content
        asyncio.run(store.save_stream(digest, _chunks([data])))
    store.put_manifest("smollm2:135m", model.manifest)
    assert store.get("smollm2:135m").template == TEMPLATE


def test_a_failed_manifest_write_leaves_the_old_one_whole(shared, starter_digest, monkeypatch):
    store, digest = shared, starter_digest
    store.create("m:1", digest, system="old")
    before = tree(store.manifests)

    real_replace = os.replace

    def crash(src, dst):
        if "manifests" in str(dst):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        store.create("m:1", digest, system="new")
    monkeypatch.undo()
    assert store.get("m:1").system == "old"
    assert tree(store.manifests) == before  # the new blobs may be there, no new manifest
    assert not [p for p in store.root.rglob("*") if ".tmp-" in p.name]


def test_a_partial_download_is_committed_only_with_the_right_digest(tmp_path):
    store = Store(tmp_path)
    data = b"the bytes of a blob"
    good = "sha256:" + hashlib.sha256(data).hexdigest()
    bad = "sha256:" + hashlib.sha256(b"other").hexdigest()
    store.blobs.mkdir(parents=True)
    store.partial_path(bad).write_bytes(data)
    with pytest.raises(PullFailed, match=f"hashes to {good}, not {bad}"):
        store.commit_partial(bad)
    assert not store.partial_path(bad).exists() and not store.has_blob(bad)
    store.partial_path(good).write_bytes(data)
    assert store.commit_partial(good) == store.blob_path(good)
    assert store.blob_path(good).read_bytes() == data
    assert not store.partial_path(good).exists()


def test_uploads_are_verified_and_never_left_half_written(tmp_path):
    store = Store(tmp_path)
    data = b"x" * 3_000_000
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with pytest.raises(InvalidRequest, match="The upload hashes to"):
        asyncio.run(store.save_stream(digest, _chunks([data[:-1]])))

    async def cut() -> None:
        async def chunks():
            yield data[:1000]
            raise ConnectionResetError("the client went away")

        await store.save_stream(digest, chunks())

    with pytest.raises(ConnectionResetError):
        asyncio.run(cut())
    assert list(store.blobs.iterdir()) == []
    assert asyncio.run(store.save_stream(digest, _chunks([data[:10], data[10:]]))).is_file()
    assert store.blob_path(digest).read_bytes() == data


def test_add_file_with_a_digest_checks_it(tmp_path, starter_path, starter_digest):
    store = Store(tmp_path)
    with pytest.raises(InvalidRequest, match=f"not {'sha256:' + '2' * 64}"):
        store.add_file(starter_path, "sha256:" + "2" * 64)
    assert list(store.blobs.iterdir()) == []
    seen = []
    assert store.add_file(starter_path, starter_digest, progress=seen.append) == starter_digest
    assert seen[-1] == starter_path.stat().st_size
    assert store.add_file(tmp_path / "nothing.gguf", starter_digest) == starter_digest  # has it
    with pytest.raises(InvalidRequest, match="is not a file"):
        store.add_file(tmp_path / "nothing.gguf")


# -- copy and remove --


def test_copy_names_the_same_blobs(ollama_dir, starter_digest):
    store = Store(ollama_dir)
    blobs = sorted(store.blobs.iterdir())
    copied = store.copy("smollm2:135m", "mine/smol:copy")
    original = store.get("smollm2:135m")
    assert copied.name == "mine/smol:copy"
    assert copied.digest == original.digest and copied.path == original.path
    assert sorted(store.blobs.iterdir()) == blobs
    with pytest.raises(ModelNotFound):
        store.copy("missing:tag", "other:tag")


def test_remove_deletes_only_blobs_nothing_else_uses(ollama_dir, starter_digest):
    store = Store(ollama_dir)
    bare = store.manifest("registry.example.com:5000/team/smol:q4")
    full = store.manifest("smollm2:135m")
    only_full = {x["digest"] for x in full["layers"]} - {x["digest"] for x in bare["layers"]}
    store.remove("smollm2:135m")  # someone/smol:latest still uses every blob
    assert all(store.has_blob(d) for d in only_full)
    assert not ollama_dir.joinpath("manifests", *STARTER).exists()
    assert not ollama_dir.joinpath("manifests", *STARTER[:3]).exists()  # empty folder gone
    store.remove("someone/smol")
    assert not any(store.has_blob(d) for d in only_full)
    assert store.has_blob(starter_digest)  # the q4 model still uses the GGUF
    store.remove("registry.example.com:5000/team/smol:q4")
    assert list(store.blobs.iterdir()) == []
    assert list(store.manifests.iterdir()) == []
    with pytest.raises(ModelNotFound):
        store.remove("smollm2:135m")


def test_replacing_a_manifest_drops_the_layers_it_no_longer_uses(shared, starter_digest):
    store, digest = shared, starter_digest
    first = store.create("replaced", digest, system="first")
    old_system = next(
        x["digest"]
        for x in store.manifest("replaced")["layers"]
        if x["mediaType"].endswith("system")
    )
    store.create("replaced", digest, system="second")
    assert not store.has_blob(old_system)
    assert store.get("replaced").system == "second" and first.system == "first"
    assert store.has_blob(digest)


def test_gc_removes_stale_leftovers_only(tmp_path):
    store = Store(tmp_path)
    store.blobs.mkdir(parents=True)
    old = [store.blobs / ".tmp-0001", store.partial_path("sha256:" + "3" * 64)]
    new = [store.blobs / ".tmp-0002", store.partial_path("sha256:" + "4" * 64)]
    for path in old + new:
        path.write_bytes(b"x")
    for path in old:
        os.utime(path, (time.time() - 2 * 86400,) * 2)
    assert store.gc() == 2
    assert [p.exists() for p in old + new] == [False, False, True, True]


async def _chunks(parts):
    for part in parts:
        yield part

"""Pulls from a real OCI registry: Debian's docker-registry (distribution 2.8), started
here, holding the starter model pushed in Ollama's manifest format.

A proxy between the puller and the registry (tests/support/oci.py) asks for a Bearer
token as public registries do, records each request's Range and the bytes it sent, and
breaks things on purpose: it cuts connections, flips a byte, ignores Range, or serves a
blob as a plain .gguf URL. No Ray here; every pull is a real download over HTTP.
"""

from __future__ import annotations

import asyncio
import math
from contextlib import aclosing
from pathlib import Path

import pytest

from nodes.errors import ModelNotFound, PullFailed
from nodes.pull import Puller, hf
from nodes.store import PROJECTOR_TYPE, Store
from tests.support.oci import (
    PARAMS,
    TEMPLATE,
    OllamaModel,
    RegistryProxy,
    file_sha256,
    ollama_model,
    push_model,
    running_registry,
)

pytestmark = pytest.mark.integration

MIB = 1024**2
REPOSITORY = "library/smollm2"
PART = 16 * MIB  # the starter model (98 MB) comes in 6 ranges, 4 at a time


@pytest.fixture(scope="module")
def starter(starter_path) -> OllamaModel:
    return ollama_model(starter_path)


@pytest.fixture(scope="module")
def registry(tmp_path_factory, starter):
    with running_registry(tmp_path_factory.mktemp("registry")) as running:
        push_model(running.url, REPOSITORY, "135m", starter)
        push_model(running.url, REPOSITORY, "135m-again", starter)  # a second tag, same blobs
        yield running


@pytest.fixture
def proxy(registry, starter):
    config = starter.manifest["config"]["digest"]
    running = RegistryProxy(
        registry.host,
        require_token=True,
        files={
            "/models/SmolLM2-135M.gguf": f"/v2/{REPOSITORY}/blobs/{starter.model_digest}",
            "/models/config.gguf": f"/v2/{REPOSITORY}/blobs/{config}",
            f"/api/blobs/{starter.model_digest}": f"/v2/{REPOSITORY}/blobs/{starter.model_digest}",
        },
    ).start()
    yield running
    running.close()


def model_name(proxy: RegistryProxy, tag: str = "135m") -> str:
    return f"{proxy.host}/{REPOSITORY}:{tag}"


def collect(puller: Puller, name: str) -> list[dict]:
    async def run():
        return [event async for event in puller.pull(name, insecure=True)]

    return asyncio.run(run())


def files(store: Store) -> dict[str, int]:
    return {str(p.relative_to(store.root)): p.stat().st_size for p in store.root.rglob("*")}


def range_starts(proxy: RegistryProxy, digest: str) -> list[int]:
    return sorted(int(s.range[6:].split("-")[0]) for s in proxy.blob_gets(digest) if s.range)


def test_a_full_pull(tmp_path, proxy, starter, starter_path):
    store = Store(tmp_path)
    events = collect(Puller(store, part_size=PART), model_name(proxy))

    assert events[0] == {"status": "pulling manifest"}
    assert events[-3:] == [
        {"status": "verifying sha256 digest"},
        {"status": "writing manifest"},
        {"status": "success"},
    ]
    blobs = [*starter.manifest["layers"], starter.manifest["config"]]
    for blob in blobs:  # Ollama's shape, in Ollama's order, each ending complete
        mine = [e for e in events if e.get("digest") == blob["digest"]]
        assert {tuple(e) for e in mine} == {("status", "digest", "total", "completed")}
        assert {e["status"] for e in mine} == {f"pulling {blob['digest'][7:19]}"}
        assert {e["total"] for e in mine} == {blob["size"]}
        completed = [e["completed"] for e in mine]
        assert completed == sorted(completed) and completed[-1] == blob["size"]
    model_events = [e for e in events if e.get("digest") == starter.model_digest]
    assert len(model_events) > 3  # progress while it downloads, not just the end

    model = store.get(model_name(proxy))
    assert Path(model.path).read_bytes() == starter_path.read_bytes()
    assert model.model_digest == starter.model_digest
    assert (model.template, model.parameters) == (TEMPLATE, PARAMS)
    assert store.manifest(model_name(proxy)) == starter.manifest
    assert not [p for p in store.blobs.iterdir() if "partial" in p.name or ".tmp" in p.name]

    size = starter_path.stat().st_size
    assert range_starts(proxy, starter.model_digest) == list(range(0, size, PART))
    assert proxy.bytes_sent(starter.model_digest) == size
    assert proxy.max_concurrent_blobs > 1
    assert proxy.token_requests[0] == {
        "scope": ["repository:library/smollm2:pull"],
        "service": ["corral-test-registry"],
    }

    proxy.reset()
    again = collect(Puller(store, part_size=PART), model_name(proxy))
    assert not [s for s in proxy.seen if "/blobs/" in s.path]  # nothing fetched twice
    shown = {e["digest"]: e for e in again if "digest" in e}
    assert {d: (e["completed"], e["total"]) for d, e in shown.items()} == {
        b["digest"]: (b["size"], b["size"]) for b in blobs
    }
    assert again[-1] == {"status": "success"}


def test_a_pull_cut_halfway_resumes_where_it_stopped(tmp_path, proxy, starter, starter_path):
    store = Store(tmp_path)
    size, digest = starter_path.stat().st_size, starter.model_digest
    proxy.cut_after(size // 2)  # then every connection breaks: the pull fails
    with pytest.raises(PullFailed, match=f"Downloading {digest} from .* failed after 1 tries"):
        collect(Puller(store, part_size=PART, retries=0), model_name(proxy))
    first = proxy.bytes_sent(digest)
    assert first <= size // 2
    assert store.manifest(model_name(proxy)) is None and not store.has_blob(digest)
    assert store.partial_path(digest).is_file()

    proxy.cut_after(None)
    proxy.reset()
    events = collect(Puller(store, part_size=PART), model_name(proxy))
    assert events[-1] == {"status": "success"}
    assert Path(store.get(model_name(proxy)).path).read_bytes() == starter_path.read_bytes()
    # It starts from what the first pull kept and asks only for the rest, from the middle of
    # ranges. (What was in flight at the cut is lost: up to a socket buffer per parallel
    # range, more when the machine is busy, so "kept" is only bounded by what was sent.)
    kept = next(e for e in events if e.get("digest") == digest)["completed"]
    assert 0 < kept <= first
    assert proxy.bytes_sent(digest) == size - kept
    assert any(start % PART for start in range_starts(proxy, digest))


def test_a_pull_stopped_halfway_resumes_where_it_stopped(tmp_path, proxy, starter, starter_path):
    store = Store(tmp_path)
    size, digest = starter_path.stat().st_size, starter.model_digest
    proxy.chunk_delay = 0.005  # slow enough to stop it in the middle

    async def stop_halfway() -> int:
        puller = Puller(store, part_size=PART)
        stopped_at = 0
        with pytest.raises(PullFailed, match="was stopped"):
            async for event in puller.pull(model_name(proxy), insecure=True):
                if event.get("digest") == digest and event["completed"] > size // 2:
                    stopped_at = stopped_at or event["completed"]
                    await puller.aclose()
        return stopped_at

    stopped_at = asyncio.run(stop_halfway())
    assert size // 2 < stopped_at < size
    proxy.chunk_delay = 0
    proxy.reset()
    events = collect(Puller(store, part_size=PART), model_name(proxy))
    assert events[-1] == {"status": "success"}
    assert Path(store.get(model_name(proxy)).path).read_bytes() == starter_path.read_bytes()
    kept = next(e for e in events if e.get("digest") == digest)["completed"]
    assert kept >= stopped_at  # every byte it had when it stopped was kept
    assert proxy.bytes_sent(digest) == size - kept
    assert any(start % PART for start in range_starts(proxy, digest))  # mid-range restarts


def test_a_connection_cut_during_a_pull_is_resumed_by_the_pull_itself(
    tmp_path, proxy, starter, starter_path
):
    store = Store(tmp_path)
    size, digest = starter_path.stat().st_size, starter.model_digest
    proxy.cut_after(size // 3, times=1)
    events = collect(Puller(store, part_size=PART, retries=2), model_name(proxy))
    assert events[-1] == {"status": "success"}
    assert [s.cut for s in proxy.blob_gets(digest)].count(True) == 1
    assert proxy.bytes_sent(digest) <= size + 4 * 256 * 1024  # nothing fetched twice
    assert len(proxy.blob_gets(digest)) == math.ceil(size / PART) + 1  # one range again


def test_a_corrupted_blob_is_rejected_and_the_store_unchanged(tmp_path, proxy, starter):
    store = Store(tmp_path)
    store.add_file(Path(__file__))  # something already there
    before = files(store)
    proxy.flip = True
    with pytest.raises(PullFailed, match=f"hashes to sha256:.*, not {starter.model_digest}"):
        collect(Puller(store, part_size=PART), model_name(proxy))
    assert files(store) == before
    assert store.manifest(model_name(proxy)) is None


def test_two_pulls_of_one_model_download_it_once(tmp_path, proxy, starter, starter_path):
    store = Store(tmp_path)
    size, digest = starter_path.stat().st_size, starter.model_digest
    puller = Puller(store, part_size=PART)

    async def pull(name: str, leave_after: int | None = None) -> list[dict]:
        events = []
        async with aclosing(puller.pull(name, insecure=True)) as progress:
            async for event in progress:
                events.append(event)
                if len(events) == leave_after:
                    break  # this caller goes away; the download goes on for the others
        return events

    async def run():
        return await asyncio.gather(
            pull(model_name(proxy)),
            pull(model_name(proxy), leave_after=2),
            pull(model_name(proxy)),
            pull(model_name(proxy, "135m-again")),  # another name, the same blobs
        )

    first, leaver, second, other_tag = asyncio.run(run())
    assert len(leaver) == 2
    for events in (first, second, other_tag):
        assert events[-1] == {"status": "success"}
        completed = [e["completed"] for e in events if e.get("digest") == digest]
        assert completed == sorted(completed) and completed[-1] == size
    assert proxy.bytes_sent(digest) == size
    assert len(proxy.blob_gets(digest)) == math.ceil(size / PART)
    manifests = [s for s in proxy.seen if "/manifests/" in s.path and s.status == 200]
    assert len(manifests) == 2  # one per name
    assert store.get(model_name(proxy)).digest == store.get(model_name(proxy, "135m-again")).digest


def test_an_unknown_model_is_not_found(tmp_path, proxy):
    store = Store(tmp_path / "store")
    for name in (f"{proxy.host}/library/nothing:latest", model_name(proxy, "no-such-tag")):
        with pytest.raises(ModelNotFound) as caught:
            collect(Puller(store), name)
        assert caught.value.model == name
    assert not store.root.exists()


def test_a_gguf_url_is_pulled_and_resumed(tmp_path, proxy, starter_path):
    store = Store(tmp_path)
    size = starter_path.stat().st_size
    url = f"{proxy.url}/models/SmolLM2-135M.gguf"
    proxy.cut_after(size // 2)
    with pytest.raises(PullFailed, match="SmolLM2-135M.gguf failed"):
        collect(Puller(store, part_size=PART, retries=0), url)
    proxy.cut_after(None)
    proxy.reset()
    events = collect(Puller(store, part_size=PART), url)
    assert events[-1] == {"status": "success"}
    pulling = [e for e in events if e["status"] == "pulling smollm2-135m"]
    assert size // 4 < pulling[0]["completed"] <= size // 2  # where the first one stopped
    assert pulling[-1]["completed"] == pulling[-1]["total"] == size
    assert sum(s.sent for s in proxy.seen) == size - pulling[0]["completed"]
    model = store.get("smollm2-135m:latest")
    assert Path(model.path).read_bytes() == starter_path.read_bytes()
    assert [p.name for p in store.blobs.iterdir() if "partial" in p.name] == []


def test_a_url_that_is_not_gguf_is_refused(tmp_path, proxy):
    store = Store(tmp_path)
    with pytest.raises(PullFailed, match="is not a GGUF file"):
        collect(Puller(store), f"{proxy.url}/models/config.gguf")
    assert [p for p in store.root.rglob("*") if p.is_file()] == []


def test_a_hugging_face_pull_picks_the_quantization_and_verifies_it(
    tmp_path, proxy, starter, starter_path, monkeypatch
):
    """Everything but the Hub's API (no network here): its file list is given, and the
    file's URL points at the proxy, which serves it as the Hub's CDN would."""
    import huggingface_hub

    repo, revision = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF", "0123abc"
    size, sha256 = starter_path.stat().st_size, starter.model_digest.removeprefix("sha256:")
    listing = {
        "README.md": (1000, None),
        "smollm2-135m-instruct-q8_0.gguf": (2 * size, "1" * 64),
        "smollm2-135m-instruct-q4_1.gguf": (size, sha256),
    }
    asked = []

    def files(repo_id: str, name: str):
        asked.append(repo_id)
        return listing, revision

    def url(repo_id: str, filename: str, *, revision: str) -> str:
        return f"{proxy.url}/{repo_id}/resolve/{revision}/{filename}"

    monkeypatch.setattr(hf, "list_files", files)
    monkeypatch.setattr(huggingface_hub, "hf_hub_url", url)
    served = f"/{repo}/resolve/{revision}/smollm2-135m-instruct-q4_1.gguf"
    proxy.files[served] = f"/v2/{REPOSITORY}/blobs/{starter.model_digest}"

    store = Store(tmp_path)
    events = collect(Puller(store, part_size=PART), f"hf.co/{repo}:Q4_1")
    assert asked == [repo]
    assert events[-1] == {"status": "success"}
    pulled = [e for e in events if e.get("digest") == starter.model_digest]
    assert pulled[-1]["completed"] == pulled[-1]["total"] == size
    model = store.get("hf.co/huggingfacetb/smollm2-135m-instruct-gguf:q4_1")
    assert model.model_digest == starter.model_digest
    assert Path(model.path).read_bytes() == starter_path.read_bytes()
    blob = f"/v2/{REPOSITORY}/blobs/{starter.model_digest}"
    assert [s.path for s in proxy.seen] == [blob] * math.ceil(size / PART)


def test_fetch_blob_from_a_head_that_ignores_range(tmp_path, proxy, starter, starter_path):
    store = Store(tmp_path)
    size, digest = starter_path.stat().st_size, starter.model_digest
    url = f"{proxy.url}/api/blobs/{digest}"
    proxy.ignore_range = True
    proxy.cut_after(size // 3, times=1)
    path = asyncio.run(Puller(store, retries=2).fetch_blob(digest, url))
    assert path == store.blob_path(digest)
    assert path.read_bytes() == starter_path.read_bytes()
    # the resumed request got the whole file again: it was fetched whole, not spliced
    assert proxy.bytes_sent(digest) >= size + size // 3 - MIB


def test_fetch_blob_refuses_bytes_of_another_digest(tmp_path, proxy, starter):
    store = Store(tmp_path)
    wrong = "sha256:" + "0" * 64
    url = f"{proxy.url}/api/blobs/{starter.model_digest}"
    with pytest.raises(PullFailed, match=f"not {wrong}"):
        asyncio.run(Puller(store).fetch_blob(wrong, url))
    assert not store.has_blob(wrong)
    assert not [p for p in store.blobs.iterdir()]


def with_projector(model: OllamaModel, projector: Path) -> OllamaModel:
    """``model`` with a vision projector layer after its model layer, as Ollama's vision
    models (llava, moondream) are pushed."""
    digest = file_sha256(projector)
    layer = {"mediaType": PROJECTOR_TYPE, "digest": digest, "size": projector.stat().st_size}
    model_layer, *rest = model.manifest["layers"]
    manifest = {**model.manifest, "layers": [model_layer, layer, *rest]}
    return OllamaModel(manifest, {**model.blobs, digest: projector}, model.config)


def test_a_vision_model_pulls_with_its_projector(
    tmp_path, registry, proxy, starter, projector_path
):
    vision = with_projector(starter, projector_path)
    push_model(registry.url, REPOSITORY, "vision", vision)
    store = Store(tmp_path)
    events = collect(Puller(store, part_size=PART), model_name(proxy, "vision"))
    assert events[-1] == {"status": "success"}
    model = store.get(model_name(proxy, "vision"))
    projector = vision.manifest["layers"][1]["digest"]
    assert model.projector_digest == projector and model.model_digest == starter.model_digest
    assert Path(model.projector).read_bytes() == projector_path.read_bytes()
    assert store.manifest(model_name(proxy, "vision")) == vision.manifest


def test_a_hugging_face_pull_brings_the_repositorys_projector(
    tmp_path, registry, proxy, starter, starter_path, projector_path, monkeypatch
):
    """The Hub's file list names a model and two projectors: the F16 one comes along."""
    import huggingface_hub

    vision = with_projector(starter, projector_path)
    push_model(registry.url, REPOSITORY, "vision", vision)  # the proxy serves blobs from here
    projector = vision.manifest["layers"][1]["digest"]
    repo, revision = "ggml-org/SmolVLM-Tiny-GGUF", "0123abc"
    listing = {
        "smolvlm-tiny-q4_1.gguf": (starter_path.stat().st_size, starter.model_digest[7:]),
        "mmproj-smolvlm-tiny-f16.gguf": (projector_path.stat().st_size, projector[7:]),
        "mmproj-smolvlm-tiny-q8_0.gguf": (1000, "2" * 64),
    }
    monkeypatch.setattr(hf, "list_files", lambda repo_id, name: (listing, revision))
    monkeypatch.setattr(
        huggingface_hub,
        "hf_hub_url",
        lambda repo_id, filename, *, revision: (
            f"{proxy.url}/{repo_id}/resolve/{revision}/{filename}"
        ),
    )
    for filename, digest in (
        ("smolvlm-tiny-q4_1.gguf", starter.model_digest),
        ("mmproj-smolvlm-tiny-f16.gguf", projector),
    ):
        proxy.files[f"/{repo}/resolve/{revision}/{filename}"] = f"/v2/{REPOSITORY}/blobs/{digest}"
    store = Store(tmp_path)
    events = collect(Puller(store, part_size=PART), f"hf.co/{repo}:Q4_1")
    assert events[-1] == {"status": "success"}
    model = store.get(f"hf.co/{repo.lower()}:q4_1")
    assert model.model_digest == starter.model_digest and model.projector_digest == projector
    assert Path(model.projector).read_bytes() == projector_path.read_bytes()

"""Pulls without a network: where a name comes from and what it becomes, which GGUF of a
Hugging Face repository a tag picks, local imports, one import shared by two callers, and
how an interrupted download plans its resumption. (Pulls over HTTP from a real registry:
tests/integration/test_registry.py.)"""

from __future__ import annotations

import asyncio
import json
import threading
from types import SimpleNamespace

import pytest

from nodes.errors import InvalidRequest, ModelNotFound, PullFailed
from nodes.registry import (
    Puller,
    _hf_files,
    _Part,
    _Transfer,
    choose_gguf,
    choose_projector,
    local_name,
    parse_challenge,
    source_of,
)
from nodes.store import Store


@pytest.mark.parametrize(
    ("name", "source"),
    [
        ("llama3.2:1b", "registry"),
        ("registry.example.com:5000/team/model:q4", "registry"),
        ("hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M", "hf"),
        ("huggingface.co/org/repo", "hf"),
        ("https://example.com/models/x.gguf", "url"),
        ("HTTP://10.0.0.2:8000/x.gguf", "url"),
        ("/srv/models/x.gguf", "file"),
        ("./x.gguf", "file"),
        ("~/Downloads/x.GGUF", "file"),
        ("x.gguf", "file"),
    ],
)
def test_source_of(name, source):
    assert source_of(name) == source


@pytest.mark.parametrize(
    ("name", "local"),
    [
        ("llama3.2", "llama3.2:latest"),
        ("registry.ollama.ai/library/llama3.2:1b", "llama3.2:1b"),
        ("someone/model:tag", "someone/model:tag"),
        (
            "hf.co/Bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M",
            "hf.co/bartowski/llama-3.2-1b-instruct-gguf:q4_k_m",
        ),
        ("huggingface.co/Org/Repo", "hf.co/org/repo:latest"),
        ("https://example.com/m/SmolLM2-135M.Q4_1.gguf?download=true", "smollm2-135m.q4_1:latest"),
        ("https://example.com/m/My%20Model%2B.gguf", "my-model:latest"),
        ("/srv/models/Qwen2.5 7B (Q8).gguf", "qwen2.5-7b-q8:latest"),
    ],
)
def test_the_name_a_pull_stores_the_model_under(name, local):
    assert local_name(name) == local


@pytest.mark.parametrize(
    "name",
    [
        "../x",
        "a/../b",
        "x:..",
        "https://example.com/readme.md",
        "https://example.com/%2e%2e.gguf",
        "https:///x.gguf",
        "http://[::1/x.gguf",
        "/etc/passwd",
        "/srv/.gguf",
        "hf.co/org/../repo",
        "",
    ],
)
def test_a_bad_name_fails_before_any_progress(tmp_path, name):
    puller = Puller(Store(tmp_path))

    async def first():
        return await anext(aiter(puller.pull(name)))

    with pytest.raises(InvalidRequest):
        asyncio.run(first())
    assert not any(tmp_path.iterdir())


BARTOWSKI = [
    ".gitattributes",
    "README.md",
    "Llama-3.2-1B-Instruct-IQ4_XS.gguf",
    "Llama-3.2-1B-Instruct-Q4_K_L.gguf",
    "Llama-3.2-1B-Instruct-Q4_K_M.gguf",
    "Llama-3.2-1B-Instruct-Q4_K_S.gguf",
    "Llama-3.2-1B-Instruct-Q8_0.gguf",
    "Llama-3.2-1B-Instruct-f16.gguf",
    "mmproj-Llama-3.2-1B-f16.gguf",
]


@pytest.mark.parametrize(
    ("quant", "chosen"),
    [
        (None, "Llama-3.2-1B-Instruct-Q4_K_M.gguf"),
        ("q8_0", "Llama-3.2-1B-Instruct-Q8_0.gguf"),
        ("IQ4_XS", "Llama-3.2-1B-Instruct-IQ4_XS.gguf"),
        ("F16", "Llama-3.2-1B-Instruct-f16.gguf"),  # not the projector
    ],
)
def test_choose_gguf_picks_the_quantization_asked_for(quant, chosen):
    assert choose_gguf(BARTOWSKI, quant, "bartowski/x") == chosen


@pytest.mark.parametrize("quant", ["Q4_K", "Q4", "Q5_K_M", "Q6_K"])
def test_choose_gguf_names_the_tags_there_are(quant):
    with pytest.raises(InvalidRequest, match="IQ4_XS, Q4_K_L, Q4_K_M, Q4_K_S, Q8_0, f16"):
        choose_gguf(BARTOWSKI, quant, "bartowski/x")


def test_choose_gguf_without_q4_k_m_takes_the_only_file_or_asks():
    assert choose_gguf(["model.Q8_0.gguf", "README.md"], None, "o/r") == "model.Q8_0.gguf"
    with pytest.raises(InvalidRequest, match="several GGUF files and no Q4_K_M; .*Q5_0, Q8_0"):
        choose_gguf(["m.Q8_0.gguf", "m.Q5_0.gguf"], None, "o/r")
    with pytest.raises(InvalidRequest, match="no GGUF file"):
        choose_gguf(["model.safetensors"], None, "o/r")
    split = ["Q8_0/m-Q8_0-00001-of-00002.gguf", "Q8_0/m-Q8_0-00002-of-00002.gguf"]
    with pytest.raises(InvalidRequest, match="split into several files"):
        choose_gguf(split, "Q8_0", "o/r")
    nested = ["big/m-Q4_K_M.gguf", "m-Q4_K_M.gguf"]
    assert choose_gguf(nested, None, "o/r") == "m-Q4_K_M.gguf"


def test_choose_projector_takes_the_repositorys_mmproj_if_any():
    model = "Llama-3.2-1B-Instruct-Q4_K_M.gguf"
    assert choose_projector(BARTOWSKI, model) == "mmproj-Llama-3.2-1B-f16.gguf"
    assert choose_projector(["m-Q4_K_M.gguf", "README.md"], "m-Q4_K_M.gguf") is None
    # several precisions (as ggml-org and unsloth ship them): F16 first, then BF16, F32 ...
    many = ["mmproj-model-f32.gguf", "mmproj-BF16.gguf", "mmproj-F16.gguf", "mmproj-Q8_0.gguf"]
    assert choose_projector(many, model) == "mmproj-F16.gguf"
    assert choose_projector(many[:2], model) == "mmproj-BF16.gguf"
    assert choose_projector(["mmproj-q8_0.gguf", "mmproj-q4.gguf"], model) == "mmproj-q8_0.gguf"
    # the projector beside the model, when the repository has folders
    nested = ["a/mmproj-f16.gguf", "b/mmproj-f16.gguf", "b/m-Q4_K_M.gguf"]
    assert choose_projector(nested, "b/m-Q4_K_M.gguf") == "b/mmproj-f16.gguf"


def test_parse_challenge():
    header = (
        'Bearer realm="https://auth.example.com/token",service="registry.example.com",'
        'scope="repository:library/x:pull"'
    )
    assert parse_challenge(header) == (
        "bearer",
        {
            "realm": "https://auth.example.com/token",
            "service": "registry.example.com",
            "scope": "repository:library/x:pull",
        },
    )
    assert parse_challenge('Basic realm="x"') == ("basic", {"realm": "x"})


def test_hugging_face_files_come_with_their_sha256(monkeypatch):
    import httpx
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    from huggingface_hub.hf_api import BlobLfsInfo, RepoSibling

    siblings = [
        RepoSibling("README.md", size=1200),
        RepoSibling(
            "m-Q4_K_M.gguf", size=134, lfs=BlobLfsInfo(size=800, sha256="a" * 64, pointer_size=134)
        ),
    ]
    failure: list[Exception] = []

    class FakeApi:
        def model_info(self, repo_id, *, files_metadata=False):
            assert files_metadata
            if failure:
                raise failure[0]
            return SimpleNamespace(siblings=siblings, sha="0123abc")

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert _hf_files("org/repo", "hf.co/org/repo") == (
        {"README.md": (1200, None), "m-Q4_K_M.gguf": (800, "a" * 64)},
        "0123abc",
    )
    response = httpx.Response(404, request=httpx.Request("GET", "https://huggingface.co"))
    failure[:] = [RepositoryNotFoundError("no such repo", response=response)]
    with pytest.raises(ModelNotFound):
        _hf_files("org/repo", "hf.co/org/repo")
    failure[:] = [GatedRepoError("gated", response=response)]
    with pytest.raises(PullFailed, match="accept its terms"):
        _hf_files("org/repo", "hf.co/org/repo")
    failure[:] = [httpx.ConnectError("no network")]
    with pytest.raises(PullFailed, match="Asking Hugging Face about org/repo failed"):
        _hf_files("org/repo", "hf.co/org/repo")


# -- local files --


def collect(puller: Puller, name: str) -> list[dict]:
    async def run():
        return [event async for event in puller.pull(name)]

    return asyncio.run(run())


def test_a_local_gguf_is_imported(tmp_path, starter_path):
    source = tmp_path / "SmolLM2 135M.gguf"
    source.hardlink_to(starter_path)
    store = Store(tmp_path / "store")
    events = collect(Puller(store), str(source))
    copying = [e for e in events if e["status"] == "importing SmolLM2 135M.gguf"]
    assert copying and copying[-1]["completed"] == copying[-1]["total"] == source.stat().st_size
    completed = [e["completed"] for e in copying]
    assert completed == sorted(completed)
    assert [e["status"] for e in events[len(copying) :]] == ["writing manifest", "success"]
    model = store.get("smollm2-135m")
    assert open(model.path, "rb").read() == starter_path.read_bytes()
    assert model.details.quantization_level == "Q4_1"


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_text("hello")
    store = Store(tmp_path / "store")
    with pytest.raises(InvalidRequest, match="not a GGUF file"):
        collect(Puller(store), str(bad))
    with pytest.raises(InvalidRequest, match="does not exist"):
        collect(Puller(store), str(tmp_path / "missing.gguf"))
    assert not store.root.exists()


def test_two_callers_of_one_pull_share_it_and_one_leaving_stops_nothing(
    tmp_path, starter_path, monkeypatch
):
    source = tmp_path / "shared.gguf"
    source.hardlink_to(starter_path)
    store = Store(tmp_path / "store")
    copies = []
    release = threading.Event()
    real_add_file = store.add_file

    def slow_add_file(path, digest=None, progress=None):
        copies.append(path)
        release.wait(10)
        return real_add_file(path, digest, progress)

    monkeypatch.setattr(store, "add_file", slow_add_file)
    puller = Puller(store)

    async def run():
        leaver = puller.pull(str(source))
        stayer = puller.pull(str(source))
        await asyncio.sleep(0)
        stay = asyncio.create_task(anext(stayer))  # both wait for the same import
        await asyncio.sleep(0.05)
        release.set()
        first = await anext(leaver)
        await leaver.aclose()  # the first caller leaves after one object
        rest = [await stay] + [event async for event in stayer]
        return first, rest

    first, rest = asyncio.run(run())
    assert len(copies) == 1
    assert first["status"].startswith("importing")
    assert rest[-1] == {"status": "success"}
    assert open(store.get("shared:latest").path, "rb").read() == starter_path.read_bytes()


# -- resuming --


def test_a_fresh_download_is_split_into_ranges(tmp_path):
    transfer = _Transfer(tmp_path / "x.partial", 100, 30, "x")
    assert transfer.parts == [_Part(0, 30), _Part(30, 60), _Part(60, 90), _Part(90, 100)]
    assert _Transfer(tmp_path / "y.partial", 30, 30, "y").parts == [_Part(0, 30)]
    assert _Transfer(tmp_path / "z.partial", None, 30, "z").parts == [_Part(0, None)]


def test_a_stream_resumes_from_the_partial_files_size(tmp_path):
    partial = tmp_path / "x.partial"
    partial.write_bytes(b"x" * 45)  # one stream, appended: its size is the record
    transfer = _Transfer(partial, 100, 30, "x")
    assert transfer.parts == [_Part(0, 45, 45), _Part(45, 75), _Part(75, 100)]
    assert transfer.completed == 45
    partial.write_bytes(b"x" * 10)
    assert _Transfer(partial, 20, 30, "x").parts == [_Part(0, 20, 10)]


def test_ranges_resume_from_their_record_and_nothing_else(tmp_path):
    partial = tmp_path / "x.partial"
    partial.write_bytes(b"\0" * 100)
    state = tmp_path / "x.partial.json"
    record = {"total": 100, "validator": None, "parts": [[0, 50, 20], [50, 100, 50]]}
    state.write_text(json.dumps(record))
    assert _Transfer(partial, 100, 30, "x").parts == [_Part(0, 50, 20), _Part(50, 100, 50)]
    # the file changed size since: nothing of it can be trusted
    assert _Transfer(partial, 120, 30, "x").parts == [_Part(0, 30), *_parts(30, 120, 30)]
    assert not partial.exists() and not state.exists()


def test_a_url_resumes_only_the_same_version(tmp_path):
    partial = tmp_path / "x.partial"
    first = _Transfer(partial, 100, 200, "x", validator='"v1"')
    partial.write_bytes(b"x" * 40)
    first.parts[0].done = 40
    first.save()
    assert _Transfer(partial, 100, 200, "x", validator='"v1"').parts == [_Part(0, 100, 40)]
    assert _Transfer(partial, 100, 200, "x", validator='"v2"').parts == [_Part(0, 100)]
    assert not partial.exists()


def _parts(start: int, total: int, size: int) -> list[_Part]:
    return [_Part(s, min(s + size, total)) for s in range(start, total, size)]

"""Ollama's native routes over HTTP: the real app, a real server, the real starter model.

The app (``build_api``) runs under uvicorn in a thread
over ``LocalBackend``: in-process replicas (the real ``ModelReplica``, no Ray)
with the real llama.cpp engine on SmolLM2-135M, and a fake engine that breaks
mid-stream. Requests go through httpx and through the official ``ollama``
client, so wire formats, NDJSON streaming, options, grammars and errors are
checked as clients see them.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime

import httpx
import ollama
import pytest

from deployments.api import build_api
from deployments.ollama.serving import OLLAMA_VERSION
from nodes.engine import EngineSpec
from nodes.models import STARTER_MODEL, builtin_models
from tests.support.local_backend import LocalBackend
from tests.support.serve import serve_app
from tests.support.vectors import dot

MODEL = STARTER_MODEL
GREEDY = {"temperature": 0, "num_predict": 12}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
METRICS = (
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
)


@pytest.fixture(scope="module")
def backend(starter_path, tmp_path_factory) -> LocalBackend:
    starter = builtin_models()[MODEL]
    return LocalBackend(
        [
            EngineSpec(model=MODEL, path=str(starter_path), n_ctx=1024, n_threads=2),
            EngineSpec(
                model="fake:broken",
                path="",
                engine="fake",
                options={"token_delay": 0, "fail_after": 3},
            ),
        ],
        models=[replace(starter, path=str(starter_path))],
        registry={"library/pulled:q4": MODEL},
        blob_dir=tmp_path_factory.mktemp("blobs"),
    )


@pytest.fixture(scope="module")
def url(backend) -> Iterator[str]:
    """The app served by uvicorn on a free port, as ``corral serve`` would serve it."""
    with serve_app(build_api(backend)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url) -> ollama.Client:
    return ollama.Client(host=url, timeout=120)


def lines(response: httpx.Response) -> list[dict]:
    assert response.headers["content-type"] == "application/x-ndjson"
    return [json.loads(line) for line in response.iter_lines() if line]


def assert_metrics(final: dict) -> None:
    """Ollama's counts and nanosecond durations: integers that add up."""
    assert all(isinstance(final[k], int) and final[k] >= 0 for k in METRICS), final
    assert final["total_duration"] >= final["prompt_eval_duration"] + final["eval_duration"]
    assert final["total_duration"] >= final["load_duration"]
    assert final["prompt_eval_count"] > 0 and final["prompt_eval_duration"] > 0
    assert final["total_duration"] < 60 * 10**9  # nanoseconds, not microseconds


def assert_created_at(obj: dict) -> None:
    stamp = datetime.fromisoformat(obj["created_at"])
    assert abs(stamp.timestamp() - time.time()) < 60
    assert obj["created_at"].endswith("Z")


# -- chat and generate ----------------------------------------------------------------------


def test_chat_whole(http):
    r = http.post(
        "/api/chat", json={"model": MODEL, "messages": QUESTION, "options": GREEDY, "stream": False}
    )
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["model"] == MODEL and body["done"] is True
    assert body["message"]["role"] == "assistant" and body["message"]["content"]
    assert body["done_reason"] == "length" and body["eval_count"] == 12
    assert_metrics(body)
    assert_created_at(body)


def test_chat_streams_ndjson_by_default_with_the_same_greedy_answer(http):
    whole = http.post(
        "/api/chat", json={"model": MODEL, "messages": QUESTION, "options": GREEDY, "stream": False}
    ).json()
    with http.stream(
        "POST", "/api/chat", json={"model": MODEL, "messages": QUESTION, "options": GREEDY}
    ) as r:
        parts = lines(r)
    *pieces, final = parts
    assert len(pieces) > 2 and not any(p["done"] for p in pieces)
    assert all(set(p) == {"model", "created_at", "message", "done"} for p in pieces)
    assert "".join(p["message"]["content"] for p in pieces) == whole["message"]["content"]
    assert final["done"] is True and final["message"] == {"role": "assistant", "content": ""}
    assert final["done_reason"] == whole["done_reason"] and final["eval_count"] == 12
    assert_metrics(final)


def test_generate_whole_streamed_and_raw(http):
    req = {"model": MODEL, "prompt": "Name a color.", "options": GREEDY}
    whole = http.post("/api/generate", json={**req, "stream": False}).json()
    assert whole["response"] and whole["done"] and "message" not in whole
    assert_metrics(whole)
    with http.stream("POST", "/api/generate", json=req) as r:
        parts = lines(r)
    assert "".join(p["response"] for p in parts) == whole["response"]
    assert parts[-1]["response"] == "" and parts[-1]["eval_count"] == whole["eval_count"]
    # raw: the prompt as sent, no chat template (fewer tokens than the templated one)
    raw = http.post("/api/generate", json={**req, "raw": True, "stream": False}).json()
    assert raw["response"] and raw["prompt_eval_count"] < whole["prompt_eval_count"]


def test_generate_system_replaces_the_default_one(http):
    req = {"model": MODEL, "prompt": "Hi", "options": {"num_predict": 1}, "stream": False}
    plain = http.post("/api/generate", json=req).json()
    brief = http.post("/api/generate", json={**req, "system": "Be brief."}).json()
    # SmolLM2's template adds its own long system prompt when none is given
    assert brief["prompt_eval_count"] < plain["prompt_eval_count"]


def test_num_predict_limits_the_answer(client):
    options = {"temperature": 0, "num_predict": 5}  # greedy: no early end of text by chance
    r = client.generate(model=MODEL, prompt="Count from one to fifty.", options=options)
    assert r.eval_count == 5 and r.done_reason == "length"


def test_a_seed_repeats_the_answer(client):
    options = {"temperature": 1.5, "seed": 7, "num_predict": 12}
    answers = {client.generate(model=MODEL, prompt="Tell a story.", options=options).response}
    answers.add(client.generate(model=MODEL, prompt="Tell a story.", options=options).response)
    assert len(answers) == 1


def test_stop_sequences_end_the_answer(client):
    free = client.generate(model=MODEL, prompt="Count: one, two, three,", options=GREEDY)
    assert "," in free.response
    stopped = client.generate(
        model=MODEL, prompt="Count: one, two, three,", options={**GREEDY, "stop": [","]}
    )
    assert "," not in stopped.response and stopped.done_reason == "stop"
    assert stopped.eval_count < free.eval_count


def test_format_json_gives_json(client):
    r = client.chat(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe a cat as JSON."}],
        format="json",
        options={"temperature": 0, "num_predict": 48},
    )
    if r.done_reason == "stop":
        json.loads(r.message.content)
    else:  # cut short by num_predict: JSON so far
        assert r.message.content.lstrip().startswith(("{", "["))


def test_a_json_schema_format_gives_json_that_matches_it(client):
    schema = {
        "type": "object",
        "properties": {"capital": {"enum": ["Paris", "Rome"]}, "sure": {"type": "boolean"}},
        "required": ["capital", "sure"],
    }
    r = client.chat(model=MODEL, messages=QUESTION, format=schema, options={"temperature": 0})
    answer = json.loads(r.message.content)
    assert answer["capital"] in ("Paris", "Rome") and isinstance(answer["sure"], bool)
    assert r.done_reason == "stop"


def test_an_empty_prompt_loads_and_with_keep_alive_0_unloads(http, backend):
    backend.replicas.pop(MODEL, None)
    r = http.post("/api/generate", json={"model": MODEL})
    assert r.headers["content-type"] == "application/json"  # one object, even "streamed"
    body = r.json()
    assert (body["response"], body["done"], body["done_reason"]) == ("", True, "load")
    assert MODEL in backend.replicas
    body = http.post("/api/generate", json={"model": MODEL, "keep_alive": 0}).json()
    assert body["done_reason"] == "unload" and MODEL not in backend.replicas
    body = http.post("/api/chat", json={"model": MODEL, "messages": []}).json()
    assert body["done_reason"] == "load" and body["message"] == {"role": "assistant", "content": ""}
    assert MODEL in backend.replicas
    body = http.post("/api/chat", json={"model": MODEL, "keep_alive": "0s"}).json()
    assert body["done_reason"] == "unload" and MODEL not in backend.replicas


def test_a_stream_that_fails_ends_with_one_error_line(http):
    req = {"model": "fake:broken", "messages": QUESTION}
    with http.stream("POST", "/api/chat", json=req) as r:
        assert r.status_code == 200
        parts = lines(r)
    *pieces, last = parts
    assert pieces and not any(p["done"] for p in pieces)
    assert "".join(p["message"]["content"] for p in pieces).count(" ") == 2  # three words
    assert list(last) == ["error"] and "fault" not in last["error"]


# -- embeddings -----------------------------------------------------------------------------


def test_embed_vectors_are_unit_length_and_similar_for_similar_texts(http, client):
    r = client.embed(model=MODEL, input=["the cat sat", "the cat sat", "stock markets fell"])
    a, b, c = r.embeddings
    assert len(a) == 576 and abs(dot(a, a) - 1) < 1e-3
    assert dot(a, b) > 0.999 and dot(a, c) < dot(a, b)
    assert r.prompt_eval_count > 0 and r.total_duration > 0 and r.model == MODEL
    short = client.embed(model=MODEL, input="the cat sat", dimensions=64).embeddings[0]
    assert len(short) == 64 and abs(dot(short, short) - 1) < 1e-3
    legacy = client.embeddings(model=MODEL, prompt="the cat sat").embedding
    assert dot(legacy, a) > 0.999
    empty = http.post("/api/embed", json={"model": MODEL, "input": []}).json()
    assert empty["embeddings"] == []
    assert http.post("/api/embeddings", json={"model": MODEL}).json() == {"embedding": []}


# -- the library ----------------------------------------------------------------------------


def test_tags_lists_every_model_with_its_details(http, client):
    models = http.get("/api/tags").json()["models"]
    starter = next(m for m in models if m["name"] == MODEL)
    assert set(starter) == {"name", "model", "modified_at", "size", "digest", "details"}
    assert starter["model"] == MODEL and starter["size"] > 90 * 10**6
    assert starter["details"] == {
        "parent_model": "",
        "format": "gguf",
        "family": "llama",
        "families": ["llama"],
        "parameter_size": "135M",
        "quantization_level": "Q4_1",
    }
    assert datetime.fromisoformat(starter["modified_at"]).year > 2000
    assert MODEL in {m.model for m in client.list().models}


def test_ps_shows_loaded_models_with_expiry_and_context(http, client):
    client.generate(model=MODEL, prompt="Hi", options={"num_predict": 1}, keep_alive="10m")
    running = {m["name"]: m for m in http.get("/api/ps").json()["models"]}
    starter = running[MODEL]
    assert starter["size"] > 90 * 10**6 and starter["size_vram"] == 0
    assert starter["context_length"] == 1024 and starter["details"]["family"] == "llama"
    assert starter["placements"] == [
        {"node": "local", "replicas": 1, "status": "RUNNING", "slots": 1, "in_flight": 0}
    ]
    left = datetime.fromisoformat(starter["expires_at"]).timestamp() - time.time()
    assert 500 < left <= 600
    client.generate(model=MODEL, prompt="Hi", options={"num_predict": 1}, keep_alive=-1)
    forever = {m.model: m for m in client.ps().models}[MODEL].expires_at
    assert forever.year > 2200


def test_show_describes_the_model(http, client):
    body = http.post("/api/show", json={"model": MODEL}).json()
    assert body["details"]["parameter_size"] == "135M"
    assert body["model_info"]["general.architecture"] == "llama"
    assert body["model_info"]["llama.context_length"] == 8192
    assert body["model_info"]["tokenizer.ggml.tokens"] == []  # too long to show
    assert body["capabilities"] == ["completion", "tools"]  # as Ollama's smollm2 has them
    assert "<|im_start|>" in body["template"]  # the chat template Corral prompts with
    assert body["modelfile"].splitlines()[4].startswith("FROM /")
    assert "system" not in body and "license" not in body
    info = client.show(MODEL)
    assert info.modelinfo["general.architecture"] == "llama" and info.modified_at is not None
    legacy = http.post("/api/show", json={"name": MODEL.split(":")[0] + ":135m"})
    assert legacy.status_code == 200


def test_create_copy_and_delete(http, client):
    progress = list(
        client.create(
            model="terse",
            from_=MODEL,
            system="You are terse.",
            parameters={"num_predict": 3, "stop": ["<|im_end|>"], "temperature": 0},
            stream=True,
        )
    )
    assert progress[-1].status == "success"
    assert http.post("/api/show", json={"model": "terse"}).json()["system"] == "You are terse."
    info = client.show("terse")  # the client's ShowResponse has no `system`
    assert info.parameters.splitlines() == [
        "num_predict" + " " * 20 + "3",
        "stop" + " " * 27 + '"<|im_end|>"',
        "temperature" + " " * 20 + "0",
    ]
    assert "SYSTEM You are terse.\nPARAMETER num_predict 3\n" in info.modelfile
    # The manifest's parameters and system prompt apply; the request's options win.
    r = client.chat(model="terse", messages=[{"role": "user", "content": "Hi"}])
    assert r.eval_count == 3
    r = client.chat(model="terse:latest", messages=QUESTION, options={"num_predict": 5})
    assert r.eval_count == 5
    own_system = client.chat(
        model=MODEL,
        messages=[{"role": "system", "content": "You are terse."}, *QUESTION],
        options={"num_predict": 1},
    )
    assert client.chat(model="terse", messages=QUESTION).prompt_eval_count == (
        own_system.prompt_eval_count
    )
    assert client.copy("terse", "terse:copy").status == "success"
    assert {"terse:latest", "terse:copy"} <= {m.model for m in client.list().models}
    # Ollama clients may send a body without a JSON Content-Type (curl -X DELETE -d).
    r = http.request(
        "DELETE",
        "/api/delete",
        content=json.dumps({"model": "terse"}),
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert (r.status_code, r.content) == (200, b"")
    assert client.delete("terse:copy").status == "success"
    assert not {"terse:latest", "terse:copy"} & {m.model for m in client.list().models}


def test_create_refuses_what_corral_cannot_build(http):
    for extra in ({"quantize": "q4_K_M"}, {"adapters": {"a.gguf": "sha256:" + "0" * 64}}):
        r = http.post("/api/create", json={"model": "q", "from": MODEL, **extra})
        assert r.status_code == 400 and set(r.json()) == {"error"}
    r = http.post("/api/create", json={"model": "q", "from": "ghost:1"})
    assert r.status_code == 404


def test_pull_streams_progress_then_the_model_is_there(http, client):
    events = list(client.pull("library/pulled:q4", stream=True))
    assert events[0].status == "pulling manifest" and events[-1].status == "success"
    layer = [e for e in events if e.digest]
    assert layer and [e.completed for e in layer] == sorted(e.completed for e in layer)
    assert layer[-1].completed == layer[-1].total
    assert "library/pulled:q4" in {m.model for m in client.list().models}
    r = client.generate(model="library/pulled:q4", prompt="Hi", options={"num_predict": 1})
    assert r.eval_count == 1
    # Not streamed: just the last object.
    r = http.post("/api/pull", json={"name": "library/pulled:q4", "stream": False})
    assert r.json() == {"status": "success"}
    client.delete("library/pulled:q4")


def test_blobs_upload_check_fetch_and_range(http):
    data = b"GGUF" + bytes(range(256)) * 8
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert http.head(f"/api/blobs/{digest}").status_code == 404
    assert http.get(f"/api/blobs/{digest}").status_code == 404
    wrong = "sha256:" + hashlib.sha256(b"other").hexdigest()
    r = http.post(f"/api/blobs/{wrong}", content=data)
    assert r.status_code == 400 and "hash" in r.json()["error"]
    assert http.post(f"/api/blobs/{digest}", content=data).status_code == 201
    assert http.post(f"/api/blobs/{digest}", content=data).status_code == 200  # had it
    assert http.head(f"/api/blobs/{digest}").status_code == 200
    assert http.get(f"/api/blobs/{digest}").content == data
    part = http.get(f"/api/blobs/{digest}", headers={"Range": "bytes=4-9"})
    assert part.status_code == 206 and part.content == data[4:10]
    for bad in ("sha256-" + digest[7:], "sha256:xyz", "../../etc/passwd"):
        assert http.get(f"/api/blobs/{bad}").status_code in (400, 404)
    r = http.head("/api/blobs/sha256:XYZ")
    assert r.status_code == 400


def test_version(http):
    assert http.get("/api/version").json() == {"version": OLLAMA_VERSION}


# -- client mistakes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/api/chat", {"model": "ghost:7b", "messages": QUESTION}),
        ("POST", "/api/generate", {"model": "ghost:7b", "prompt": "Hi"}),
        ("POST", "/api/generate", {"model": "ghost:7b"}),
        ("POST", "/api/embed", {"model": "ghost:7b", "input": "x"}),
        ("POST", "/api/show", {"model": "ghost:7b"}),
        ("DELETE", "/api/delete", {"model": "ghost:7b"}),
        ("POST", "/api/copy", {"source": "ghost:7b", "destination": "x"}),
        ("POST", "/api/pull", {"model": "ghost:7b"}),
    ],
)
def test_an_unknown_model_is_404_naming_it(http, method, path, body):
    r = http.request(method, path, json=body)
    assert r.status_code == 404
    assert list(r.json()) == ["error"] and "ghost:7b" in r.json()["error"]


@pytest.mark.parametrize(
    ("path", "body", "words"),
    [
        ("/api/chat", {"model": "../../etc/passwd", "messages": QUESTION}, "model name"),
        ("/api/copy", {"source": MODEL, "destination": "a/b/c/d"}, "model name"),
        ("/api/chat", {"model": MODEL, "messages": QUESTION, "format": "yaml"}, "format"),
        ("/api/chat", {"model": MODEL, "messages": QUESTION, "options": {"top_k": "x"}}, "top_k"),
        ("/api/chat", {"model": MODEL, "messages": [{"role": "robot"}]}, "role"),
        ("/api/chat", {"model": MODEL, "messages": QUESTION, "tools": [{"x": 1}]}, "name"),
        ("/api/generate", {"model": MODEL, "prompt": "x", "images": ["aGk="]}, "image"),
        ("/api/generate", {"model": MODEL, "prompt": "x", "keep_alive": "soon"}, "keep_alive"),
        ("/api/generate", {"model": MODEL, "prompt": "w " * 2000}, "context length"),
        ("/api/embed", {"model": MODEL, "input": ["a", ""]}, "empty"),
        ("/api/create", {"model": "x", "modelfile": "FROM llama3"}, "modelfile"),
    ],
)
def test_client_mistakes_are_400_with_a_message_that_says_what_to_change(http, path, body, words):
    for stream in (False, True):
        r = http.post(path, json={**body, "stream": stream})
        assert r.status_code == 400, r.text
        assert list(r.json()) == ["error"] and words in r.json()["error"]


def test_bodies_that_are_not_json_objects(http):
    for raw in (b"{bad json", b"[1, 2]", b""):
        r = http.post("/api/chat", content=raw)
        assert r.status_code == 400 and list(r.json()) == ["error"], raw


def test_the_ollama_client_sees_ollamas_errors(client):
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="ghost:7b", messages=QUESTION)
    assert err.value.status_code == 404 and "ghost:7b" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        client.copy("../../etc/passwd", "x")
    assert err.value.status_code == 400
    with pytest.raises(ollama.ResponseError) as err:
        list(client.chat(model="fake:broken", messages=QUESTION, stream=True))
    assert err.value.error

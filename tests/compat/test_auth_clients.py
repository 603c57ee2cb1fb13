"""API keys on the running Corral (real Ray, real model) with the official clients.

Keys are made in the session server's state directory exactly as ``corral keys
create`` makes them; the ingress picks them up on the next request. The file
is removed at the end, which opens the API again for the other tests. The
route-by-route matrix is ``tests/unit/test_auth.py``; this checks what users
see: the ``openai`` and ``ollama`` clients' own exceptions, a real answer with a
good key, nodes still fetching model files, and no key in any log of the cluster.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from nodes.rayenv import node_api_key
from tests.support.keys import keys_on

MODEL = "smollm2:135m"
QUESTION = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "What is the capital of France?"},
]


@pytest.fixture(scope="module")
def keys(corral):
    with keys_on(corral) as file:
        made = {
            "good": file.create("admin")[1],
            "other": file.create("other-models", ["other:1"])[1],
            "revoked": file.create("old")[1],
        }
        file.revoke("old")
        yield made


def oai(corral, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{corral.url}/v1", api_key=key, max_retries=0, timeout=60)


def oll(corral, key: str | None) -> ollama.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return ollama.Client(host=corral.url, timeout=60, headers=headers)


def test_openai_client(corral, keys):
    for bad in ("not-a-key", keys["revoked"]):
        with pytest.raises(openai.AuthenticationError) as err:
            oai(corral, bad).chat.completions.create(model=MODEL, messages=QUESTION)
        assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    with pytest.raises(openai.PermissionDeniedError) as err:
        oai(corral, keys["other"]).chat.completions.create(model=MODEL, messages=QUESTION)
    assert f"may not use the model '{MODEL}'" in err.value.message
    assert MODEL not in {m.id for m in oai(corral, keys["other"]).models.list()}

    good = oai(corral, keys["good"])
    answer = good.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=24, temperature=0
    )
    assert "Paris" in answer.choices[0].message.content
    assert MODEL in {m.id for m in good.models.list()}


def test_ollama_client(corral, keys):
    for bad in (None, "not-a-key", keys["revoked"]):
        with pytest.raises(ollama.ResponseError) as err:
            oll(corral, bad).chat(model=MODEL, messages=QUESTION)
        assert err.value.status_code == 401
    with pytest.raises(ollama.ResponseError) as err:
        oll(corral, keys["other"]).generate(model=MODEL, prompt="Hi")
    assert err.value.status_code == 403 and "may not use the model" in err.value.error
    assert oll(corral, keys["other"]).list().models == []

    good = oll(corral, keys["good"])
    reply = good.chat(model=MODEL, messages=QUESTION, options={"temperature": 0, "num_predict": 24})
    assert "Paris" in reply.message.content
    assert MODEL in {m.model for m in good.list().models}


def test_the_health_check_stays_open(corral, keys):
    assert httpx.get(f"{corral.url}/").text == "Corral is running"


def test_nodes_still_fetch_model_files_with_keys_on(corral, keys):
    """The key a node derives from the Ray token gets past auth (404: no such blob)."""
    node_key = node_api_key()
    assert node_key, "the test process should run with the cluster's Ray token"
    url = f"{corral.url}/api/blobs/sha256:{'0' * 64}"
    assert httpx.head(url, headers={"Authorization": f"Bearer {node_key}"}).status_code == 404
    assert httpx.head(url).status_code == 401


def test_no_key_in_any_log_but_the_request_ids_are(corral, keys, homelab):
    wrong = "corral-wrong-key-that-must-not-be-logged"
    refused = httpx.get(f"{corral.url}/api/tags", headers={"Authorization": f"Bearer {wrong}"})
    assert refused.status_code == 401
    request_id = refused.headers["x-request-id"]
    logs = Path(homelab.cluster.head_node.get_session_dir_path()) / "logs"
    seen_id = False
    for _ in range(50):  # Ray writes worker logs asynchronously
        texts = [_read(p) for p in logs.rglob("*") if p.is_file()]
        seen_id = any(f"[req={request_id}]" in t for t in texts)
        if seen_id:
            break
        time.sleep(0.2)
    assert seen_id, "the refused request's id should be in the ingress's log"
    for text in texts:
        for key in (*keys.values(), wrong):
            assert key not in text


def _read(path: Path) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")
    return ""

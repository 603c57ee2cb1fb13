"""API keys over HTTP: every route, with no key, a wrong, revoked, limited and good key.

The real app (``build_api``) runs under uvicorn over ``LocalBackend`` with two
fake-engine models, ``fake:a`` and ``fake:b``; keys are made with the same
``KeyFile`` that ``corral keys`` uses, in a temporary state directory. The list
of requests is checked against the app's OpenAPI schema, so a new route cannot
escape the matrix. The real engine and the official clients with keys are in
``tests/integration/test_auth.py``.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Iterator

import httpx
import pytest

from deployments.api import build_api
from deployments.auth import Keyring, KeyScopedBackend, Unauthorized
from deployments.backend import ModelBackend
from deployments.keys import KeyFile, keys_path
from nodes.engine import EngineSpec
from nodes.rayenv import node_api_key
from tests.support.local_backend import LocalBackend
from tests.support.serve import serve_app

FAKE = {"token_delay": 0}
A, B = "fake:a", "fake:b"
BLOB = "sha256:" + hashlib.sha256(b"corral").hexdigest()
NODE_KEY = "corral-node-test-0123456789"

# One request per route (method, schema path) -> (method, path, JSON body), naming model A.
# Ordered so that the good key's copy makes the model its delete removes.
REQUESTS: dict[tuple[str, str], tuple[str, str, dict | None]] = {
    ("post", "/v1/chat/completions"): (
        "POST",
        "/v1/chat/completions",
        {"model": A, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    ),
    ("post", "/v1/completions"): (
        "POST",
        "/v1/completions",
        {"model": A, "prompt": "hi", "max_tokens": 4},
    ),
    ("post", "/v1/embeddings"): ("POST", "/v1/embeddings", {"model": A, "input": "hi"}),
    ("post", "/v1/responses"): (
        "POST",
        "/v1/responses",
        {"model": A, "input": "hi", "max_output_tokens": 4},
    ),
    ("post", "/v1/messages"): (
        "POST",
        "/v1/messages",
        {"model": A, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    ),
    ("post", "/v1/messages/count_tokens"): (
        "POST",
        "/v1/messages/count_tokens",
        {"model": A, "messages": [{"role": "user", "content": "hi"}]},
    ),
    ("get", "/v1/models"): ("GET", "/v1/models", None),
    ("get", "/v1/models/{model_id}"): ("GET", f"/v1/models/{A}", None),
    ("post", "/api/chat"): (
        "POST",
        "/api/chat",
        {"model": A, "messages": [{"role": "user", "content": "hi"}], "stream": False},
    ),
    ("post", "/api/generate"): (
        "POST",
        "/api/generate",
        {"model": A, "prompt": "hi", "stream": False, "options": {"num_predict": 4}},
    ),
    ("post", "/api/embed"): ("POST", "/api/embed", {"model": A, "input": "hi"}),
    ("post", "/api/embeddings"): ("POST", "/api/embeddings", {"model": A, "prompt": "hi"}),
    ("get", "/api/tags"): ("GET", "/api/tags", None),
    ("get", "/api/ps"): ("GET", "/api/ps", None),
    ("post", "/api/show"): ("POST", "/api/show", {"model": A}),
    ("get", "/api/version"): ("GET", "/api/version", None),
    ("post", "/api/pull"): (
        "POST",
        "/api/pull",
        {"model": "library/pulled:q4", "stream": False},
    ),
    ("post", "/api/create"): (
        "POST",
        "/api/create",
        {"model": "made:1", "from": A, "system": "Be brief.", "stream": False},
    ),
    ("post", "/api/copy"): ("POST", "/api/copy", {"source": A, "destination": "a-copy:1"}),
    ("delete", "/api/delete"): ("DELETE", "/api/delete", {"model": "a-copy:1"}),
    ("head", "/api/blobs/{digest}"): ("HEAD", f"/api/blobs/{BLOB}", None),
    ("get", "/api/blobs/{digest}"): ("GET", f"/api/blobs/{BLOB}", None),
    ("post", "/api/blobs/{digest}"): ("POST", f"/api/blobs/{BLOB}", None),
    ("get", "/api/cluster/nodes"): ("GET", "/api/cluster/nodes", None),
    ("get", "/api/cluster/placements"): ("GET", "/api/cluster/placements", None),
    ("get", "/api/cluster/events"): ("GET", "/api/cluster/events", None),
    ("get", "/api/cluster/stream"): ("GET", "/api/cluster/stream?limit=1", None),
    ("get", "/api/cluster/whoami"): ("GET", "/api/cluster/whoami", None),
    ("get", "/api/cluster/models-file"): ("GET", "/api/cluster/models-file", None),
    ("post", "/api/cluster/plan"): ("POST", "/api/cluster/plan", {"models_yaml": "models: []"}),
    ("post", "/api/cluster/apply"): ("POST", "/api/cluster/apply", {"models_yaml": "models: []"}),
    ("get", "/metrics"): ("GET", "/metrics", None),
}
# What a key limited to model B gets on each route when it asks about model A.
LISTS = {
    "/v1/models",
    "/api/tags",
    "/api/ps",
    "/api/cluster/placements",
    "/api/cluster/events",
    "/api/cluster/stream",
}
ANY_KEY = {"/api/version", "/metrics", "/api/cluster/whoami"}  # nothing model-specific
LIBRARY = {
    "/api/pull",
    "/api/create",
    "/api/copy",
    "/api/delete",
    "/api/cluster/nodes",
    "/api/cluster/models-file",
    "/api/cluster/plan",
    "/api/cluster/apply",
}


def blob_route(path: str) -> bool:
    return path.startswith("/api/blobs/")


@pytest.fixture(scope="module")
def backend(tmp_path_factory) -> LocalBackend:
    return LocalBackend(
        [
            EngineSpec(model=A, path="", engine="fake", options=FAKE),
            EngineSpec(model=B, path="", engine="fake", options=FAKE),
        ],
        registry={"library/pulled:q4": A},
        blob_dir=tmp_path_factory.mktemp("blobs"),
    )


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="module")
def keys(state) -> dict[str, str]:
    """The keys of the matrix: good (every model), b_only, and one revoked."""
    file = KeyFile(keys_path(state))
    made = {
        "good": file.create("admin")[1],
        "b_only": file.create("b-user", [B])[1],
        "revoked": file.create("old")[1],
    }
    file.revoke("old")
    return made


@pytest.fixture(scope="module")
def app(backend, state, keys):
    return build_api(backend, keyring=Keyring(keys_path(state), node_key=NODE_KEY))


@pytest.fixture(scope="module")
def http(app) -> Iterator[httpx.Client]:
    with serve_app(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


def send(http: httpx.Client, request, key: str | None = None, **headers) -> httpx.Response:
    method, path, body = request
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    content = b"corral" if method == "POST" and blob_route(path) else None
    return http.request(
        method, path, json=body if content is None else None, content=content, headers=headers
    )


def assert_error_shape(response: httpx.Response, path: str, status: int, words: str) -> None:
    assert response.status_code == status, (path, response.status_code, response.text)
    if response.request.method == "HEAD":
        return  # no body
    body = response.json()
    if path.startswith("/v1/messages"):  # Anthropic's shape
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
        message = body["error"]["message"]
        kind = "authentication_error" if status == 401 else "permission_error"
        assert body["error"]["type"] == kind and body["request_id"], body
    elif not path.startswith("/api/"):  # OpenAI's shape, the default outside Ollama's /api
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        message = body["error"]["message"]
        assert body["error"]["code"] == (
            "invalid_api_key" if status == 401 else "model_not_allowed"
        )
    else:
        assert list(body) == ["error"] and isinstance(body["error"], str), body
        message = body["error"]
    assert words.lower() in message.lower(), (path, message)


def test_the_matrix_covers_every_route_of_the_schema(app):
    routes = {
        (method, path)
        for path, item in app.openapi()["paths"].items()
        for method in item
        if path != "/"
    }
    assert routes == set(REQUESTS)


def test_the_health_check_docs_and_dashboard_page_stay_open(http):
    for path in ("/", "/docs", "/openapi.json", "/ui", "/ui/static/app.js"):
        assert http.get(path).status_code == 200, path
    assert http.head("/").status_code == 200
    # The open prefix holds the page's files and nothing else.
    for path in ("/ui/static/../../api/tags", "/ui/static/nothing.js", "/ui/other"):
        assert http.get(path).status_code in (401, 404), path


def test_the_key_scoped_backend_writes_out_every_backend_method():
    """A method ``ModelBackend`` gains must get its key check in ``KeyScopedBackend``:
    nothing is passed through to the real backend unless written out there."""
    wanted = {n for n in vars(ModelBackend) if not n.startswith("_")}
    written = {n for n in vars(KeyScopedBackend) if not n.startswith("_")}
    assert wanted - written == set()
    assert not hasattr(KeyScopedBackend, "__getattr__")


@pytest.mark.parametrize("route", list(REQUESTS), ids=" ".join)
def test_no_key_is_401_in_the_routes_shape(http, route):
    response = send(http, REQUESTS[route])
    assert_error_shape(response, route[1], 401, "needs an API key")
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("route", list(REQUESTS), ids=" ".join)
def test_a_wrong_key_is_401(http, route):
    assert_error_shape(send(http, REQUESTS[route], "corral-not-a-key"), route[1], 401, "not valid")


@pytest.mark.parametrize("route", list(REQUESTS), ids=" ".join)
def test_a_revoked_key_is_401(http, keys, route):
    response = send(http, REQUESTS[route], keys["revoked"])
    assert_error_shape(response, route[1], 401, "revoked")


@pytest.mark.parametrize("route", list(REQUESTS), ids=" ".join)
def test_a_key_limited_to_other_models(http, keys, route):
    path = route[1]
    response = send(http, REQUESTS[route], keys["b_only"])
    if path in LISTS:
        assert response.status_code == 200, response.text
        assert A not in response.text and "fake:a" not in response.text
    elif path in ANY_KEY:
        assert response.status_code == 200, response.text
    elif path in LIBRARY or blob_route(path):
        assert_error_shape(response, path, 403, "needs an unlimited key")
    else:
        assert_error_shape(response, path, 403, f"may not use the model '{A}'")


def test_a_limited_key_uses_and_sees_its_own_models(http, keys):
    key = keys["b_only"]
    chat = REQUESTS[("post", "/v1/chat/completions")][2] | {"model": B}
    response = send(http, ("POST", "/v1/chat/completions", chat), key)
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"]
    generate = REQUESTS[("post", "/api/generate")][2] | {"model": B}
    assert send(http, ("POST", "/api/generate", generate), key).json()["done"] is True
    listed = send(http, REQUESTS[("get", "/v1/models")], key).json()["data"]
    assert [m["id"] for m in listed] == [B]
    tags = send(http, REQUESTS[("get", "/api/tags")], key).json()["models"]
    assert [m["name"] for m in tags] == [B]


@pytest.mark.parametrize("route", list(REQUESTS), ids=" ".join)
def test_a_good_key_is_served(http, keys, route):
    response = send(http, REQUESTS[route], keys["good"])
    path = route[1]
    if blob_route(path) and route[0] != "post":
        assert response.status_code == 404  # served: the blob is just not there
    elif blob_route(path):
        assert response.status_code == 201, response.text
    else:
        assert response.status_code == 200, (path, response.text)
    if path == "/v1/models":
        assert {m["id"] for m in response.json()["data"]} >= {A, B}


def test_the_key_is_taken_from_x_api_key_as_anthropics_clients_send_it(http, keys):
    request = REQUESTS[("post", "/v1/messages")]
    response = send(http, request, **{"x-api-key": keys["good"]})
    assert response.status_code == 200, response.text
    response = send(http, request, **{"x-api-key": keys["revoked"]})
    assert_error_shape(response, "/v1/messages", 401, "revoked")
    limited = send(
        http, REQUESTS[("post", "/v1/chat/completions")], **{"x-api-key": keys["b_only"]}
    )
    assert_error_shape(limited, "/v1/chat/completions", 403, f"may not use the model '{A}'")


def test_a_key_is_read_from_the_file_on_the_next_request(backend, tmp_path):
    """No restart: the first key turns auth on, a revoke takes effect at once."""
    file = KeyFile(keys_path(tmp_path))
    with serve_app(build_api(backend, keyring=Keyring(keys_path(tmp_path)))) as url:
        assert httpx.get(f"{url}/v1/models").status_code == 200  # no keys: open
        _, key = file.create("first")
        assert httpx.get(f"{url}/v1/models").status_code == 401
        auth = {"Authorization": f"Bearer {key}"}
        assert httpx.get(f"{url}/v1/models", headers=auth).status_code == 200
        file.revoke("first")
        assert httpx.get(f"{url}/v1/models", headers=auth).status_code == 401
        assert httpx.get(f"{url}/v1/models").status_code == 401  # revoking all keeps it closed


def test_auth_required_before_any_key_exists(backend, tmp_path):
    keyring = Keyring(keys_path(tmp_path), required=True)
    with serve_app(build_api(backend, keyring=keyring)) as url:
        response = httpx.get(f"{url}/api/tags")
        assert response.status_code == 401 and "needs an API key" in response.json()["error"]
        assert httpx.get(f"{url}/").status_code == 200


def test_a_damaged_key_file_closes_the_api(backend, tmp_path, caplog):
    path = keys_path(tmp_path)
    path.write_text("{not json")
    with serve_app(build_api(backend, keyring=Keyring(path))) as url:
        response = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer x"})
    assert response.status_code == 401
    assert "key file is damaged" in response.json()["error"]["message"]


def test_the_nodes_key_reads_blobs_and_nothing_else(http):
    absent = "sha256:" + "0" * 64
    for method in ("GET", "HEAD"):
        request = (method, f"/api/blobs/{absent}", None)
        assert send(http, request, NODE_KEY).status_code == 404  # let in; no such blob
    for route in (("post", "/api/blobs/{digest}"), ("get", "/api/tags"), ("post", "/api/chat")):
        assert send(http, REQUESTS[route], NODE_KEY).status_code == 401, route


def test_the_node_key_is_derived_from_the_ray_token(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "a" * 64)
    first = node_api_key()
    monkeypatch.setenv("RAY_AUTH_TOKEN", "b" * 64)
    assert first and node_api_key() and node_api_key() != first
    assert "a" * 16 not in first


def test_keys_never_reach_the_logs(http, keys):
    """Good, wrong and revoked keys, at debug level (an access line per request)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("corral")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        wrong = "corral-wrong-key-that-must-not-be-logged"
        for key in (keys["good"], keys["revoked"], wrong, keys["b_only"]):
            send(http, REQUESTS[("post", "/api/chat")], key)
            send(http, REQUESTS[("get", "/v1/models/{model_id}")], key)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    logged = stream.getvalue()
    assert "refused POST /api/chat" in logged and "GET /v1/models/" in logged
    for key in (*keys.values(), wrong):
        assert key not in logged


def test_keyring_checks(tmp_path):
    path = keys_path(tmp_path)
    ring = Keyring(path)
    assert not ring.active
    file = KeyFile(path)
    record, key = file.create("x", ["m"])
    assert ring.active
    grant = ring.check(f"Bearer {key}")
    assert grant.key_id == record.id and grant.allows("m:latest") and not grant.allows("n")
    for header in ("", "Basic abc", "Bearer", f"bearer  {key}x", key):
        with pytest.raises(Unauthorized):
            ring.check(header)
    assert ring.check(f"bearer {key}").key_id == record.id  # the scheme is case-insensitive

"""Hostile input: every route of the OpenAPI schema fuzzed, and the garbage fuzzers miss.

The real app (``build_api``) runs under uvicorn over ``LocalBackend`` with two
fake-engine models, in this process (no Ray). Schemathesis generates requests
for every operation of the app's own schema: valid ones (``positive``, some
naming a model that exists so generation runs) and invalid ones (``negative``:
wrong types, missing fields) for every route with a body. Then hand-written
bodies cover what a generator rarely builds: JSON that is not an object,
every field of every body given every wrong type, JSON nested 10,000 levels
deep, numbers too big for any engine (``1e309``, ``2**80``), NUL bytes, lone
surrogates and names built to escape the model store.

Every response must hold to the API's contract:

* never a 5xx: garbage is the client's mistake;
* a 4xx in the route's error shape: OpenAI's
  ``{"error": {"message", "type", "param", "code"}}`` outside ``/api/``,
  Ollama's ``{"error": "..."}`` under it, Anthropic's
  ``{"type": "error", "error": {"type", "message"}}`` under ``/v1/messages``,
  with a message;
* a stream ends cleanly: SSE with ``data: [DONE]`` (or one error event);
  Anthropic's and the Responses API's named events ending with ``message_stop``
  or ``response.completed`` / ``response.incomplete`` (or their error events);
  NDJSON with its ``done`` (or ``success``) object (or one error line).

Deterministic (Hypothesis derandomized, no example database) and bounded: the
case counts below are fixed. The figures (cases per route and mode, statuses,
time) are printed when the module ends (``pytest -s``) and written to
``fuzz-summary.json`` in pytest's base temporary directory.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from deployments.api import build_api
from deployments.ollama import protocol as ollama_protocol
from nodes.engine import EngineSpec
from nodes.errors import CorralError
from nodes.models import check_name
from nodes.pull import local_name
from nodes.store import Store
from tests.support.local_backend import LocalBackend
from tests.support.serve import serve_app

A, B = "fake:a", "fake:b"
BROKEN = "fake:broken"  # its engine fails after two tokens: a stream that breaks midway
SEES = "fake:sees"  # takes images (its spec names a projector), so they are decoded
PULLABLE = "library/pulled:q4"
# Short replies keep streams well under schemathesis's event limit and the run fast.
FAKE = {"token_delay": 0, "reply_tokens": 4}
SPECS = [
    *(EngineSpec(model=m, path="", engine="fake", options=FAKE) for m in (A, B)),
    EngineSpec(model=BROKEN, path="", engine="fake", options={**FAKE, "fail_after": 2}),
    EngineSpec(model=SEES, path="", engine="fake", options=FAKE, projector="/mmproj.gguf"),
]

EXAMPLES = 50  # generated cases per operation and mode (one, for a route with no input)
MIN_CASES = 500  # what the whole fuzz must reach
TIMEOUT = 10  # seconds per request: a hang is a failure, not a slow test


def openapi_schema() -> dict:
    """The app's schema, with the body /api/delete reads by hand (it takes any Content-Type,
    so FastAPI does not declare it) so that it is fuzzed like the others."""
    schema = build_api(LocalBackend(SPECS)).openapi()
    body = ollama_protocol.ModelRequest.model_json_schema(by_alias=True)
    schema["paths"]["/api/delete"]["delete"]["requestBody"] = {
        "required": True,
        "content": {"application/json": {"schema": body}},
    }
    return schema


SCHEMA = openapi_schema()
OPERATIONS = [(m.upper(), path) for path, item in SCHEMA["paths"].items() for m in item]
# Negative cases need something to make invalid: a body (path parameters are any string).
FUZZ = [
    (method, path, mode)
    for method, path in OPERATIONS
    for mode in GenerationMode
    if mode is GenerationMode.POSITIVE or "requestBody" in SCHEMA["paths"][path][method.lower()]
]
# Fields (of the body, or path parameters) that valid cases sometimes set to a model that
# exists, so generation and the library routes run past "not found". Never for a route
# that deletes or overwrites.
KNOWN = {
    "/v1/chat/completions": {"model": [A, B]},
    "/v1/completions": {"model": [A, B]},
    "/v1/embeddings": {"model": [A, B]},
    "/v1/responses": {"model": [A, B]},
    "/v1/messages": {"model": [A, B]},
    "/v1/messages/count_tokens": {"model": [A, B]},
    "/api/chat": {"model": [A, B]},
    "/api/generate": {"model": [A, B]},
    "/api/embed": {"model": [A, B]},
    "/api/embeddings": {"model": [A, B]},
    "/api/show": {"model": [A, B]},
    "/api/pull": {"model": [PULLABLE]},
    "/api/create": {"from": [A, B]},
    "/api/copy": {"source": [A, B]},
    # path parameters
    "/v1/models/{model_id}": {"model_id": [A, B]},
    "/api/blobs/{digest}": {"digest": ["sha256:" + "0" * 64]},
}

# (group, route, mode) -> Counter of statuses; filled by the tests, reported at the end.
RESULTS: dict[tuple[str, str, str], Counter[int]] = {}
STREAMS: Counter[str] = Counter()  # streams read to their end, by how they ended


def record(group: str, route: str, mode: str, status: int) -> None:
    RESULTS.setdefault((group, route, mode), Counter())[status] += 1


@pytest.fixture(scope="module", autouse=True)
def summary(tmp_path_factory) -> Iterator[None]:
    """Print and save how many cases ran and how they ended, once the module is done."""
    started = time.monotonic()
    yield
    seconds = round(time.monotonic() - started, 1)
    groups: dict[str, Counter[int]] = {}
    for (group, _, _), statuses in RESULTS.items():
        groups.setdefault(group, Counter()).update(statuses)
    report = {
        "seconds": seconds,
        "cases": {group: sum(c.values()) for group, c in groups.items()},
        "statuses": {group: dict(sorted(c.items())) for group, c in groups.items()},
        "streams": dict(sorted(STREAMS.items())),
        "by_route": {
            f"{group} {route} {mode}".strip(): dict(sorted(c.items()))
            for (group, route, mode), c in sorted(RESULTS.items())
        },
    }
    path = tmp_path_factory.getbasetemp() / "fuzz-summary.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"\nfuzz summary ({path}):")
    for group, statuses in groups.items():
        total = sum(statuses.values())
        print(f"  {group}: {total} cases, statuses {dict(sorted(statuses.items()))}")
    print(f"  streams read to the end: {dict(sorted(STREAMS.items()))}")
    print(f"  {seconds} s")


@pytest.fixture(scope="module")
def backend(tmp_path_factory) -> LocalBackend:
    return LocalBackend(SPECS, registry={PULLABLE: A}, blob_dir=tmp_path_factory.mktemp("blobs"))


@pytest.fixture(scope="module")
def url(backend) -> Iterator[str]:
    with serve_app(build_api(backend)) as base:
        yield base


@pytest.fixture(scope="module")
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


@pytest.fixture(scope="module")
def schema():
    loaded = schemathesis.openapi.from_dict(SCHEMA)
    loaded.config.max_stream_events = 10_000  # read every stream to its end
    return loaded


# -- the contract every response keeps -------------------------------------------------------


def check(method: str, url: str, status: int, headers, content: bytes) -> None:
    """Assert the response keeps the API's contract (see the module docstring)."""
    path = urlsplit(url).path
    where = f"{method} {path} -> {status}: {content[:500]!r}"
    assert status < 500, where
    if 400 <= status < 500 and method != "HEAD":
        body = json.loads(content)
        if path.startswith("/api/"):
            assert list(body) == ["error"], where
            assert isinstance(body["error"], str) and body["error"], where
        elif path.startswith("/v1/messages"):
            check_anthropic_error(body, where)
        else:
            assert list(body) == ["error"], where
            error = body["error"]
            assert set(error) == {"message", "type", "param", "code"}, where
            assert isinstance(error["message"], str) and error["message"], where
            assert isinstance(error["type"], str) and error["type"], where
            assert error["param"] is None or isinstance(error["param"], str), where
            assert error["code"] is None or isinstance(error["code"], str), where
    if status != 200 or method == "HEAD":
        return
    kind = (headers.get("content-type") or "").split(";")[0].strip()
    if kind == "text/event-stream":
        check_sse(content, where)
    elif kind == "application/x-ndjson":
        check_ndjson(content, where)
    elif kind == "application/json":
        json.loads(content)


def check_anthropic_error(body: dict, where: str) -> None:
    assert body["type"] == "error" and set(body) <= {"type", "error", "request_id"}, where
    assert set(body["error"]) == {"type", "message"}, where
    assert isinstance(body["error"]["type"], str) and body["error"]["type"], where
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], where


# How a stream of named events ends: its last event, by API.
# The dashboard's stream never ends by itself; read with a limit, it ends after a snapshot.
NAMED_ENDS = {"message_stop", "response.completed", "response.incomplete", "snapshot"}
NAMED_FAILURES = {"error", "response.failed"}


def check_named_sse(events: list[str], where: str) -> None:
    """Anthropic's or the Responses API's stream: ``event: <type>`` and its JSON, each
    event's type its name; the last one ends the answer, or the stream failed."""
    parsed = []
    for event in events:
        name, _, data = event.partition("\n")
        assert name.startswith("event: ") and data.startswith("data: "), where
        body = json.loads(data.removeprefix("data: "))
        assert body["type"] == name.removeprefix("event: "), where
        parsed.append(body)
    kinds = [body["type"] for body in parsed]
    errors = [k for k in kinds if k in NAMED_FAILURES]
    if not errors:
        assert kinds[-1] in NAMED_ENDS, where
        STREAMS["named SSE, " + kinds[-1]] += 1
        return
    assert kinds.count("error") == 1, where
    error = parsed[kinds.index("error")]
    if "sequence_number" in error:  # the Responses API: then response.failed ends it
        assert isinstance(error["message"], str) and kinds[-2:] == ["error", "response.failed"]
    else:
        check_anthropic_error(error, where)
        assert kinds[-1] == "error", where
    STREAMS["named SSE, error event"] += 1


def check_sse(content: bytes, where: str) -> None:
    """An OpenAI stream: JSON chunks, then ``[DONE]`` or one error event, then the end."""
    text = content.decode()
    assert text.endswith("\n\n"), f"stream cut short: {where}"
    events = text[:-2].split("\n\n")
    if events[0].startswith("event: "):
        check_named_sse(events, where)
        return
    assert all(e.startswith("data: ") for e in events), where
    *chunks, last = (e.removeprefix("data: ") for e in events)
    for chunk in chunks:
        assert "error" not in json.loads(chunk), f"error before the end: {where}"
    if last != "[DONE]":
        error = json.loads(last)["error"]
        assert set(error) == {"message", "type", "param", "code"}, where
    STREAMS["SSE, " + ("[DONE]" if last == "[DONE]" else "error event")] += 1


def check_ndjson(content: bytes, where: str) -> None:
    """An Ollama stream: one object a line, ending with done/success or one error line."""
    text = content.decode()
    assert text.endswith("\n"), f"stream cut short: {where}"
    *lines, last = (json.loads(line) for line in text.splitlines())
    for line in lines:
        assert "error" not in line and not line.get("done"), where
    if "error" in last:
        assert list(last) == ["error"] and isinstance(last["error"], str), where
    else:
        assert last.get("done") is True or last.get("status") == "success", where
    STREAMS["NDJSON, " + ("error line" if "error" in last else "done")] += 1


def send(http: requests.Session, url: str, method: str, path: str, body: bytes | None):
    response = http.request(method, url + path, data=body, timeout=TIMEOUT)
    check(method, response.url, response.status_code, response.headers, response.content)
    return response


# -- generated cases ----------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "mode"), FUZZ, ids=lambda v: str(v))
def test_fuzz(schema, url, http, method, path, mode):
    operation = schema[path][method]
    known = KNOWN.get(path, {}) if mode is GenerationMode.POSITIVE else {}
    choices = st.sampled_from([None, *[(k, v) for k, vs in known.items() for v in vs]])
    has_input = any(True for _ in operation.iter_parameters()) or operation.body

    @settings(
        max_examples=EXAMPLES if has_input else 1,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(mode), known=choices)
    def run(case, known):
        if known is not None and known[0] in (case.path_parameters or {}):
            case.path_parameters[known[0]] = known[1]
        elif known is not None and isinstance(case.body, dict):
            case.body[known[0]] = known[1]
        if path == "/api/cluster/stream":  # open until its client leaves: read one snapshot
            case.query = {**(case.query or {}), "limit": 1}
        response = case.call(base_url=url, session=http, timeout=TIMEOUT)
        record("generated", f"{method} {path}", mode.value, response.status_code)
        assert not response.stream_cut_short, case.as_curl_command()
        try:
            check(
                method,
                response.request.url,
                response.status_code,
                {k: ", ".join(v) for k, v in response.headers.items()},
                response.content,
            )
        except AssertionError as exc:
            exc.add_note(f"reproduce with: {case.as_curl_command()}")
            raise

    run()


# -- hand-written bodies -------------------------------------------------------------------------

# A valid body for every route that takes one (model A, short answers, no stream).
BODIES: dict[tuple[str, str], dict] = {
    ("POST", "/v1/chat/completions"): {
        "model": A,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
    },
    ("POST", "/v1/completions"): {"model": A, "prompt": "hi", "max_tokens": 4},
    ("POST", "/v1/embeddings"): {"model": A, "input": "hi"},
    ("POST", "/v1/responses"): {"model": A, "input": "hi", "max_output_tokens": 4},
    ("POST", "/v1/messages"): {
        "model": A,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
    },
    ("POST", "/v1/messages/count_tokens"): {
        "model": A,
        "messages": [{"role": "user", "content": "hi"}],
    },
    ("POST", "/api/chat"): {
        "model": A,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": False,
        "options": {"num_predict": 4},
    },
    ("POST", "/api/generate"): {
        "model": A,
        "prompt": "hi",
        "stream": False,
        "options": {"num_predict": 4},
    },
    ("POST", "/api/embed"): {"model": A, "input": "hi"},
    ("POST", "/api/embeddings"): {"model": A, "prompt": "hi"},
    ("POST", "/api/show"): {"model": A},
    ("POST", "/api/pull"): {"model": PULLABLE, "stream": False},
    ("POST", "/api/create"): {"model": "made:1", "from": A, "stream": False},
    ("POST", "/api/copy"): {"source": A, "destination": "copied:1"},
    ("DELETE", "/api/delete"): {"model": "no-such-model:1"},
}
ROUTES = list(BODIES)

NOT_OBJECTS = [b"[]", b'[{"model": "fake:a"}]', b"1", b"-1.5e3", b'"fake:a"', b"null", b"true"]
NOT_JSON = [b"", b"{", b'{"model": "fake:a"} trailing', b"\xff\xfe\x00", b"{'model': 1}", b"NaN"]
# One value of every JSON type, and the edges of each.
WRONG = [None, True, False, 0, -1, 1.5, 2**80, -(2**80), "", "x", "\x00", [], [None], {}, {"": 1}]


def body_fields(method: str, path: str) -> list[str]:
    """The top-level fields of the route's request body, as its schema declares them."""
    op = SCHEMA["paths"][path][method.lower()]
    body = op["requestBody"]["content"]["application/json"]["schema"]
    if "$ref" in body:
        body = SCHEMA["components"]["schemas"][body["$ref"].rsplit("/", 1)[-1]]
    return sorted(body["properties"])


def raw(body: dict, **replace: str) -> bytes:
    """``body`` as JSON with some values written as raw JSON text (1e309, NaN, deep nests)."""
    text = json.dumps({**body, **{k: f"@@{k}@@" for k in replace}})
    for key, value in replace.items():
        text = text.replace(json.dumps(f"@@{key}@@"), value)
    return text.encode()


def routes_ids(route: tuple[str, str]) -> str:
    return " ".join(route)


STREAMING = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/messages",
    "/api/chat",
    "/api/generate",
]
NAMED_EVENTS = {"/v1/responses", "/v1/messages"}  # SSE with named events, no [DONE]


def test_the_valid_bodies_succeed(url, http):
    """The bases the hand-written cases alter are good requests, streamed or not."""
    for method, path in ROUTES:
        response = send(http, url, method, path, json.dumps(BODIES[method, path]).encode())
        record("hand-written", "valid bodies", "", response.status_code)
        expected = 404 if path == "/api/delete" else 200
        assert response.status_code == expected, (path, response.text)
    for path in [*STREAMING, "/api/pull", "/api/create"]:
        body = {**BODIES["POST", path], "stream": True}
        if path.startswith("/v1/"):
            body["stream_options"] = {"include_usage": True}
        response = send(http, url, "POST", path, json.dumps(body).encode())
        record("hand-written", "valid bodies", "", response.status_code)
        assert response.status_code == 200, (path, response.text)
        kind = response.headers["content-type"]
        assert kind.startswith(("text/event-stream", "application/x-ndjson")), (path, kind)


@pytest.mark.parametrize("path", STREAMING)
def test_a_stream_that_breaks_midway_ends_with_one_error(url, http, path):
    """The engine fails after the stream began: one error event in the API's shape, the end."""
    body = {**BODIES["POST", path], "model": BROKEN, "stream": True}
    response = send(http, url, "POST", path, json.dumps(body).encode())
    record("hand-written", "broken streams", "", response.status_code)
    assert response.status_code == 200
    text = response.text
    if path in NAMED_EVENTS:  # check() has checked the events' order and shapes
        assert text.count("event: error\n") == 1, text
        return
    last = text.rstrip("\n").rsplit("\n", 1)[-1].removeprefix("data: ")
    assert "error" in json.loads(last), text  # check() has checked its shape
    assert text.count('{"error"') == 1, text


@pytest.mark.parametrize("route", ROUTES, ids=routes_ids)
def test_a_body_that_is_not_a_json_object_is_400(url, http, route):
    method, path = route
    for body in NOT_OBJECTS + NOT_JSON:
        response = send(http, url, method, path, body)
        record("hand-written", "not an object", "", response.status_code)
        assert response.status_code == 400, (body, response.text)
        if body in NOT_OBJECTS:
            assert "JSON object" in response.text, (body, response.text)


@pytest.mark.parametrize("route", ROUTES, ids=routes_ids)
def test_every_field_with_every_wrong_type(url, http, route):
    """No 5xx, whatever type any field of the body holds (some values are valid: 200)."""
    method, path = route
    base = BODIES[route]
    for field in body_fields(method, path):
        for value in WRONG:
            body = json.dumps({**base, field: value}).encode()
            response = send(http, url, method, path, body)
            record("hand-written", "wrong types", "", response.status_code)


TOOL = {
    "type": "function",
    "function": {
        "name": "f",
        "description": "d",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "string"}},
            "required": ["a"],
        },
    },
}
CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": "x"}'}}


def tool_bodies(base: dict, value: object) -> list[dict]:
    """``value`` put in every place of a tool definition, a tool call and a tool turn."""
    fn = TOOL["function"]
    params = fn["parameters"]
    turn = [{"role": "user", "content": "hi"}]
    return [
        {**base, "tools": value},
        {**base, "tools": [value]},
        {**base, "tools": [{**TOOL, "type": value}]},
        {**base, "tools": [{"type": "function", "function": value}]},
        *(
            {**base, "tools": [{"type": "function", "function": {**fn, key: value}}]}
            for key in ("name", "description", "parameters")
        ),
        *(
            {
                **base,
                "tools": [
                    {"type": "function", "function": {**fn, "parameters": {**params, key: value}}}
                ],
            }
            for key in ("type", "properties", "required")
        ),
        {**base, "tools": [TOOL], "tool_choice": value},
        {**base, "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": value}}},
        {**base, "tools": [TOOL], "tool_choice": "required", "parallel_tool_calls": value},
        {**base, "messages": [*turn, {"role": "assistant", "content": "", "tool_calls": value}]},
        {**base, "messages": [*turn, {"role": "assistant", "content": "", "tool_calls": [value]}]},
        {
            **base,
            "messages": [
                *turn,
                {
                    "role": "assistant",
                    "tool_calls": [{**CALL, "function": {"name": "f", "arguments": value}}],
                },
            ],
        },
        {
            **base,
            "messages": [
                *turn,
                {
                    "role": "assistant",
                    "tool_calls": [CALL],
                    "thinking": value,
                    "reasoning_content": value,
                },
                {
                    "role": "tool",
                    "content": "ok",
                    "tool_call_id": value,
                    "tool_name": value,
                    "name": value,
                },
            ],
        },
        {**base, "think": value, "reasoning_effort": value},
    ]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/chat"])
def test_tools_and_tool_turns_with_every_wrong_type(url, http, path):
    """Tools, tool calls, tool turns and thinking: no 5xx, whatever any of their fields holds."""
    base = BODIES["POST", path]
    deep = json.loads(nested_objects(50))
    for value in [*WRONG, deep, {"type": "object", "properties": {"a": {"$ref": "#/x"}}}]:
        for body in tool_bodies(base, value):
            for stream in (False, True):
                response = send(
                    http, url, "POST", path, json.dumps({**body, "stream": stream}).encode()
                )
                record("hand-written", "tool fields", "", response.status_code)


PIXEL = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGNgYGAAAAAEAAH2FzhVAAAAAElFTkSuQmCC"
)
IMAGE_VALUES = [
    f"data:image/png;base64,{PIXEL}",
    PIXEL,
    "https://example.com/cat.png",
    "data:image/png;base64,%%%",
    "data:text/plain;base64,aGk=",
    "data:image/png,raw",
    "data:;base64," + "A" * 10_001,
    "\x00",
]


def image_bodies(path: str, model: str, value: object) -> list[dict]:
    """``value`` in every place an image goes, on the chat route ``path``."""
    base = {**BODIES["POST", path], "model": model}
    if path == "/api/generate":
        return [
            {**base, "images": value},
            {**base, "images": [value]},
            {**base, "images": [value] * 3, "raw": True},
        ]
    if path == "/api/chat":
        turn = {"role": "user", "content": "hi"}
        return [
            {**base, "messages": [{**turn, "images": value}]},
            {**base, "messages": [{**turn, "images": [value, value]}]},
        ]
    turn = {"role": "user", "content": [{"type": "text", "text": "hi"}]}
    return [
        {**base, "messages": [{"role": "user", "content": [value]}]},
        {
            **base,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": value}]}],
        },
        {
            **base,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        *turn["content"],
                        {"type": "image_url", "image_url": {"url": value, "detail": value}},
                    ],
                }
            ],
        },
    ]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/chat", "/api/generate"])
def test_images_with_every_wrong_type_and_value(url, http, path):
    """Image parts and Ollama's images: no 5xx, for a model that takes images or not,
    whatever they hold (a good image: 200; a remote URL, bad base64: 400)."""
    for model in (A, SEES):
        for value in [*WRONG, *IMAGE_VALUES]:
            for body in image_bodies(path, model, value):
                for stream in (False, True):
                    data = json.dumps({**body, "stream": stream}).encode()
                    response = send(http, url, "POST", path, data)
                    record("hand-written", "image fields", "", response.status_code)
    good = image_bodies(
        path, SEES, f"data:image/png;base64,{PIXEL}" if path.startswith("/v1") else PIXEL
    )
    body = good[2] if path.startswith("/v1") else good[1]
    response = send(http, url, "POST", path, json.dumps(body).encode())
    assert response.status_code == 200, response.text
    response = send(http, url, "POST", path, json.dumps({**body, "model": A}).encode())
    assert response.status_code == 400 and "takes text only" in response.text, response.text


def anthropic_bodies(value: object) -> list[dict]:
    """``value`` in every place of a Messages body: blocks, tools, thinking, images."""
    base = BODIES["POST", "/v1/messages"]
    image = {"type": "base64", "media_type": "image/png", "data": PIXEL}
    use = {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": "x"}}
    result = {"type": "tool_result", "tool_use_id": "t1", "content": "ok"}
    tool = {"name": "f", "description": "d", "input_schema": TOOL["function"]["parameters"]}

    def turns(*blocks: dict) -> list[dict]:
        return [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [use]},
            {"role": "user", "content": list(blocks)},
        ]

    return [
        {**base, "system": value},
        {**base, "system": [{"type": "text", "text": value}]},
        {**base, "messages": [{"role": "user", "content": value}]},
        {**base, "messages": [{"role": "user", "content": [value]}]},
        {**base, "messages": [{"role": "user", "content": [{"type": "image", "source": value}]}]},
        *(
            {
                **base,
                "messages": [
                    {"role": "user", "content": [{"type": "image", "source": {**image, k: value}}]}
                ],
            }
            for k in ("type", "media_type", "data", "url")
        ),
        *({**base, "messages": turns({**result, k: value})} for k in result),
        {**base, "messages": turns({**result, "content": [value]})},
        *(
            {
                **base,
                "messages": [turns()[0], {"role": "assistant", "content": [{**use, k: value}]}],
            }
            for k in use
        ),
        {**base, "tools": value},
        {**base, "tools": [value]},
        *({**base, "tools": [{**tool, k: value}]} for k in (*tool, "type")),
        {**base, "tools": [tool], "tool_choice": value},
        {**base, "tools": [tool], "tool_choice": {"type": "tool", "name": value}},
        {**base, "tools": [tool], "tool_choice": {"type": value}},
        {**base, "thinking": value},
        {**base, "thinking": {"type": "enabled", "budget_tokens": value}},
        {**base, "output_config": {"effort": value}},
        {**base, "stop_sequences": [value]},
    ]


def responses_bodies(value: object) -> list[dict]:
    """``value`` in every place of a Responses body: items, parts, tools, formats."""
    base = BODIES["POST", "/v1/responses"]
    call = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"a": "x"}'}
    output = {"type": "function_call_output", "call_id": "c1", "output": "ok"}
    tool = {"type": "function", **TOOL["function"]}
    image = {"type": "input_image", "image_url": f"data:image/png;base64,{PIXEL}"}
    return [
        {**base, "input": [value]},
        {**base, "input": [{"role": "user", "content": value}]},
        {**base, "input": [{"role": "user", "content": [value]}]},
        {**base, "input": [{"role": value, "content": "hi"}]},
        *({**base, "input": [{"role": "user", "content": [{**image, k: value}]}]} for k in image),
        *({**base, "input": [{**call, k: value}, output]} for k in call),
        *({**base, "input": [call, {**output, k: value}]} for k in output),
        {**base, "input": [{"type": "reasoning", "summary": value, "content": value}]},
        {**base, "tools": [value]},
        *({**base, "tools": [{**tool, k: value}]} for k in tool),
        {**base, "tools": [tool], "tool_choice": value},
        {**base, "tools": [tool], "tool_choice": {"type": "function", "name": value}},
        {**base, "text": {"format": value}},
        {**base, "text": {"format": {"type": "json_schema", "name": "x", "schema": value}}},
        {**base, "reasoning": {"effort": value}},
        {**base, "previous_response_id": value, "store": value},
    ]


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/responses"])
def test_blocks_and_items_with_every_wrong_type(url, http, path):
    """Anthropic's content blocks and the Responses API's input items: no 5xx, whatever any
    of their fields holds, for a model that takes images or not, streamed or not."""
    make = anthropic_bodies if path == "/v1/messages" else responses_bodies
    deep = json.loads(nested_objects(50))
    for value in [*WRONG, deep, IMAGE_VALUES[0], IMAGE_VALUES[2]]:
        for body in make(value):
            for model, stream in ((A, False), (SEES, True)):
                data = json.dumps({**body, "model": model, "stream": stream}).encode()
                response = send(http, url, "POST", path, data)
                record("hand-written", "blocks and items", "", response.status_code)


SAMPLING_OPTIONS = [
    "num_ctx",
    "num_predict",
    "seed",
    "top_k",
    "temperature",
    "top_p",
    "min_p",
    "repeat_penalty",
    "presence_penalty",
    "frequency_penalty",
    "stop",
    "num_gpu",
    "mirostat",
]


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate", "/api/create"])
def test_every_option_with_every_wrong_type(url, http, path):
    """Ollama's options (and /api/create's parameters) are a free-form map: each is typed."""
    base = BODIES["POST", path]
    key = "parameters" if path == "/api/create" else "options"
    for option in SAMPLING_OPTIONS:
        for value in WRONG:
            body = json.dumps({**base, key: {option: value}}).encode()
            response = send(http, url, "POST", path, body)
            record("hand-written", "wrong option types", "", response.status_code)


DEPTH = 10_000


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def nested_objects(depth: int) -> str:
    return '{"a":' * depth + "{}" + "}" * depth


@pytest.mark.parametrize("route", ROUTES, ids=routes_ids)
def test_json_nested_10000_deep_is_400(url, http, route):
    method, path = route
    base = BODIES[route]
    field = "model" if "model" in base else "source"
    bodies = [
        nested(DEPTH).encode(),
        nested_objects(DEPTH).encode(),
        raw(base, **{field: nested(DEPTH)}),
        raw(base, extra=nested_objects(DEPTH)),
    ]
    for body in bodies:
        response = send(http, url, method, path, body)
        record("hand-written", "nested 10000 deep", "", response.status_code)
        assert response.status_code == 400, response.text
        if body.startswith(b"[") or body.startswith(b'{"a"'):  # the parser gives up
            assert "nests too deeply" in response.text or "recursion limit" in response.text
    # ... and the server is still there
    response = send(http, url, "GET", "/api/version", None)
    assert response.status_code == 200


@pytest.mark.parametrize("depth", [50, 500])
def test_deep_json_where_a_free_form_object_is_allowed(url, http, depth):
    """Schemas and options are JSON objects of any shape: deep ones must not break the server."""
    deep = nested_objects(depth)
    cases = [
        (
            "/v1/chat/completions",
            {
                "response_format": '{"type": "json_schema", "json_schema": '
                f'{{"name": "x", "schema": {deep}}}}}'
            },
        ),
        ("/v1/chat/completions", {"tools": f"[{deep}]"}),
        ("/api/chat", {"format": deep}),
        ("/api/generate", {"format": deep, "options": deep}),
        ("/api/create", {"parameters": deep}),
    ]
    for path, replace in cases:
        response = send(http, url, "POST", path, raw(BODIES["POST", path], **replace))
        record("hand-written", "deep free-form objects", "", response.status_code)


NOT_FINITE = ["1e309", "-1e309", "NaN", "Infinity", "-Infinity"]
HUGE = [*NOT_FINITE, "1e300", str(10**400), "9" * 5000]
BIG = [str(2**80), str(-(2**80))]  # integers, but beyond 64 bits
# Counts that only cap something (a reply, the context, the candidates): a huge one is
# clamped, whatever its size.
INTEGERS = {"max_tokens", "max_completion_tokens", "num_ctx", "num_predict", "top_k"}


def test_huge_numbers_are_clamped_or_refused(url, http):
    """A count too big for any context is clamped to the context (200); a number no sampler
    can take (not finite, beyond a float32, a seed beyond 64 bits) is a 400 naming it."""
    openai = [
        ("/v1/chat/completions", f)
        for f in (
            "max_tokens",
            "max_completion_tokens",
            "temperature",
            "top_p",
            "seed",
            "top_k",
            "repeat_penalty",
            "presence_penalty",
        )
    ] + [("/v1/completions", f) for f in ("max_tokens", "temperature", "seed", "min_p")]
    ollama = [
        (path, option)
        for path in ("/api/chat", "/api/generate")
        for option in (
            "num_ctx",
            "num_predict",
            "temperature",
            "seed",
            "top_k",
            "top_p",
            "min_p",
            "repeat_penalty",
            "frequency_penalty",
        )
    ]
    for path, field in openai + ollama:
        base = BODIES["POST", path]
        for number in HUGE + BIG:
            if path.startswith("/api/"):
                body = raw(base, options=f'{{"{field}": {number}}}')
            else:
                body = raw(base, **{field: number})
            response = send(http, url, "POST", path, body)
            record("hand-written", "huge numbers", "", response.status_code)
            where = (path, field, number[:20], response.text)
            if number == "9" * 5000:  # more digits than Python reads: the body is refused
                assert response.status_code == 400, where
            elif number in BIG[:1] + [str(10**400)] and field in INTEGERS:
                assert response.status_code == 200, where
            elif (
                number in NOT_FINITE
                or number == str(10**400)
                or (number == "1e300" and field not in INTEGERS)
                or (number == str(2**80) and field == "seed")
            ):
                assert response.status_code == 400, where
                assert field in response.text, where
            else:  # a sampler may take it (a huge temperature, Ollama's negative seed) or not
                assert response.status_code in (200, 400), where
                if response.status_code == 400:
                    assert field in response.text, where


# Names built to leave the store's directory, or to be something no file system takes.
ESCAPING = [
    "../../etc/passwd",
    "../../../../../../etc/shadow",
    "/etc/passwd",
    "/",
    "a/../../b",
    "library/../../../tmp/x:latest",
    "..",
    "./fake:a",
    "~/.ssh/id_rsa",
    "~root/x",
    "C:\\Windows\\System32\\config",
    "..\\..\\windows",
    "%2e%2e%2fetc%2fpasswd",
    "fake:a/../fake:b",
    "fake:../../x",
    "host:99/../../x:1",
    "file:///etc/passwd",
]
WEIRD = [
    "fake:a\x00",
    "\x00",
    "fake\x00:a",
    "\u043c\u043e\u0434\u0435\u043b\u044c:1",  # Cyrillic
    "\U0001f999:latest",
    "\u202efake:a",  # right-to-left override
    "fake:a\u200b",  # zero-width space
    "a" * 10_000,
    "",
    " ",
    "\t\n",
]
SURROGATE = '"fake\\ud800:a"'  # a lone UTF-16 surrogate: valid JSON, not valid Unicode
NAMED = {
    ("POST", "/v1/chat/completions"): ["model"],
    ("POST", "/v1/completions"): ["model"],
    ("POST", "/v1/embeddings"): ["model"],
    ("POST", "/api/chat"): ["model"],
    ("POST", "/api/generate"): ["model"],
    ("POST", "/api/embed"): ["model"],
    ("POST", "/api/embeddings"): ["model"],
    ("POST", "/api/show"): ["model"],
    ("POST", "/api/pull"): ["model"],
    ("POST", "/api/create"): ["model", "from"],
    ("POST", "/api/copy"): ["source", "destination"],
    ("DELETE", "/api/delete"): ["model"],
}


@pytest.mark.parametrize("route", list(NAMED), ids=routes_ids)
def test_hostile_model_names_are_refused(url, http, backend, route):
    method, path = route
    library = set(backend.models)
    for field in NAMED[route]:
        base = BODIES[route]
        bodies = [json.dumps({**base, field: name}).encode() for name in ESCAPING + WEIRD]
        bodies.append(raw(base, **{field: SURROGATE}))
        for body in bodies:
            response = send(http, url, method, path, body)
            record("hand-written", "hostile names", "", response.status_code)
            assert response.status_code in (400, 404), (body[:200], response.text)
    assert set(backend.models) == library  # nothing was pulled, created or copied


M = "@@surrogate@@"  # where the lone surrogate goes
# Free text of every body, where a lone surrogate would reach an engine or a file:
# (fields to set, the param the 400 names).
TEXTS = {
    ("POST", "/v1/chat/completions"): [
        ({"messages": [{"role": "user", "content": M}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": M}]}]}, None),
        ({"stop": M}, "stop"),
        ({"stop": ["x", M]}, "stop.1"),
        ({"user": M}, "user"),
    ],
    ("POST", "/v1/completions"): [({"prompt": M}, "prompt"), ({"prompt": [M]}, "prompt.0")],
    ("POST", "/v1/embeddings"): [({"input": M}, "input"), ({"input": ["ok", M]}, "input.1")],
    ("POST", "/api/chat"): [
        ({"messages": [{"role": "user", "content": M}]}, "messages.0.content"),
        ({"options": {"stop": [M]}}, "options.stop.0"),
        ({"format": M}, "format"),
        ({"keep_alive": M}, "keep_alive"),
    ],
    ("POST", "/api/generate"): [
        ({"prompt": M}, "prompt"),
        ({"system": M}, "system"),
        ({"options": {M: 1}}, None),  # in a key
    ],
    ("POST", "/api/embed"): [({"input": M}, "input"), ({"input": ["ok", M]}, "input.1")],
    ("POST", "/api/embeddings"): [({"prompt": M}, "prompt")],
    ("POST", "/api/create"): [
        ({"system": M}, "system"),
        ({"license": ["ok", M]}, "license.1"),
        ({"parameters": {"stop": M}}, "parameters.stop"),
    ],
    ("POST", "/api/pull"): [({"extra": M}, "extra")],
}


@pytest.mark.parametrize("route", list(TEXTS), ids=routes_ids)
def test_a_lone_surrogate_in_any_text_is_400(url, http, route):
    """JSON may escape half a UTF-16 pair; no engine can encode it: a 400 naming the field."""
    method, path = route
    for fields, param in TEXTS[route]:
        text = json.dumps({**BODIES[route], **fields}).replace(M, "bad \\udc00 text")
        response = send(http, url, method, path, text.encode())
        record("hand-written", "lone surrogates", "", response.status_code)
        assert response.status_code == 400, (fields, response.text)
        assert "surrogate" in response.text, (fields, response.text)
        if param is not None:
            assert f"'{param}'" in response.text, (fields, response.text)


def test_hostile_model_names_in_the_url_are_refused(url, http):
    for name in ESCAPING + WEIRD[:-3]:
        quoted = requests.utils.quote(name, safe="")
        response = send(http, url, "GET", f"/v1/models/{quoted}", None)
        record("hand-written", "hostile names", "", response.status_code)
        assert response.status_code == 404, (name, response.text)
    for path in ["/v1/models/%ED%A0%80", "/v1/models/fake%00a", "/v1/models/%FF%FE"]:
        response = send(http, url, "GET", path, None)  # not UTF-8, or a lone surrogate
        record("hand-written", "hostile names", "", response.status_code)
        assert response.status_code == 404, (path, response.text)
    for digest in ["../../etc/passwd", "sha256:" + "0" * 63 + "/", "sha256-..%2f..%2fx"]:
        for method in ("GET", "HEAD", "POST"):
            quoted = requests.utils.quote(digest, safe="")
            response = send(http, url, method, f"/api/blobs/{quoted}", b"x")
            record("hand-written", "hostile names", "", response.status_code)
            assert response.status_code in (400, 404), (digest, method, response.text)


def test_the_store_refuses_every_escaping_name(tmp_path):
    """Below the API: the real store and the registry's naming refuse the same names and
    touch nothing outside their root."""
    root = tmp_path / "store"
    store = Store(root)
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ESCAPING + WEIRD:
        with pytest.raises(ValueError):
            check_name(name)
        for call in (store.manifest, store.get, store.remove, lambda n: store.copy(A, n)):
            with pytest.raises(CorralError):
                call(name)
        if not name.strip().lower().startswith(("/", "./", "../", "~", "file:")):
            with pytest.raises(CorralError):
                local_name(name)
    assert list(outside.iterdir()) == []
    assert not root.exists() or not any(Path(root).rglob("*.json"))


def test_fuzzing_ran_enough_cases(request):
    """The generated cases of the whole module reach MIN_CASES (when all of them ran)."""
    ran = {(route, mode) for group, route, mode in RESULTS if group == "generated"}
    if len(ran) < len(FUZZ):
        pytest.skip("only part of the fuzz ran")
    total = sum(sum(c.values()) for (group, _, _), c in RESULTS.items() if group == "generated")
    assert total >= MIN_CASES

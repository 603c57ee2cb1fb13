"""``corral pull|list|show|rm|cp|create|stop|run`` against a fake Ollama API (httpx.MockTransport).

The pure parts (Modelfile, sizes, ages, progress rows, the show summary) are
tested directly; the commands through typer's CliRunner with the module's
``connect`` replaced by a client on a mock transport that records requests.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from cluster import cli_models
from cluster.cli import app
from cluster.cli_models import (
    ModelfileError,
    Row,
    human_age,
    human_size,
    model_file,
    modified,
    parse_modelfile,
    progress_row,
    show_summary,
)

DIGEST = "sha256:" + "0123456789ab" + "c" * 52
Handler = Callable[[httpx.Request], httpx.Response]


# -- a fake Corral ------------------------------------------------------------------


def ndjson(*messages: dict) -> bytes:
    return b"".join(json.dumps(m).encode() + b"\n" for m in messages)


def answer(*pieces: str) -> bytes:
    """A streamed /api/chat answer in ``pieces``."""
    lines = [{"message": {"role": "assistant", "content": p}, "done": False} for p in pieces]
    return ndjson(*lines, {"message": {"role": "assistant", "content": ""}, "done": True})


class FakeCorral:
    """Routes (method, path) to canned replies or functions; keeps every request and body."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Handler] = {}
        self.seen: list[tuple[str, str, bytes]] = []
        self.urls: list[str] = []  # where the command was told to connect

    def route(self, method: str, path: str, status: int = 200, **reply) -> None:
        self.routes[method, path] = lambda request: httpx.Response(status, **reply)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append((request.method, request.url.path, request.read()))
        handler = self.routes.get((request.method, request.url.path))
        if handler is None:
            return httpx.Response(404, json={"error": f"no route {request.url.path}"})
        return handler(request)

    def bodies(self, path: str) -> list:
        return [json.loads(body) for _, p, body in self.seen if p == path and body]

    def paths(self) -> list[str]:
        return [f"{method} {path}" for method, path, _ in self.seen]


@pytest.fixture
def server(monkeypatch) -> FakeCorral:
    fake = FakeCorral()

    def connect(url: str) -> httpx.Client:
        fake.urls.append(url)
        return httpx.Client(base_url=url, transport=httpx.MockTransport(fake))

    monkeypatch.delenv("CORRAL_CONFIG", raising=False)
    monkeypatch.delenv("CORRAL_HOST", raising=False)
    monkeypatch.setattr(cli_models, "connect", connect)
    return fake


def corral(*args: str, input: str | None = None):
    return CliRunner().invoke(app, [*args, "--host", "box.lan:8080"], input=input)


# -- pure parts ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (512, "512 B"),
        (1_500, "1.5 KB"),
        (135_000_000, "135 MB"),
        (2_000_000_000, "2 GB"),
        (4_700_000_000, "4.7 GB"),
        (12_345_000_000, "12 GB"),
        (1_300_000_000_000, "1.3 TB"),
    ],
)
def test_human_size_is_ollamas_decimal_units(n, text):
    assert human_size(n) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (-5, "Less than a second ago"),  # the server's clock a little ahead
        (0.4, "Less than a second ago"),
        (1, "1 second ago"),
        (42, "42 seconds ago"),
        (90, "About a minute ago"),
        (59 * 60, "59 minutes ago"),
        (3600 + 600, "About an hour ago"),
        (30 * 3600, "30 hours ago"),
        (3 * 86400, "3 days ago"),
        (20 * 86400, "2 weeks ago"),
        (100 * 86400, "3 months ago"),
        (800 * 86400, "2 years ago"),
    ],
)
def test_human_age_says_it_like_ollama_list(seconds, text):
    assert human_age(seconds) == text


def test_modified_reads_rfc3339_with_nanoseconds():
    now = datetime(2025, 1, 4, 12, 0, tzinfo=UTC)
    assert modified("2025-01-01T12:00:00.123456789Z", now) == "3 days ago"
    assert modified("2025-01-04T13:59:00+02:00", now) == "About a minute ago"
    assert modified("2025-01-04T11:00:00-00:00", now) == "About an hour ago"
    assert modified(None, now) == "Never"


def test_progress_rows_are_layer_bars_or_status_lines():
    layer = {"status": f"pulling {DIGEST[7:19]}", "digest": DIGEST, "total": 100, "completed": 40}
    assert progress_row(layer) == Row(DIGEST, "pulling 0123456789ab", 100, 40)
    assert progress_row({"status": "pulling manifest"}) == Row(
        "pulling manifest", "pulling manifest"
    )
    # a digest with nothing to count (create's "using existing layer") is a status line
    existing = {"status": "using existing layer", "digest": DIGEST}
    assert progress_row(existing) == Row("using existing layer", "using existing layer")


GOOD_MODELFILE = '''\
# a comment, then blank lines

from ./model.gguf
PARAMETER temperature 0.7
PARAMETER num_ctx 4096
parameter stop "<|im_end|>"
PARAMETER stop <|endoftext|>
PARAMETER stop 42
PARAMETER seed -1
PARAMETER top_p .9e0
PARAMETER use_mmap false
PARAMETER tokenizer "some text"
TEMPLATE """{{ if .System }}<|system|>
{{ .System }}{{ end }}
{{ .Prompt }}"""
SYSTEM """You are terse."""
SYSTEM	"You are a pirate."
LICENSE """
MIT
"""
LICENSE Apache-2.0
'''


def test_a_modelfile_with_every_instruction():
    parsed = parse_modelfile(GOOD_MODELFILE)
    assert parsed.source == "./model.gguf"
    assert parsed.parameters == {
        "temperature": 0.7,
        "num_ctx": 4096,
        "stop": ["<|im_end|>", "<|endoftext|>", "42"],  # stop sequences stay text
        "seed": -1,
        "top_p": 0.9,
        "use_mmap": False,
        "tokenizer": "some text",
    }
    assert parsed.template == "{{ if .System }}<|system|>\n{{ .System }}{{ end }}\n{{ .Prompt }}"
    assert parsed.system == "You are a pirate."  # the last SYSTEM wins, as in Ollama
    assert parsed.license == "\nMIT\n\n\nApache-2.0"  # verbatim, every LICENSE kept


def test_a_modelfile_from_a_model_name_only():
    parsed = parse_modelfile("\ufeffFROM llama3.2:1b\n")
    assert (parsed.source, parsed.parameters, parsed.template) == ("llama3.2:1b", {}, None)


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("FROM x\nFOO bar\n", 2, "unknown instruction 'FOO'"),
        ("FROM x\n\nADAPTER ./lora.gguf\n", 3, "ADAPTER is not supported"),
        ("FROM x\nMESSAGE user hi\n", 2, "MESSAGE is not supported"),
        ("FROM\n", 1, "FROM needs a value"),
        ("FROM x\nPARAMETER\n", 2, "PARAMETER needs a value"),
        ("FROM x\nPARAMETER temperature\n", 2, "needs a name and a value"),
        ("FROM x\nPARAMETER temp-erature 1\n", 2, "needs a name and a value"),
        ('FROM x\nSYSTEM """never\nclosed\n', 2, '""" opened here is never closed'),
        ('FROM x\nSYSTEM """a\nb""" trailing\n', 3, "unexpected text after the closing"),
        ('FROM x\nSYSTEM "open\n', 2, "quote in '\"open' is never closed"),
        ("FROM x\nFROM y\nFROM z\n", 3, "a third FROM"),
        ("# only a comment\nSYSTEM hi\n", 0, "no FROM line"),
    ],
)
def test_a_bad_modelfile_says_which_line(text, line, words):
    with pytest.raises(ModelfileError) as caught:
        parse_modelfile(text)
    assert caught.value.line == line
    assert words in str(caught.value)


def test_from_is_a_file_near_the_modelfile_or_a_model_name(tmp_path, monkeypatch):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "h.gguf").write_bytes(b"GGUF")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert model_file("m.gguf", tmp_path) == tmp_path / "m.gguf"
    assert model_file("./m.gguf", tmp_path) == tmp_path / "m.gguf"
    assert model_file(str(tmp_path / "m.gguf"), Path("/elsewhere")) == tmp_path / "m.gguf"
    assert model_file("~/h.gguf", Path("/elsewhere")) == tmp_path / "home" / "h.gguf"
    assert model_file("llama3.2:1b", tmp_path) is None
    assert model_file("hf.co/org/repo:q4_k_m", tmp_path) is None
    for missing in ("./gone.gguf", "other.GGUF", "../x"):
        with pytest.raises(ModelfileError, match="there is no file"):
            model_file(missing, tmp_path)
    with pytest.raises(ModelfileError, match="is a folder"):
        model_file("home", tmp_path)


SHOW = {
    "modelfile": "FROM /models/blobs/sha256-abc\nPARAMETER stop <|im_end|>\n",
    "parameters": 'stop                           "<|im_end|>"\ntemperature                    0.2',
    "template": "{{ .Prompt }}",
    "system": "",
    "license": "Apache License\nVersion 2.0, January 2004\n\nlots more\n",
    "details": {"family": "llama", "parameter_size": "135M", "quantization_level": "Q4_1"},
    "model_info": {
        "general.architecture": "llama",
        "general.parameter_count": 134515008,
        "llama.context_length": 8192,
        "llama.embedding_length": 576,
    },
    "capabilities": ["completion"],
}


def test_show_summary_is_ollamas_layout():
    assert show_summary(SHOW).splitlines() == [
        "  Model",
        "    architecture        llama",
        "    parameters          135M",
        "    context length      8192",
        "    embedding length    576",
        "    quantization        Q4_1",
        "",
        "  Capabilities",
        "    completion",
        "",
        "  Parameters",
        '    stop           "<|im_end|>"',
        "    temperature    0.2",
        "",
        "  License",
        "    Apache License",
        "    Version 2.0, January 2004",
        "    ...",
    ]


def test_show_summary_of_a_sparse_reply_counts_parameters_itself():
    info = {
        "model_info": {"general.architecture": "qwen2", "general.parameter_count": 1_543_000_000}
    }
    assert show_summary(info).splitlines() == [
        "  Model",
        "    architecture    qwen2",
        "    parameters      1.5B",
    ]


# -- reaching the server ------------------------------------------------------------


def test_an_unreachable_server_says_to_start_corral(server):
    def refuse(request):
        raise httpx.ConnectError("[Errno 111] Connection refused")

    server.routes["GET", "/api/tags"] = refuse
    result = corral("list")
    assert result.exit_code == 1
    assert "cannot reach Corral at http://box.lan:8080 ([Errno 111] Connection refused)" in (
        result.stderr
    )
    assert "corral serve" in result.stderr


def test_a_connection_lost_midway_is_not_called_unreachable(server):
    def drop(request):
        raise httpx.RemoteProtocolError("peer closed connection")

    server.routes["POST", "/api/pull"] = drop
    result = corral("pull", "x")
    assert result.exit_code == 1
    assert "lost the connection to Corral at http://box.lan:8080 (peer closed" in result.stderr


def test_a_reply_that_is_not_ndjson_is_an_error(server):
    server.route("POST", "/api/pull", content=b"<html>\n")
    result = corral("pull", "x")
    assert result.exit_code == 1
    assert "not JSON: '<html>'" in result.stderr


# -- pull ------------------------------------------------------------------------------


def test_pull_draws_a_bar_per_layer_and_each_step(server):
    layer = {"status": "pulling 0123456789ab", "digest": DIGEST, "total": 2_000_000}
    server.route(
        "POST",
        "/api/pull",
        content=ndjson(
            {"status": "pulling manifest"},
            {**layer, "completed": 0},
            {**layer, "completed": 1_000_000},
            {**layer, "completed": 2_000_000},
            {"status": "verifying sha256 digest"},
            {"status": "writing manifest"},
            {"status": "success"},
        ),
    )
    result = corral("pull", "llama3.2:1b", "--insecure")
    assert result.exit_code == 0, result.output
    lines = [line.split() for line in result.stderr.splitlines()]
    assert lines[0] == ["pulling", "manifest"]
    assert lines[1][:2] == ["pulling", "0123456789ab"]
    assert "2.0/2.0" in lines[1] and "MB" in lines[1]
    assert lines[2:] == [["verifying", "sha256", "digest"], ["writing", "manifest"], ["success"]]
    assert server.bodies("/api/pull") == [
        {"model": "llama3.2:1b", "insecure": True, "stream": True}
    ]
    assert server.urls == ["http://box.lan:8080"]


def test_pull_error_line_exits_1_with_the_servers_words(server):
    server.route(
        "POST",
        "/api/pull",
        content=ndjson({"status": "pulling manifest"}, {"error": "digest mismatch for sha256:ab"}),
    )
    result = corral("pull", "llama3.2:1b")
    assert result.exit_code == 1
    assert "error: digest mismatch for sha256:ab" in result.stderr


def test_pull_http_error_exits_1(server):
    server.route("POST", "/api/pull", 404, json={"error": "model 'nope:latest' not found"})
    result = corral("pull", "nope")
    assert result.exit_code == 1
    assert "error: model 'nope:latest' not found" in result.stderr


def test_pull_that_stops_before_success_is_an_error(server):
    server.route("POST", "/api/pull", content=ndjson({"status": "pulling manifest"}))
    result = corral("pull", "x")
    assert result.exit_code == 1
    assert "closed the stream before it finished" in result.stderr


def test_an_error_body_that_is_not_json_shows_the_status(server):
    server.route("POST", "/api/pull", 502, content=b"Bad Gateway")
    result = corral("pull", "x")
    assert result.exit_code == 1
    assert "HTTP 502: Bad Gateway" in result.stderr


# -- list, show, rm, cp --------------------------------------------------------------


def test_list_prints_name_id_size_and_age(server):
    server.route(
        "GET",
        "/api/tags",
        json={
            "models": [
                {
                    "name": "llama3.2:1b",
                    "digest": "baf6a787fdffd633537aa2eb51cfd54cb93ff08e28040095462bb63daf552878",
                    "size": 1_321_098_329,
                    "modified_at": "2020-01-01T00:00:00.5Z",
                },
                {
                    "name": "smollm2:135m",
                    "digest": "a" * 64,
                    "size": 101_000_000,
                    "modified_at": datetime.now(UTC).isoformat(),
                },
            ]
        },
    )
    for command in ("list", "ls"):
        result = corral(command)
        assert result.exit_code == 0, result.output
        header, first, second = (line.split() for line in result.stdout.splitlines())
        assert header == ["NAME", "ID", "SIZE", "MODIFIED"]
        assert first[:4] == ["llama3.2:1b", "baf6a787fdff", "1.3", "GB"]
        assert first[-2:] == ["years", "ago"]
        assert second[:4] == ["smollm2:135m", "aaaaaaaaaaaa", "101", "MB"]
        assert second[-2:] in (["second", "ago"], ["seconds", "ago"])


def test_show_prints_the_summary_or_one_part(server):
    server.route("POST", "/api/show", json=SHOW)
    result = corral("show", "smollm2:135m")
    assert result.exit_code == 0, result.output
    assert result.stdout == show_summary(SHOW) + "\n"
    assert server.bodies("/api/show") == [{"model": "smollm2:135m"}]
    assert corral("show", "x", "--template").stdout == "{{ .Prompt }}\n"
    assert corral("show", "x", "--modelfile").stdout == SHOW["modelfile"]
    assert corral("show", "x", "--license").stdout.startswith("Apache License\n")
    assert corral("show", "x", "--system").stdout == "\n"


def test_show_takes_one_part_at_a_time(server):
    result = corral("show", "x", "--template", "--system")
    assert result.exit_code == 2
    assert "only one of" in result.stderr
    assert server.seen == []


def test_show_of_a_missing_model(server):
    server.route("POST", "/api/show", 404, json={"error": "model 'x:latest' not found"})
    result = corral("show", "x")
    assert result.exit_code == 1
    assert "error: model 'x:latest' not found" in result.stderr


def test_rm_deletes_each_and_reports_the_ones_it_could_not(server):
    def delete(request):
        name = json.loads(request.content)["model"]
        if name == "gone":
            return httpx.Response(404, json={"error": "model 'gone:latest' not found"})
        return httpx.Response(200)

    server.routes["DELETE", "/api/delete"] = delete
    result = corral("rm", "a", "gone", "b:1b")
    assert result.exit_code == 1
    assert result.stdout == "deleted 'a'\ndeleted 'b:1b'\n"
    assert "model 'gone:latest' not found" in result.stderr
    assert [b["model"] for b in server.bodies("/api/delete")] == ["a", "gone", "b:1b"]
    assert corral("rm", "a").exit_code == 0


def test_cp_copies_and_says_so(server):
    server.route("POST", "/api/copy")
    result = corral("cp", "llama3.2:1b", "mine")
    assert result.exit_code == 0
    assert result.stdout == "copied 'llama3.2:1b' to 'mine'\n"
    assert server.bodies("/api/copy") == [{"source": "llama3.2:1b", "destination": "mine"}]
    server.route("POST", "/api/copy", 400, json={"error": "'../x' is not a model name"})
    result = corral("cp", "llama3.2:1b", "../x")
    assert result.exit_code == 1
    assert "'../x' is not a model name" in result.stderr


# -- create ----------------------------------------------------------------------------

CREATED = ndjson({"status": "parsing GGUF"}, {"status": "writing manifest"}, {"status": "success"})


@pytest.fixture
def gguf(tmp_path) -> tuple[Path, str]:
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 10_000)
    return path, "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_create_from_a_gguf_uploads_the_blob_the_server_lacks(server, gguf):
    path, digest = gguf
    server.route("HEAD", f"/api/blobs/{digest}", 404)
    server.route("POST", f"/api/blobs/{digest}", 201)
    server.route("POST", "/api/create", content=CREATED)
    result = corral("create", "tiny", "-f", str(path))
    assert result.exit_code == 0, result.output
    assert server.paths() == [
        f"HEAD /api/blobs/{digest}",
        f"POST /api/blobs/{digest}",
        "POST /api/create",
    ]
    assert server.seen[1][2] == path.read_bytes()
    assert server.bodies("/api/create") == [
        {"model": "tiny", "files": {"tiny.gguf": digest}, "stream": True}
    ]
    for words in ("hashing tiny.gguf", f"uploading {digest[7:19]}", "parsing GGUF", "success"):
        assert words in result.stderr


def test_create_does_not_upload_a_blob_the_server_has(server, gguf, tmp_path):
    path, digest = gguf
    renamed = tmp_path / "model.bin"  # a GGUF by its first bytes, whatever its name
    renamed.write_bytes(path.read_bytes())
    server.route("HEAD", f"/api/blobs/{digest}", 200)
    server.route("POST", "/api/create", content=CREATED)
    result = corral("create", "tiny", "-f", str(renamed))
    assert result.exit_code == 0, result.output
    assert server.paths() == [f"HEAD /api/blobs/{digest}", "POST /api/create"]
    assert server.bodies("/api/create")[0]["files"] == {"model.bin": digest}
    assert f"using the server's copy of {digest[7:19]}" in result.stderr


def test_create_from_a_modelfile_sends_its_instructions(server, gguf, tmp_path, monkeypatch):
    path, digest = gguf
    (tmp_path / "Modelfile").write_text(
        'FROM ./tiny.gguf\nPARAMETER temperature 0.2\nPARAMETER stop "<|im_end|>"\n'
        'SYSTEM """Be brief."""\nTEMPLATE {{ .Prompt }}\nLICENSE MIT\n'
    )
    server.route("HEAD", f"/api/blobs/{digest}", 200)
    server.route("POST", "/api/create", content=CREATED)
    monkeypatch.chdir(tmp_path.parent)  # FROM is relative to the Modelfile, not the cwd
    result = corral("create", "brief", "-f", str(tmp_path / "Modelfile"))
    assert result.exit_code == 0, result.output
    assert server.bodies("/api/create") == [
        {
            "model": "brief",
            "files": {"tiny.gguf": digest},
            "template": "{{ .Prompt }}",
            "system": "Be brief.",
            "license": "MIT",
            "parameters": {"temperature": 0.2, "stop": ["<|im_end|>"]},
            "stream": True,
        }
    ]


def test_create_a_vision_model_from_a_modelfile_with_two_froms(server, gguf, tmp_path):
    path, digest = gguf
    projector = tmp_path / "mmproj.gguf"
    projector.write_bytes(b"GGUF projector")
    projector_digest = "sha256:" + hashlib.sha256(projector.read_bytes()).hexdigest()
    (tmp_path / "Modelfile").write_text("FROM ./tiny.gguf\nFROM ./mmproj.gguf\n")
    server.route("HEAD", f"/api/blobs/{digest}", 200)
    server.route("HEAD", f"/api/blobs/{projector_digest}", 200)
    server.route("POST", "/api/create", content=CREATED)
    result = corral("create", "eyes", "-f", str(tmp_path / "Modelfile"))
    assert result.exit_code == 0, result.output
    assert server.bodies("/api/create") == [
        {
            "model": "eyes",
            "files": {"tiny.gguf": digest, "mmproj.gguf": projector_digest},
            "stream": True,
        }
    ]
    # a model of the library and a projector file; a projector that is no file
    (tmp_path / "Modelfile").write_text("FROM llama3.2:1b\nFROM ./mmproj.gguf\n")
    result = corral("create", "eyes2", "-f", str(tmp_path / "Modelfile"))
    assert result.exit_code == 0, result.output
    assert server.bodies("/api/create")[-1]["from"] == "llama3.2:1b"
    assert server.bodies("/api/create")[-1]["files"] == {"mmproj.gguf": projector_digest}
    (tmp_path / "Modelfile").write_text("FROM ./tiny.gguf\nFROM llama3.2:1b\n")
    result = corral("create", "eyes3", "-f", str(tmp_path / "Modelfile"))
    assert result.exit_code != 0 and "must be a projector's GGUF file" in result.output


def test_create_from_a_model_name_uploads_nothing(server, tmp_path, monkeypatch):
    (tmp_path / "Modelfile").write_text("FROM llama3.2:1b\nSYSTEM You are Mario.\n")
    server.route("POST", "/api/create", content=CREATED)
    monkeypatch.chdir(tmp_path)
    result = corral("create", "mario")  # -f defaults to ./Modelfile, as in ollama
    assert result.exit_code == 0, result.output
    assert server.paths() == ["POST /api/create"]
    assert server.bodies("/api/create") == [
        {"model": "mario", "from": "llama3.2:1b", "system": "You are Mario.", "stream": True}
    ]


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("FROM x\nBOGUS y\n", "Modelfile:2: unknown instruction 'BOGUS'"),
        ("SYSTEM hi\n", "Modelfile: no FROM line"),
        ("FROM ./missing.gguf\n", "Modelfile: FROM ./missing.gguf: there is no file"),
        (b"\xff\xfe binary", "Modelfile: neither a GGUF file nor a Modelfile"),
    ],
)
def test_create_with_a_bad_modelfile_names_the_file_and_line(server, tmp_path, content, words):
    modelfile = tmp_path / "Modelfile"
    if isinstance(content, bytes):
        modelfile.write_bytes(content)
    else:
        modelfile.write_text(content)
    result = corral("create", "x", "-f", str(modelfile))
    assert result.exit_code == 1
    assert f"{tmp_path}/{words}" in result.stderr.replace("\n", "")
    assert server.seen == []


def test_create_without_the_file(server, tmp_path):
    result = corral("create", "x", "-f", str(tmp_path / "nope"))
    assert result.exit_code == 1
    assert "there is no file" in result.stderr


def test_create_reports_a_failed_upload_or_create(server, gguf):
    path, digest = gguf
    server.route("HEAD", f"/api/blobs/{digest}", 404)
    server.route("POST", f"/api/blobs/{digest}", 400, json={"error": "digest mismatch"})
    result = corral("create", "tiny", "-f", str(path))
    assert result.exit_code == 1
    assert "error: digest mismatch" in result.stderr
    server.route("HEAD", f"/api/blobs/{digest}", 500, json={"error": "disk full"})
    assert "error: disk full" in corral("create", "tiny", "-f", str(path)).stderr
    server.route("HEAD", f"/api/blobs/{digest}", 200)
    server.route("POST", "/api/create", content=ndjson({"error": "not a GGUF file"}))
    result = corral("create", "tiny", "-f", str(path))
    assert result.exit_code == 1
    assert "error: not a GGUF file" in result.stderr


# -- stop ------------------------------------------------------------------------------


def test_stop_unloads_and_says_whether_it_was_loaded(server):
    server.route("GET", "/api/ps", json={"models": [{"name": "llama3.2:latest"}]})
    server.route("POST", "/api/generate", json={"done": True, "done_reason": "unload"})
    result = corral("stop", "llama3.2")
    assert result.exit_code == 0, result.output
    assert result.stdout == "stopped 'llama3.2'\n"
    assert server.bodies("/api/generate") == [
        {"model": "llama3.2", "keep_alive": 0, "stream": False}
    ]
    assert corral("stop", "smollm2:135m").stdout == "'smollm2:135m' was not loaded\n"


def test_stop_of_an_unknown_model(server):
    server.route("GET", "/api/ps", json={"models": []})
    server.route("POST", "/api/generate", 404, json={"error": "model 'x:latest' not found"})
    result = corral("stop", "x")
    assert result.exit_code == 1
    assert "model 'x:latest' not found" in result.stderr


def test_stop_when_ps_fails(server):
    server.route("GET", "/api/ps", 503, json={"error": "the controller is starting"})
    result = corral("stop", "x")
    assert result.exit_code == 1
    assert "the controller is starting" in result.stderr


# -- run -------------------------------------------------------------------------------


def test_run_with_a_prompt_streams_one_answer(server):
    server.route("POST", "/api/chat", content=answer("Paris", " is the capital."))
    result = corral(
        "run", "llama3.2", "capital", "of", "France?", "--keepalive", "10m", "--format", "json"
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == "Paris is the capital.\n"
    assert server.bodies("/api/chat") == [
        {
            "model": "llama3.2",
            "stream": True,
            "keep_alive": "10m",
            "format": "json",
            "messages": [{"role": "user", "content": "capital of France?"}],
        }
    ]


def test_run_reads_the_prompt_from_stdin_before_the_arguments(server):
    server.route("POST", "/api/chat", content=answer("ok"))
    schema = '{"type": "object"}'
    result = corral("run", "m", "Summarize.", "--format", schema, input="A long text.\n")
    assert result.exit_code == 0, result.output
    body = server.bodies("/api/chat")[0]
    assert body["messages"] == [{"role": "user", "content": "A long text.\n Summarize."}]
    assert body["format"] == {"type": "object"}


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--keepalive", "soon"], "--keepalive: 'soon' is not a duration"),
        (["--format", "yaml"], "--format takes json or a JSON schema"),
        ([], "the prompt is empty"),
    ],
)
def test_run_refuses_bad_options(server, args, words):
    result = corral("run", "m", *args, input="")
    assert result.exit_code == 2
    assert words in result.stderr
    assert server.seen == []


def test_run_with_a_model_that_is_not_there(server):
    server.route("POST", "/api/chat", 404, json={"error": "model 'nope:latest' not found"})
    result = corral("run", "nope", "hi")
    assert result.exit_code == 1
    assert "error: model 'nope:latest' not found" in result.stderr


@pytest.fixture
def tty(monkeypatch):
    """Make ``run`` believe stdin is a terminal, so it chats instead of reading a prompt."""
    monkeypatch.setattr(cli_models, "stdin_is_tty", lambda: True)


def chat_replies(server: FakeCorral, *replies: bytes | Callable[[], Iterator[bytes]]) -> None:
    """Answer successive /api/chat requests with ``replies`` (bytes, or a stream function)."""
    queue = list(replies)

    def reply(request):
        content = queue.pop(0)
        return httpx.Response(200, content=content if isinstance(content, bytes) else content())

    server.routes["POST", "/api/chat"] = reply


def test_an_interactive_chat_keeps_history_until_clear(server, tty):
    server.route("POST", "/api/generate", json={"done": True, "done_reason": "load"})
    chat_replies(server, answer("Hi", "!"), answer("Bob."), answer("Who?"))
    typed = "hello\n/?\nmy name?\n\n/clear\nand now?\n/bye\nnever sent\n"
    result = corral("run", "llama3.2", "--keepalive", "1h", input=typed)
    assert result.exit_code == 0, result.output
    assert server.paths()[0] == "POST /api/generate"
    assert server.bodies("/api/generate") == [
        {"model": "llama3.2", "keep_alive": "1h", "stream": False}
    ]
    history = [body["messages"] for body in server.bodies("/api/chat")]
    assert history == [
        [{"role": "user", "content": "hello"}],
        [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "Hi!"},
            {"role": "user", "content": "my name?"},
        ],
        [{"role": "user", "content": "and now?"}],  # /clear forgot the rest
    ]
    assert ">>> Hi!\n\n>>> Available commands:" in result.stdout
    assert "Cleared session context" in result.stdout
    assert "Who?" in result.stdout


def test_an_interactive_chat_ends_at_eof_and_takes_multiline_messages(server, tty):
    server.route("POST", "/api/generate", json={"done": True})
    chat_replies(server, answer("Fine."))
    result = corral("run", "m", input='"""first line\nsecond line\n"""\n/nope\n')
    assert result.exit_code == 0, result.output
    assert server.bodies("/api/chat")[0]["messages"] == [
        {"role": "user", "content": "first line\nsecond line\n"}
    ]
    assert "... ... " in result.stdout
    assert "Unknown command '/nope'. Type /? for help" in result.stdout


def test_ctrl_c_stops_an_answer_and_the_chat_goes_on(server, tty):
    server.route("POST", "/api/generate", json={"done": True})

    def interrupted() -> Iterator[bytes]:
        yield ndjson({"message": {"role": "assistant", "content": "Once upon"}, "done": False})
        raise KeyboardInterrupt  # what Ctrl-C raises while the answer streams

    chat_replies(server, interrupted, answer("Sure."))
    result = corral("run", "m", input="tell a story\nsomething short\n/bye\n")
    assert result.exit_code == 0, result.output
    assert "Once upon" in result.stdout
    assert server.bodies("/api/chat")[1]["messages"] == [
        {"role": "user", "content": "something short"}  # the stopped turn is forgotten
    ]


def test_a_server_error_during_a_chat_is_shown_and_the_chat_goes_on(server, tty):
    server.route("POST", "/api/generate", json={"done": True})
    chat_replies(server, ndjson({"error": "all replicas are busy"}), answer("Ok."))
    result = corral("run", "m", input="one\ntwo\n/bye\n")
    assert result.exit_code == 0, result.output
    assert "error: all replicas are busy" in result.stderr
    assert server.bodies("/api/chat")[1]["messages"] == [{"role": "user", "content": "two"}]
    assert "Ok." in result.stdout


def test_an_interactive_chat_with_a_missing_model_fails_before_the_prompt(server, tty):
    server.route("POST", "/api/generate", 404, json={"error": "model 'nope:latest' not found"})
    result = corral("run", "nope", input="hello\n")
    assert result.exit_code == 1
    assert "model 'nope:latest' not found" in result.stderr
    assert ">>>" not in result.stdout

"""``corral pull|list|show|rm|cp|create|stop`` against a fake Ollama API (httpx.MockTransport).

The show summary is tested directly; the commands through typer's CliRunner with
``cluster.api_client.connect`` replaced by a client on a mock transport that records
requests (``tests/support/fake_corral.py``).
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from cluster.cli_models import show_summary
from tests.support.fake_corral import DIGEST, FakeCorral, corral, fake_corral, ndjson


@pytest.fixture
def server(monkeypatch) -> FakeCorral:
    return fake_corral(monkeypatch)


# -- show's summary ------------------------------------------------------------------


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


# -- pull ----------------------------------------------------------------------------


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


# -- create --------------------------------------------------------------------------

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


# -- stop ----------------------------------------------------------------------------


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

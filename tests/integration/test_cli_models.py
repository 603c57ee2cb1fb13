"""The model commands (``corral pull/list/show/create/cp/run/stop/rm``) against a real
Corral: the session's server, asked over HTTP exactly as from another box."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.oci import ollama_model, push_model, running_registry

pytestmark = pytest.mark.integration

CORRAL = str(Path(sys.executable).with_name("corral"))


@pytest.fixture(scope="module")
def corral_cli(corral):
    def run(*args: str, stdin: str | None = None, check: bool = True):
        done = subprocess.run(
            [CORRAL, *args, "--host", corral.url.removeprefix("http://")],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=180,
        )
        if check:
            assert done.returncode == 0, done.stdout + done.stderr
        return done

    return run


def test_pull_list_show_run_stop_rm(corral_cli, tmp_path, starter_path):
    with running_registry(tmp_path) as registry:
        push_model(registry.url, "library/clitest", "v1", ollama_model(starter_path))
        name = f"{registry.host}/library/clitest:v1"
        pulled = corral_cli("pull", name, "--insecure")
    assert "success" in pulled.stdout + pulled.stderr
    listed = corral_cli("list").stdout
    assert name in listed and "smollm2:135m" in listed and "MB" in listed
    shown = corral_cli("show", name).stdout
    assert "llama" in shown and "134.52M" in shown and "Q4_1" in shown
    assert "stop" in corral_cli("show", name, "--parameters").stdout  # from the manifest
    # The manifest's sampling is not greedy, so the words vary: an answer is what counts.
    answer = corral_cli("run", name, "What is the capital of France?").stdout
    assert answer.endswith("\n") and len(answer.split()) >= 3, answer
    assert "stopped" in corral_cli("stop", name).stdout
    assert "not loaded" in corral_cli("stop", name).stdout
    corral_cli("rm", name)
    assert name not in corral_cli("list").stdout


def test_create_from_a_modelfile_copy_and_chat(corral_cli, tmp_path, starter_path):
    (tmp_path / "Modelfile").write_text(
        f"FROM {starter_path}\nPARAMETER temperature 0\nSYSTEM Answer with one word.\n"
    )
    created = corral_cli("create", "oneword:v1", "-f", str(tmp_path / "Modelfile"))
    assert "success" in created.stdout + created.stderr
    assert "Answer with one word." in corral_cli("show", "oneword:v1", "--system").stdout
    corral_cli("cp", "oneword:v1", "oneword:v2")
    # An interactive chat fed through stdin: two turns, then /bye.
    chat = corral_cli("run", "oneword:v2", stdin="Capital of France?\n/clear\nSay hi.\n/bye\n")
    assert chat.stdout.strip()
    corral_cli("rm", "oneword:v1", "oneword:v2")
    missing = corral_cli("show", "oneword:v1", check=False)
    assert missing.returncode == 1 and "not found" in missing.stdout + missing.stderr


def test_errors_are_one_clear_line(corral_cli, tmp_path):
    bad = tmp_path / "Modelfile"
    bad.write_text("FROM ./nowhere.gguf\nPARAMETR temperature 0\n")
    out = corral_cli("create", "bad:v1", "-f", str(bad), check=False)
    assert out.returncode != 0 and "Modelfile:" in out.stdout + out.stderr
    out = corral_cli("run", "ghost:7b", "hello", check=False)
    assert out.returncode == 1 and "model 'ghost:7b' not found" in out.stdout + out.stderr
    out = corral_cli("pull", "../../etc/passwd", check=False)
    assert out.returncode == 1

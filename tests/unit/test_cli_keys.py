"""``corral keys create/list/revoke`` through typer's CliRunner, on a temporary state dir."""

from __future__ import annotations

import json
import os
import stat

import pytest
from typer.testing import CliRunner

from cluster.cli import app
from cluster.cli_serve import open_api_warning
from cluster.settings import load_settings
from deployments.auth import Keyring
from deployments.keys import KeyFile, keys_path


@pytest.fixture
def keys(tmp_path):
    def run(*args: str):
        return CliRunner().invoke(app, ["keys", *args, "--state-dir", str(tmp_path)])

    run.state = tmp_path
    return run


def test_create_prints_the_key_alone_on_stdout_once(keys):
    first = keys("create", "--name", "laptop")
    assert first.exit_code == 0, first.output
    key = first.stdout.strip()
    assert key.startswith("corral-") and len(key) > 40 and "\n" not in key
    assert "not shown again" in first.stderr and "now required" in first.stderr
    second = keys("create", "--models", "smollm2:135m, qwen3")
    assert "now required" not in second.stderr  # only the first key says so
    path = keys_path(keys.state)
    assert key not in path.read_text()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    grant = Keyring(path).check(f"Bearer {second.stdout.strip()}")
    assert grant.models == {"smollm2:135m", "qwen3:latest"}


def test_list_shows_ids_names_models_and_state_never_keys(keys):
    key = keys("create", "--name", "laptop", "--models", "a,b").stdout.strip()
    keys("create", "--name", "admin")
    keys("revoke", "laptop")
    table = keys("list")
    assert table.exit_code == 0
    assert "laptop" in table.stdout and "a:latest, b:latest" in table.stdout
    assert "revoked" in table.stdout and "active" in table.stdout and "all" in table.stdout
    rows = json.loads(keys("list", "--json").stdout)
    assert [r["name"] for r in rows] == ["laptop", "admin"]
    assert rows[0]["revoked_at"] and rows[1]["revoked_at"] is None
    assert all("hash" not in r for r in rows)
    assert key not in table.stdout


def test_list_without_keys_says_the_api_is_open(keys):
    result = keys("list")
    assert result.exit_code == 0 and "No API keys" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("revoke", "nope"), "no key has the id or name 'nope'"),
        (("create", "--models", "../etc/passwd"), "is not a model name"),
        (("create", "--models", " , "), "--models lists no model"),
    ],
)
def test_mistakes_are_one_line_errors(keys, args, message):
    result = keys(*args)
    assert result.exit_code == 1
    assert message in result.stderr and "Traceback" not in result.output


def test_a_damaged_key_file_is_named(keys):
    keys_path(keys.state).write_text("[1, 2")
    result = keys("list")
    assert result.exit_code == 1 and "api-keys.json is damaged" in result.stderr


def test_serving_the_lan_without_keys_warns(tmp_path):
    lan = load_settings(host="0.0.0.0:11434", state_dir=tmp_path)
    assert "no API key" in open_api_warning(lan)
    assert open_api_warning(load_settings(host="127.0.0.1:11434", state_dir=tmp_path)) is None
    KeyFile(keys_path(tmp_path)).create("k")
    assert open_api_warning(lan) is None

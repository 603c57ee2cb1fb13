"""Server settings: precedence, the shipped config, and errors that name the line."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.settings import CorralSettings, load_settings, parse_host
from cluster.yamlfile import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in list(__import__("os").environ):
        if key.startswith("CORRAL_"):
            monkeypatch.delenv(key)


def test_defaults_serve_ollamas_port_on_loopback():
    s = load_settings()
    assert s.listen == ("127.0.0.1", 11434)
    assert s.num_ctx == 4096 and s.num_threads is None
    assert type(s) is CorralSettings  # picklable for Ray actors


def test_the_shipped_config_states_the_defaults():
    from_file = load_settings(REPO / "configs" / "corral.yaml")
    assert from_file.model_dump() == CorralSettings().model_dump()


def test_flags_beat_environment_beat_file(tmp_path, monkeypatch):
    cfg = tmp_path / "corral.yaml"
    cfg.write_text("host: 0.0.0.0:9000\nnum_ctx: 1024\nnum_threads: 3\n")
    monkeypatch.setenv("CORRAL_NUM_CTX", "2048")
    monkeypatch.setenv("CORRAL_HOST", "127.0.0.1:9100")
    s = load_settings(cfg, host="127.0.0.1:9200", num_threads=None)
    assert s.host == "127.0.0.1:9200"  # flag
    assert s.num_ctx == 2048  # environment over file
    assert s.num_threads == 3  # file (the flag was not given)


def test_config_file_from_the_environment(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("num_ctx: 8192\n")
    monkeypatch.setenv("CORRAL_CONFIG", str(cfg))
    assert load_settings().num_ctx == 8192


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("num_ctx: 4096\nnum_thread: 2\n", "corral.yaml:2: num_thread: unknown setting"),
        (
            "host: 127.0.0.1:11434\nnum_ctx: 12\n",
            "corral.yaml:2: num_ctx: Input should be greater than or equal to 256",
        ),
        ("num_ctx: 4096\n  bad: [indent\n", "corral.yaml:2: invalid YAML"),
        ("- just\n- a list\n", "corral.yaml:1: the file must be a mapping"),
        (
            "host: 'localhost:http'\n",
            "corral.yaml:1: host: Value error, 'localhost:http': the port must be a number",
        ),
    ],
)
def test_broken_config_names_file_line_and_field(tmp_path, text, message):
    cfg = tmp_path / "corral.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    assert message in str(err.value)
    assert str(tmp_path) in str(err.value)


def test_bad_values_from_flags_and_environment_name_their_source(monkeypatch):
    with pytest.raises(ConfigError, match="--num-ctx: Input should be greater"):
        load_settings(num_ctx=1)
    monkeypatch.setenv("CORRAL_NUM_THREADS", "lots")
    with pytest.raises(ConfigError, match="CORRAL_NUM_THREADS: Input should be a valid integer"):
        load_settings()


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_settings(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:11434", ("127.0.0.1", 11434)),
        ("0.0.0.0", ("0.0.0.0", 11434)),
        (":8080", ("127.0.0.1", 8080)),
        ("http://10.0.0.5:9000/", ("10.0.0.5", 9000)),
        ("[::1]:11434", ("::1", 11434)),
    ],
)
def test_host_forms(value, expected):
    assert parse_host(value) == expected


@pytest.mark.parametrize("value", ["host:0", "host:99999", "https://x:1", "host:abc"])
def test_bad_hosts(value):
    with pytest.raises(ValueError):
        parse_host(value)


def test_node_settings_from_file_environment_and_flags(tmp_path, monkeypatch):
    cfg = tmp_path / "corral.yaml"
    cfg.write_text("node:\n  name: nas\n  reserve_ram: 1GiB\n  port: 6400\n")
    monkeypatch.setenv("CORRAL_NODE__RESERVE_RAM", "3GiB")
    s = load_settings(cfg, node={"port": 6500})
    assert (s.node.name, s.node.reserve_ram, s.node.port) == ("nas", 3 * 1024**3, 6500)
    with pytest.raises(ConfigError, match="--reserve-ram: could not parse"):
        load_settings(node={"reserve_ram": "lots"})
    cfg.write_text("node:\n  name: nas\n  reserve_rams: 1GiB\n")
    with pytest.raises(ConfigError, match=r"corral.yaml:3: node.reserve_rams: unknown setting"):
        load_settings(cfg)

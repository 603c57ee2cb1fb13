"""The Modelfile parser (``cluster/modelfile.py``): every instruction, the line of each
mistake, and what FROM names."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.modelfile import ModelfileError, model_file, parse_modelfile

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

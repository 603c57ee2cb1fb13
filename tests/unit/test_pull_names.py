"""Names without a network: where a name comes from and what it becomes, and which GGUF
(and which projector) of a Hugging Face repository a tag picks."""

from __future__ import annotations

import pytest

from nodes.errors import InvalidRequest
from nodes.pull import choose_gguf, choose_projector, local_name, source_of


@pytest.mark.parametrize(
    ("name", "source"),
    [
        ("llama3.2:1b", "registry"),
        ("registry.example.com:5000/team/model:q4", "registry"),
        ("hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M", "hf"),
        ("huggingface.co/org/repo", "hf"),
        ("https://example.com/models/x.gguf", "url"),
        ("HTTP://10.0.0.2:8000/x.gguf", "url"),
        ("/srv/models/x.gguf", "file"),
        ("./x.gguf", "file"),
        ("~/Downloads/x.GGUF", "file"),
        ("x.gguf", "file"),
    ],
)
def test_source_of(name, source):
    assert source_of(name) == source


@pytest.mark.parametrize(
    ("name", "local"),
    [
        ("llama3.2", "llama3.2:latest"),
        ("registry.ollama.ai/library/llama3.2:1b", "llama3.2:1b"),
        ("someone/model:tag", "someone/model:tag"),
        (
            "hf.co/Bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M",
            "hf.co/bartowski/llama-3.2-1b-instruct-gguf:q4_k_m",
        ),
        ("huggingface.co/Org/Repo", "hf.co/org/repo:latest"),
        ("https://example.com/m/SmolLM2-135M.Q4_1.gguf?download=true", "smollm2-135m.q4_1:latest"),
        ("https://example.com/m/My%20Model%2B.gguf", "my-model:latest"),
        ("/srv/models/Qwen2.5 7B (Q8).gguf", "qwen2.5-7b-q8:latest"),
    ],
)
def test_the_name_a_pull_stores_the_model_under(name, local):
    assert local_name(name) == local


BARTOWSKI = [
    ".gitattributes",
    "README.md",
    "Llama-3.2-1B-Instruct-IQ4_XS.gguf",
    "Llama-3.2-1B-Instruct-Q4_K_L.gguf",
    "Llama-3.2-1B-Instruct-Q4_K_M.gguf",
    "Llama-3.2-1B-Instruct-Q4_K_S.gguf",
    "Llama-3.2-1B-Instruct-Q8_0.gguf",
    "Llama-3.2-1B-Instruct-f16.gguf",
    "mmproj-Llama-3.2-1B-f16.gguf",
]


@pytest.mark.parametrize(
    ("quant", "chosen"),
    [
        (None, "Llama-3.2-1B-Instruct-Q4_K_M.gguf"),
        ("q8_0", "Llama-3.2-1B-Instruct-Q8_0.gguf"),
        ("IQ4_XS", "Llama-3.2-1B-Instruct-IQ4_XS.gguf"),
        ("F16", "Llama-3.2-1B-Instruct-f16.gguf"),  # not the projector
    ],
)
def test_choose_gguf_picks_the_quantization_asked_for(quant, chosen):
    assert choose_gguf(BARTOWSKI, quant, "bartowski/x") == chosen


@pytest.mark.parametrize("quant", ["Q4_K", "Q4", "Q5_K_M", "Q6_K"])
def test_choose_gguf_names_the_tags_there_are(quant):
    with pytest.raises(InvalidRequest, match="IQ4_XS, Q4_K_L, Q4_K_M, Q4_K_S, Q8_0, f16"):
        choose_gguf(BARTOWSKI, quant, "bartowski/x")


def test_choose_gguf_without_q4_k_m_takes_the_only_file_or_asks():
    assert choose_gguf(["model.Q8_0.gguf", "README.md"], None, "o/r") == "model.Q8_0.gguf"
    with pytest.raises(InvalidRequest, match="several GGUF files and no Q4_K_M; .*Q5_0, Q8_0"):
        choose_gguf(["m.Q8_0.gguf", "m.Q5_0.gguf"], None, "o/r")
    with pytest.raises(InvalidRequest, match="no GGUF file"):
        choose_gguf(["model.safetensors"], None, "o/r")
    split = ["Q8_0/m-Q8_0-00001-of-00002.gguf", "Q8_0/m-Q8_0-00002-of-00002.gguf"]
    with pytest.raises(InvalidRequest, match="split into several files"):
        choose_gguf(split, "Q8_0", "o/r")
    nested = ["big/m-Q4_K_M.gguf", "m-Q4_K_M.gguf"]
    assert choose_gguf(nested, None, "o/r") == "m-Q4_K_M.gguf"


def test_choose_projector_takes_the_repositorys_mmproj_if_any():
    model = "Llama-3.2-1B-Instruct-Q4_K_M.gguf"
    assert choose_projector(BARTOWSKI, model) == "mmproj-Llama-3.2-1B-f16.gguf"
    assert choose_projector(["m-Q4_K_M.gguf", "README.md"], "m-Q4_K_M.gguf") is None
    # several precisions (as ggml-org and unsloth ship them): F16 first, then BF16, F32 ...
    many = ["mmproj-model-f32.gguf", "mmproj-BF16.gguf", "mmproj-F16.gguf", "mmproj-Q8_0.gguf"]
    assert choose_projector(many, model) == "mmproj-F16.gguf"
    assert choose_projector(many[:2], model) == "mmproj-BF16.gguf"
    assert choose_projector(["mmproj-q8_0.gguf", "mmproj-q4.gguf"], model) == "mmproj-q8_0.gguf"
    # the projector beside the model, when the repository has folders
    nested = ["a/mmproj-f16.gguf", "b/mmproj-f16.gguf", "b/m-Q4_K_M.gguf"]
    assert choose_projector(nested, "b/m-Q4_K_M.gguf") == "b/mmproj-f16.gguf"

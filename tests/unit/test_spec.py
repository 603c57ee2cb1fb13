"""models.yaml: every field read right, and every mistake reported with its line and field."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest

from cluster.spec import (
    DEFAULT_KEEP_ALIVE,
    Llama,
    ModelSpec,
    dump_models,
    load_models,
    parse_models,
)
from cluster.yamlfile import ConfigError
from nodes.durations import FOREVER, format_duration, parse_duration
from nodes.engine import DEFAULT_PARALLEL, MAX_PARALLEL, LlamaSettings


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def errors_of(tmp_path: Path, text: str) -> list[str]:
    """The lines of the ConfigError that loading ``text`` raises."""
    path = write(tmp_path / "models.yaml", text)
    with pytest.raises(ConfigError) as err:
        load_models(path)
    return str(err.value).splitlines()


# -- valid files -------------------------------------------------------------------


def test_every_field_of_a_full_example(tmp_path):
    path = write(
        tmp_path / "conf" / "models.yaml",
        """
        models:
          - name: llama3.2
            source: weights/llama-3.2-3b.Q4_K_M.gguf
            context: 8192
            replicas: {min: 1, max: 3}
            placement:
              nodes: [gpubox, minipc]
              labels: {corral.gpu: none}
              gpu: never
              strategy: pack
            keep_alive: 5m
            pinned: true
            autoscaling: {target: 3.5}
            threads: 4
          - name: qwen2.5:14b
            replicas: 2
            keep_alive: 1h30m
          - name: library/phi3:mini
            source: ../shared/phi3.gguf
            keep_alive: 300
          - name: registry.local:5000/team/tiny
            source: /srv/models/tiny.gguf
            keep_alive: 0
          - name: big
            source: llama3.3:70b
            keep_alive: -1
        """,
    )
    llama, qwen, phi, tiny, big = load_models(path)

    assert llama == ModelSpec(
        name="llama3.2:latest",  # no tag means :latest, as in Ollama
        source=str(tmp_path / "conf" / "weights" / "llama-3.2-3b.Q4_K_M.gguf"),
        context=8192,
        replicas={"min": 1, "max": 3},
        placement={
            "nodes": ["gpubox", "minipc"],
            "labels": {"corral.gpu": "none"},
            "gpu": "never",
            "strategy": "pack",
        },
        keep_alive=300,
        pinned=True,
        autoscaling={"target": 3.5},
        threads=4,
    )
    # `replicas: 2` means exactly two; defaults elsewhere
    assert (qwen.name, qwen.replicas.min, qwen.replicas.max) == ("qwen2.5:14b", 2, 2)
    assert (qwen.source, qwen.context, qwen.threads, qwen.pinned) == (None, None, None, False)
    assert qwen.placement.model_dump() == {
        "nodes": None,
        "labels": {},
        "gpu": "auto",
        "strategy": "spread",
        "split": "auto",
    }
    assert qwen.autoscaling.target == 2.0
    # relative .gguf paths are relative to the file; absolute paths and model names stay
    assert phi.name == "library/phi3:mini"
    assert phi.source == str(tmp_path / "shared" / "phi3.gguf")
    assert tiny.name == "registry.local:5000/team/tiny:latest"  # the port is not a tag
    assert tiny.source == "/srv/models/tiny.gguf"
    assert (big.name, big.source) == ("big:latest", "llama3.3:70b")
    # keep_alive: 5m, 1h30m, 300 (seconds), 0 (unload at once), -1 (never)
    assert [s.keep_alive for s in (llama, qwen, phi, tiny)] == [300, 5400, 300, 0]
    assert big.keep_alive == math.inf


def test_a_projector_path_is_relative_to_the_file_like_a_source(tmp_path):
    text = (
        "models:\n  - name: eyes\n    source: ./m.gguf\n    projector: ./mmproj.gguf\n"
        "  - name: llava\n    projector: /srv/mmproj.gguf\n"
    )
    eyes, llava = load_models(write(tmp_path / "models.yaml", text))
    assert (eyes.source, eyes.projector) == (
        str(tmp_path / "m.gguf"),
        str(tmp_path / "mmproj.gguf"),
    )
    assert (llava.source, llava.projector) == (None, "/srv/mmproj.gguf")


def test_defaults_of_a_bare_entry(tmp_path):
    (spec,) = load_models(write(tmp_path / "models.yaml", "models:\n  - name: smollm2:135m\n"))
    assert spec.replicas.model_dump() == {"min": 1, "max": 1}
    assert spec.keep_alive == DEFAULT_KEEP_ALIVE == 300
    assert spec.placement.nodes is None and spec.placement.gpu == "auto"


@pytest.mark.parametrize(
    ("replicas", "expected"),
    [
        ("0", (0, 1)),  # load on demand, one replica at most
        ("{min: 2}", (2, 2)),  # max defaults to min
        ("{max: 4}", (1, 4)),
        ("{min: 0, max: 3}", (0, 3)),
    ],
)
def test_replica_forms(tmp_path, replicas, expected):
    path = write(tmp_path / "models.yaml", f"models:\n  - name: a\n    replicas: {replicas}\n")
    (spec,) = load_models(path)
    assert (spec.replicas.min, spec.replicas.max) == expected


@pytest.mark.parametrize("text", ["", "# nothing yet\n", "models: []\n"])
def test_empty_files_declare_no_model(tmp_path, text):
    assert load_models(write(tmp_path / "models.yaml", text)) == []


# -- broken files ------------------------------------------------------------------


def test_invalid_yaml_names_the_line(tmp_path):
    errors = errors_of(
        tmp_path,
        """
        models:
          - name: a
            context: 4096
           threads: 2
        """,
    )
    assert len(errors) == 1
    assert errors[0].startswith(f"{tmp_path / 'models.yaml'}:4: invalid YAML: ")


def test_unclosed_bracket(tmp_path):
    (error,) = errors_of(tmp_path, "models:\n  - name: a\n    placement: {nodes: [gpubox}\n")
    assert "models.yaml:3: invalid YAML" in error


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- name: a\n", "models.yaml:1: the file must be a mapping of settings (key: value)"),
        ("just text\n", "models.yaml:1: the file must be a mapping of settings"),
        ("models: {name: a}\n", "models.yaml:1: models: Input should be a valid list"),
        (
            "models:\n  - llama3.2\n",
            "models.yaml:2: models[0]: Input should be a valid dictionary",
        ),
    ],
)
def test_the_file_and_its_list_must_have_the_right_shape(tmp_path, text, message):
    (error,) = errors_of(tmp_path, text)
    assert message in error


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "models:\n  - name: a\nmodel_defaults: {}\n",
            "models.yaml:3: model_defaults: unknown setting (check the spelling",
        ),
        (
            "models:\n  - name: a\n    replica: 2\n",
            "models.yaml:3: models[0].replica: unknown setting",
        ),
        (
            "models:\n  - name: a\n    placement:\n      gpu: auto\n      colour: red\n",
            "models.yaml:5: models[0].placement.colour: unknown setting",
        ),
        (
            "models:\n  - name: a\n    placement: {gpu: yes}\n",  # YAML reads yes as true
            "models.yaml:3: models[0].placement.gpu: Input should be 'auto', 'required' or "
            "'never' (got True)",
        ),
        (
            "models:\n  - name: a\n    placement:\n      strategy: packed\n",
            "models.yaml:4: models[0].placement.strategy: Input should be 'spread' or 'pack' "
            "(got 'packed')",
        ),
        (
            "models:\n  - name: a\n    replicas: {min: 3, max: 1}\n",
            "models.yaml:3: models[0].replicas: max (1) must be at least min (3)",
        ),
        (
            "models:\n  - name: a\n    replicas:\n      min: -1\n",
            "models.yaml:4: models[0].replicas.min: Input should be greater than or equal to 0 "
            "(got -1)",
        ),
        (
            "models:\n  - name: a\n    replicas: -2\n",  # the shorthand: the min is wrong
            "models.yaml:3: models[0].replicas.min: Input should be greater than or equal to 0",
        ),
        (
            "models:\n  - name: a\n    context: 10\n",
            "models.yaml:3: models[0].context: Input should be greater than or equal to 64 "
            "(got 10)",
        ),
        (
            "models:\n  - name: a\n    threads: 0\n",
            "models.yaml:3: models[0].threads: Input should be greater than or equal to 1",
        ),
        (
            "models:\n  - name: a\n    keep_alive: 5 minutes\n",
            "models.yaml:3: models[0].keep_alive: '5 minutes' is not a duration like 30s, 5m, "
            "1h30m, a number of seconds, 0 (unload at once) or a negative value (keep forever)",
        ),
        (
            "models:\n  - name: a\n    keep_alive:\n",  # empty: null
            "models.yaml:3: models[0].keep_alive: a duration like 30s, 5m, 1h30m",
        ),
        (
            "models:\n  - name: a\n    keep_alive: true\n",
            "models.yaml:3: models[0].keep_alive: a duration like 30s",
        ),
        (
            "models:\n  - name: a\n  - name: ../../etc/passwd\n",
            "models.yaml:3: models[1].name: '../../etc/passwd' is not a model name: use model or "
            "model:tag, optionally after namespace/ or host/namespace/",
        ),
        (
            "models:\n  - name: llama..3\n",
            "models.yaml:2: models[0].name: 'llama..3' is not a model name",
        ),
        (
            "models:\n  - name: a/b/c/d\n",  # host/namespace/model is the most there is
            "models.yaml:2: models[0].name: 'a/b/c/d' is not a model name",
        ),
        ("models:\n  - name: /llama\n", "models.yaml:2: models[0].name: '/llama' is not a"),
        ("models:\n  - name: team/\n", "models.yaml:2: models[0].name: 'team/' is not a"),
        ("models:\n  - name: a:b:c\n", "models.yaml:2: models[0].name: 'a:b:c' is not a"),
        (
            "models:\n  - name: a\n  - source: x.gguf\n    context: 2048\n",
            "models.yaml:3: models[1].name: required setting is missing",
        ),
        (
            "models:\n  - name: a\n    placement:\n      nodes: []\n",
            "models.yaml:4: models[0].placement.nodes: an empty list allows no node; leave "
            "`nodes` out to allow any",
        ),
        (
            "models:\n  - name: a\n    placement:\n      labels: {corral.gpu: [a, b]}\n",
            "models.yaml:4: models[0].placement.labels.corral.gpu: Input should be a valid string",
        ),
        (
            "models:\n  - name: a\n    autoscaling: {target: 0}\n",
            "models.yaml:3: models[0].autoscaling.target: Input should be greater than 0",
        ),
    ],
)
def test_each_mistake_names_its_line_and_field(tmp_path, text, message):
    (error,) = errors_of(tmp_path, text)
    assert message in error
    assert error.startswith(str(tmp_path / "models.yaml") + ":")


def test_duplicate_names_give_both_lines(tmp_path):
    (error,) = errors_of(
        tmp_path,
        """
        models:
          - name: llama3.2
            context: 8192
          - name: qwen2.5:14b
          - name: llama3.2:latest
        """,
    )
    # the same model once the tag is filled in
    assert error.endswith(
        "models.yaml:5: models[2].name: llama3.2:latest is declared twice (first at line 2); "
        "merge the two entries"
    )


def test_every_mistake_of_the_file_at_once(tmp_path):
    errors = errors_of(
        tmp_path,
        """
        models:
          - name: llama3.2
            context: 10
            placement:
              gpu: sometimes
          - name: qwen..2
            replicas: {min: 2, max: 1}
          - keep_alive: soon
        colour: blue
        """,
    )
    found = sorted(e.split(str(tmp_path / "models.yaml") + ":", 1)[1] for e in errors)
    assert [f.split(":", 2)[:2] for f in found] == [
        ["3", " models[0].context"],
        ["5", " models[0].placement.gpu"],
        ["6", " models[1].name"],
        ["7", " models[1].replicas"],
        ["8", " models[2].keep_alive"],
        ["8", " models[2].name"],  # the entry has no name: its first line
        ["9", " colour"],
    ]


def test_a_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"models.yaml: cannot read the file"):
        load_models(tmp_path / "models.yaml")


# -- durations ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("5m", 300),
        ("1h30m", 5400),
        ("2h45m", 9900),
        ("1.5h", 5400),
        ("300ms", 0.3),
        (".5s", 0.5),
        ("5m0s", 300),
        ("90s", 90),
        (" 10m ", 600),
        ("300", 300),
        ("2.5", 2.5),
        ("+5m", 300),
        (300, 300),
        (0, 0),
        ("0", 0),
        (1.5, 1.5),
        (-1, FOREVER),
        ("-1", FOREVER),
        ("-5m", FOREVER),  # any negative duration means forever
    ],
)
def test_parse_duration(value, seconds):
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value", ["", "-", "soon", "5 m", "1h 30m", "5M", "1d", "m5", "1.5.5m", "nan", None, True, []]
)
def test_parse_duration_refuses(value):
    with pytest.raises(ValueError, match="a duration like 30s, 5m, 1h30m"):
        parse_duration(value)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (300, "5m"),
        (5400, "1h30m"),
        (45, "45s"),
        (3661, "1h1m1s"),
        (7200, "2h"),
        (0, "0s"),
        (0.25, "250ms"),
        (FOREVER, "forever"),
        (-1, "forever"),
    ],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize("text", ["5m", "1h30m", "45s", "2h", "0s", "forever"])
def test_format_parses_back(text):
    seconds = FOREVER if text == "forever" else parse_duration(text)
    assert format_duration(seconds) == text


def test_the_documented_example_holds_the_defaults():
    """configs/models.yaml says its values are the defaults: keep it true."""
    repo = Path(__file__).resolve().parents[2]
    (documented,) = load_models(repo / "configs" / "models.yaml")
    assert documented == ModelSpec(name="smollm2:135m")
    assert load_models(repo / "configs" / "homelab.models.yaml")  # the example parses


def test_autoscaling_delays_are_durations(tmp_path):
    text = (
        "models:\n  - name: a\n    autoscaling: {target: 1, upscale_delay: 500ms, "
        "downscale_delay: -1}\n"
    )
    (spec,) = load_models(write(tmp_path / "models.yaml", text))
    assert spec.autoscaling.upscale_delay == 0.5
    assert spec.autoscaling.downscale_delay == math.inf  # never scale down on load
    bad = "models:\n  - name: a\n    autoscaling:\n      upscale_delay: soon\n"
    with pytest.raises(ConfigError, match=r"bad.yaml:4: models\[0\].autoscaling.upscale_delay"):
        load_models(write(tmp_path / "bad.yaml", bad))


def test_engine_is_llama_cpp_or_fake(tmp_path):
    text = "models:\n  - name: a\n    engine: fake\n    engine_options: {token_delay: 0.02}\n"
    (spec,) = load_models(write(tmp_path / "models.yaml", text))
    assert (spec.engine, spec.engine_options) == ("fake", {"token_delay": 0.02})
    with pytest.raises(ConfigError, match=r"bad.yaml:3: models\[0\].engine: .*llama.cpp"):
        load_models(write(tmp_path / "bad.yaml", "models:\n  - name: a\n    engine: vllm\n"))


# -- slots and llama.cpp's settings ----------------------------------------------------


def test_parallel_and_llama_settings(tmp_path):
    text = """
    models:
      - name: a
        parallel: 8
        llama:
          flash_attn: on
          kv_cache_type: q4_0
          batch: 1024
          ubatch: 256
          mlock: true
          mmap: false
      - name: b
        llama: {flash_attn: off}
      - name: c
    """
    a, b, c = load_models(write(tmp_path / "models.yaml", text))
    assert a.slots == 8
    assert a.llama_settings() == LlamaSettings(
        flash_attn="on", kv_cache_type="q4_0", batch=1024, ubatch=256, mlock=True, mmap=False
    )
    assert b.llama.flash_attn == "off"  # YAML's bare off is false: read as "off"
    assert (c.parallel, c.slots, c.llama_settings()) == (None, DEFAULT_PARALLEL, LlamaSettings())


def test_the_fake_engine_has_one_slot_by_default(tmp_path):
    text = (
        "models:\n  - name: a\n    engine: fake\n  - name: b\n    engine: fake\n    parallel: 3\n"
    )
    a, b = load_models(write(tmp_path / "models.yaml", text))
    assert (a.slots, b.slots) == (1, 3)


def test_the_llama_block_mirrors_the_engines_settings():
    """models.yaml's `llama:` and nodes.engine.LlamaSettings cannot drift apart."""
    assert set(Llama.model_fields) == set(LlamaSettings.__dataclass_fields__)
    assert Llama().settings() == LlamaSettings()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "models:\n  - name: a\n    parallel: 0\n",
            "models.yaml:3: models[0].parallel: Input should be greater than or equal to 1",
        ),
        (
            f"models:\n  - name: a\n    parallel: {MAX_PARALLEL + 1}\n",
            f"models.yaml:3: models[0].parallel: Input should be less than or equal to "
            f"{MAX_PARALLEL}",
        ),
        (
            "models:\n  - name: a\n    llama:\n      flash_attn: off\n      kv_cache_type: q8_0\n",
            "models.yaml:5: models[0].llama.kv_cache_type: a q8_0 KV cache needs flash "
            "attention (llama.cpp refuses a quantized V cache without it): set flash_attn to "
            "auto or on, or use f16",
        ),
        (
            "models:\n  - name: a\n    llama:\n      kv_cache_type: q5_1\n",
            "models.yaml:4: models[0].llama.kv_cache_type: Input should be 'f16', 'q8_0' or "
            "'q4_0' (got 'q5_1')",
        ),
        (
            "models:\n  - name: a\n    llama:\n      flash_attn: maybe\n",
            "models.yaml:4: models[0].llama.flash_attn: Input should be 'auto', 'on' or 'off'",
        ),
        (
            "models:\n  - name: a\n    llama:\n      batch: 256\n      ubatch: 512\n",
            "models.yaml:5: models[0].llama.ubatch: ubatch (512) must be at most batch (256)",
        ),
        (
            "models:\n  - name: a\n    llama:\n      batch: 0\n",
            "models.yaml:4: models[0].llama.batch: Input should be greater than or equal to 1",
        ),
        (
            "models:\n  - name: a\n    llama:\n      mmap: true\n      n_gpu_layers: 10\n",
            "models.yaml:5: models[0].llama.n_gpu_layers: unknown setting",
        ),
        (
            "models:\n  - name: a\n    llama:\n      mlock: sometimes\n",
            "models.yaml:4: models[0].llama.mlock: Input should be a valid boolean",
        ),
        (
            "models:\n  - name: a\n    threads: 2\n    engine_options: {flash_attn: true}\n",
            "models.yaml:4: models[0].engine_options: engine_options are for the fake engine "
            "(got flash_attn); llama.cpp takes `parallel` and a `llama:` block",
        ),
        (
            "models:\n  - name: a\n    engine: llama.cpp\n    engine_options:\n      n_batch: 8\n",
            "models.yaml:4: models[0].engine_options: engine_options are for the fake engine "
            "(got n_batch)",
        ),
    ],
)
def test_slot_and_llama_mistakes_name_their_line(tmp_path, text, message):
    (error,) = errors_of(tmp_path, text)
    assert message in error
    assert error.startswith(str(tmp_path / "models.yaml") + ":")


def test_a_default_ubatch_above_a_smaller_batch_is_clamped_not_refused(tmp_path):
    text = "models:\n  - name: a\n    llama: {batch: 128}\n"
    (spec,) = load_models(write(tmp_path / "models.yaml", text))
    assert (spec.llama.batch, spec.llama.ubatch) == (128, 512)  # context_shape takes 128


def test_a_models_file_sent_as_text_reads_as_the_file_and_writes_back_the_same():
    repo = Path(__file__).parents[2]
    for name in ("models.yaml", "homelab.models.yaml"):
        specs = load_models(repo / "configs" / name)
        text = dump_models(specs)
        assert parse_models(text, "models.yaml", repo) == specs, text
    assert parse_models(dump_models([]), "models.yaml", repo) == []
    with pytest.raises(ConfigError, match=r"^models.yaml:3: models\[0\].replicas.min"):
        parse_models("models:\n  - name: a:1\n    replicas: {min: -1}\n", "models.yaml", repo)
    with pytest.raises(ConfigError, match=r"^models.yaml:3: invalid YAML"):
        parse_models("models:\n  - [\n", "models.yaml", repo)

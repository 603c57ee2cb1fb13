"""Which llama.cpp CPU kernels a box uses: the decision, the probe's report, the cache,
and one real probe on this machine (AMX or not) followed by a real decode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nodes.cpu_kernels import (
    BuildFeatures,
    ProbeOutcome,
    cache_key,
    current,
    decide,
    extra_bufts,
    fingerprint,
    kernels_in_use,
    outcome_of,
    parse_override,
    read_cached,
    system_info,
    write_cached,
)

# llama_print_system_info() of llama-cpp-python 0.3.36 built natively on three boxes.
SAPPHIRE_RAPIDS_GCC12 = (
    "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX_VNNI = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | "
    "BMI2 = 1 | AVX512 = 1 | AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | "
    "AMX_INT8 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | "
)
SAPPHIRE_RAPIDS_NO_AMX = SAPPHIRE_RAPIDS_GCC12.replace("AMX_INT8 = 1 | ", "")
N100 = (
    "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX_VNNI = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | "
    "BMI2 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | "
)
AMX_BUILD = BuildFeatures.parse(SAPPHIRE_RAPIDS_GCC12)
OK = ProbeOutcome(True, "decoded 8 tokens after a 24-token prompt")
SEGV = ProbeOutcome(False, "crashed: SIGSEGV")


def test_system_info_is_parsed_into_build_features():
    assert AMX_BUILD == BuildFeatures(
        amx_int8=True, avx512=True, avx512_vnni=True, avx2=True, repack=True
    )
    assert AMX_BUILD.amx
    n100 = BuildFeatures.parse(N100)
    assert (n100.amx, n100.avx512, n100.avx2, n100.repack) == (False, False, True, True)
    assert BuildFeatures.parse("CPU : NEON = 1 | ARM_FMA = 1 | ") == BuildFeatures()
    assert BuildFeatures.parse("AMX_INT8 = 0 | REPACK = 1") == BuildFeatures(repack=True)


@pytest.mark.parametrize(
    ("info", "cpu_amx", "label", "slug"),
    [
        (SAPPHIRE_RAPIDS_GCC12, True, "AMX+repack", "amx-repack"),
        (SAPPHIRE_RAPIDS_NO_AMX, True, "repack (AMX not built)", "repack"),
        (SAPPHIRE_RAPIDS_GCC12, False, "repack (no AMX on this CPU)", "repack"),
        (N100, False, "repack", "repack"),
        (SAPPHIRE_RAPIDS_GCC12.replace("REPACK = 1 | ", ""), True, "AMX", "amx"),
        ("CPU : NEON = 1 | ", False, "plain (no extra buffer types built)", "plain"),
    ],
)
def test_the_label_names_the_kernels_llamacpp_picks(info, cpu_amx, label, slug):
    assert kernels_in_use(BuildFeatures.parse(info), cpu_amx) == (label, slug)


def test_a_probe_that_decodes_keeps_extra_buffer_types_on():
    kernels = decide(AMX_BUILD, True, "auto", OK)
    assert kernels.extra_bufts
    assert (kernels.label, kernels.slug) == ("AMX+repack", "amx-repack")
    assert kernels.reason == (
        "a probe with extra buffer types on decoded 8 tokens after a 24-token prompt"
    )


def test_a_probe_that_crashes_turns_them_off_and_says_why():
    kernels = decide(AMX_BUILD, True, "auto", SEGV)
    assert not kernels.extra_bufts
    assert kernels.label == "plain (extra buffer types crashed: SIGSEGV)"
    assert kernels.slug == "plain"
    assert "GCC < 13" in kernels.reason  # AMX built and present: the known culprit
    n100 = decide(BuildFeatures.parse(N100), False, "auto", SEGV)
    assert not n100.extra_bufts and "GCC" not in n100.reason  # no AMX: no such claim


def test_the_operator_override_wins_without_a_probe():
    off = decide(AMX_BUILD, True, "off", None)
    assert not off.extra_bufts and off.slug == "plain"
    assert off.label == "plain (extra buffer types off by CORRAL_LLAMA_EXTRA_BUFTS)"
    on = decide(AMX_BUILD, True, "on", None)
    assert on.extra_bufts and on.label == "AMX+repack" and "not probed" in on.reason
    with pytest.raises(ValueError):
        decide(AMX_BUILD, True, "auto", None)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, "auto"), ("", "auto"), ("AUTO", "auto"), ("off", "off"), ("0", "off"),
     ("On", "on"), ("true", "on"), ("maybe", "auto")],
)  # fmt: skip
def test_override_values(value, expected):
    assert parse_override(value) == expected


def test_the_childs_exit_becomes_an_outcome():
    assert outcome_of(-11, "", "") == ProbeOutcome(False, "crashed: SIGSEGV")
    assert outcome_of(-6, "", "").detail == "crashed: SIGABRT"
    failed = outcome_of(1, "", "Traceback ...\nValueError: Failed to load model from file\n")
    assert failed == ProbeOutcome(
        False, "failed: exit 1: ValueError: Failed to load model from file"
    )
    report = json.dumps({"prompt": 24, "generated": 8})
    assert outcome_of(0, f"noise\n{report}\n", "") == OK
    assert not outcome_of(0, "not json", "").ok


def test_the_cache_keeps_an_outcome_per_key_and_ignores_bad_files(tmp_path):
    key, other = "a" * 64, "b" * 64
    assert read_cached(tmp_path, key) is None
    write_cached(tmp_path, key, ProbeOutcome(False, "crashed: SIGSEGV", at=5.0), {"cpu": "x"})
    assert read_cached(tmp_path, key) == ProbeOutcome(False, "crashed: SIGSEGV", True, 5.0)
    assert read_cached(tmp_path, other) is None
    (path,) = tmp_path.glob("cpu_kernels-*.json")
    for broken in ("{", "[]", '{"version": 1, "key": "' + key + '"}', ""):
        path.write_text(broken)
        assert read_cached(tmp_path, key) is None
    data = {"version": 99, "key": key, "outcome": {"ok": True, "detail": "d", "at": 1}}
    path.write_text(json.dumps(data))
    assert read_cached(tmp_path, key) is None  # another format: probe again


def test_the_override_skips_the_probe(tmp_path):
    kernels = current(folder=tmp_path, environ={"CORRAL_LLAMA_EXTRA_BUFTS": "off"})
    assert not kernels.extra_bufts and kernels.slug == "plain"
    assert not list(tmp_path.iterdir())  # no probe ran, nothing cached


def test_a_cached_outcome_is_used_as_is(tmp_path):
    about = fingerprint(system_info())
    outcome = ProbeOutcome(True, "decoded in the test's cache")
    write_cached(tmp_path, cache_key(about), outcome, about)
    kernels = current(folder=tmp_path, environ={})
    assert kernels.extra_bufts and kernels.reason.endswith("decoded in the test's cache")


def test_extra_bufts_sets_the_model_params_only_inside_the_block():
    import llama_cpp.llama_cpp as lib

    default = lib.llama_model_default_params().use_extra_bufts
    with extra_bufts(not default):
        assert lib.llama_model_default_params().use_extra_bufts is (not default)
    assert lib.llama_model_default_params().use_extra_bufts is default


# Decodes a prompt of many tokens (one batch: what crashed) with Corral's engine.
ENGINE_DECODE = r"""
import sys, threading
from nodes.engine import EngineSpec, Finished, GenerateRequest, SamplingParams
from nodes.llamacpp import LlamaCppEngine
engine = LlamaCppEngine(EngineSpec("smollm2:135m", sys.argv[1], n_ctx=512, n_threads=2))
req = GenerateRequest(prompt="The quick brown fox jumps over the lazy dog. " * 8,
                      params=SamplingParams(temperature=0, max_tokens=16))
events = list(engine.generate(engine.encode(req), req.params, threading.Event()))
assert isinstance(events[-1], Finished) and events[-1].usage.completion_tokens > 0
print(engine.kernels.label)
"""


def test_the_real_probe_chooses_and_the_engine_then_decodes(tmp_path, starter_path: Path):
    """On this machine, whatever its CPU and compiler: a choice, cached, that the engine
    (in a child, so that a wrong choice fails this test instead of killing pytest) uses."""
    kernels = current(folder=tmp_path, environ={})
    (cached,) = tmp_path.glob("cpu_kernels-*.json")
    assert kernels.label and kernels.slug in ("amx-repack", "amx", "repack", "plain")
    assert "a probe with" in kernels.reason
    mtime = cached.stat().st_mtime_ns
    assert current(folder=tmp_path, environ={}) == kernels  # from the cache
    assert cached.stat().st_mtime_ns == mtime

    env = {"XDG_CACHE_HOME": str(tmp_path.parent / "xdg"), "PATH": "/usr/bin:/bin"}
    (tmp_path.parent / "xdg").mkdir(exist_ok=True)
    (tmp_path.parent / "xdg" / "corral").symlink_to(tmp_path)
    root = str(Path(__file__).resolve().parents[2])
    done = subprocess.run(
        [sys.executable, "-c", ENGINE_DECODE, str(starter_path)],
        env={**env, "PYTHONPATH": root},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"the engine died ({done.returncode}): {done.stderr[-2000:]}"
    assert done.stdout.strip() == kernels.label
    assert cached.stat().st_mtime_ns == mtime  # the engine read the probe, did not redo it

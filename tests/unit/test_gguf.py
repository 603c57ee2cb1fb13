"""nodes.gguf: reading GGUF files and estimating the memory of a replica.

Runs on the starter model (SmolLM2-135M-Instruct Q4_1). The CPU estimates are
checked against the buffer sizes llama.cpp itself logs, both as recorded numbers
and live (one load in a subprocess); the GPU split is pure arithmetic, so it is
checked for consistency and against llama.cpp's layer-placement rules without a GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from nodes.engine import DEFAULT_PARALLEL, LlamaSettings, context_shape
from nodes.errors import ModelLoadFailed
from nodes.gguf import (
    KV_TYPES,
    MIB,
    GgufInfo,
    MemoryEstimate,
    estimate_memory,
    fit_gpu_layers,
    read_gguf,
)
from nodes.models import starter_model_path

N_LAYERS = 30
TOKEN_EMBD_BYTES = 576 * 49152 * 34 // 32  # token_embd.weight is Q8_0 (34 bytes per 32 values)

# Buffer sizes llama.cpp logged for the starter model, in MiB, as (model, KV, compute, output),
# by (n_ctx, parallel, flash_attn, kv_cache_type, unified_kv). Obtained with llama-cpp-python
# 0.3.36 by `bench/estimate.py` (one context opened as the engine opens it, CPU only, batch
# 2048, ubatch 512, n_seq_max = parallel + 1), from llama.cpp's log lines
#   load_tensors:   CPU_Mapped model buffer size =    92.10 MiB
#   llama_kv_cache:        CPU KV buffer size =    90.00 MiB
#   sched_reserve:        CPU compute buffer size =    99.38 MiB
#   llama_context:        CPU  output buffer size =     0.94 MiB
LLAMACPP_BUFFERS_MIB = {
    (2048, 1, "off", "f16", True): (92.10, 45.00, 99.38, 0.38),
    (2048, 1, "on", "q8_0", True): (92.10, 23.91, 99.38, 0.38),
    (2048, 4, "on", "f16", True): (92.10, 45.00, 102.54, 0.94),
    (2048, 4, "off", "f16", False): (92.10, 56.25, 98.26, 0.94),
    (8192, 1, "off", "f16", True): (92.10, 180.00, 166.38, 0.38),
    (8192, 1, "on", "f16", True): (92.10, 180.00, 98.25, 0.38),
    (8192, 4, "off", "f16", True): (92.10, 180.00, 167.36, 0.94),
    (8192, 4, "on", "q8_0", True): (92.10, 95.62, 99.38, 0.94),
    (8192, 4, "off", "f16", False): (92.10, 196.88, 99.38, 0.94),
}
COMPUTE_TOLERANCE = 0.05  # compute + output buffers against the logged ones
BENCH = Path(__file__).resolve().parents[2] / "bench" / "estimate.py"


@pytest.fixture(scope="module")
def info() -> GgufInfo:
    return read_gguf(starter_model_path())


def mib(n_bytes: int) -> float:
    return n_bytes / MIB


def assert_matches_llamacpp(
    est: MemoryEstimate, model: float, kv: float, compute: float, output: float
) -> None:
    assert round(mib(est.weights_ram), 2) == model  # exact, up to the log's rounding
    assert round(mib(est.kv_ram), 2) == kv
    assert round(mib(est.output_ram), 2) == output
    assert mib(est.compute_ram + est.output_ram) == pytest.approx(
        compute + output, rel=COMPUTE_TOLERANCE
    )


# -- read_gguf ---------------------------------------------------------------------------


def test_read_gguf_reads_the_starter_models_shape(info):
    assert info.architecture == "llama"
    assert info.n_layers == N_LAYERS
    assert info.n_head == 9
    assert info.n_head_kv == (3,) * N_LAYERS
    assert info.head_dim_k == info.head_dim_v == 64
    assert info.n_embd == 576
    assert info.n_vocab == 49152
    assert info.n_ctx_train == 8192
    assert info.quantization == "Q4_1"
    assert info.parameters == 134_515_008
    assert not info.embedding_model
    assert info.file_size == starter_model_path().stat().st_size
    assert len(info.layer_bytes) == N_LAYERS and len(set(info.layer_bytes)) == 1


def test_weights_bytes_are_what_llamacpp_maps(info):
    assert round(mib(info.weights_bytes), 2) == 92.10
    assert info.weights_bytes == info.input_bytes + sum(info.layer_bytes) + info.output_bytes
    assert info.weights_bytes < info.file_size  # the rest is metadata (tokenizer) and padding


def test_a_model_without_output_weight_uses_its_token_embeddings_as_head(info):
    assert info.tied_head_bytes == TOKEN_EMBD_BYTES
    assert info.input_bytes == TOKEN_EMBD_BYTES  # nothing else outside the blocks
    assert info.output_bytes == 576 * 4  # output_norm.weight (f32) alone


def test_describe(info):
    assert info.describe() == "llama 135M Q4_1, 30 layers, context 8192"


# -- CPU estimates against llama.cpp -------------------------------------------------------


@pytest.mark.parametrize("shape", sorted(LLAMACPP_BUFFERS_MIB))
def test_cpu_estimate_matches_llamacpp_buffers(info, shape):
    n_ctx, parallel, flash_attn, kv, unified = shape
    llama = LlamaSettings(flash_attn=flash_attn, kv_cache_type=kv, unified_kv=unified)
    est = estimate_memory(info, n_ctx, parallel=parallel, llama=llama)
    assert est.gpu_layers == 0 and est.vram == 0
    assert est.flash_attn == (flash_attn == "on")
    assert_matches_llamacpp(est, *LLAMACPP_BUFFERS_MIB[shape])
    assert est.ram == (
        est.weights_ram
        + est.kv_ram
        + est.compute_ram
        + est.output_ram
        + est.embed_ram
        + est.cache_ram
        + est.work_ram
        + est.overhead_ram
    )


def test_the_prompt_cache_takes_a_quarter_of_the_kv_cache_by_default(info):
    kv = estimate_memory(info, 4096, parallel=4).kv_ram
    default = estimate_memory(info, 4096, parallel=4)
    assert default.cache_ram == kv // 4  # a quarter of the context's tokens
    assert estimate_memory(info, 4096, llama=LlamaSettings(prompt_cache=4096)).cache_ram == kv
    off = estimate_memory(info, 4096, parallel=4, llama=LlamaSettings(prompt_cache=0))
    assert off.cache_ram == 0 and default.ram - off.ram == kv // 4


def test_cpu_estimate_matches_a_live_llamacpp_context(info):
    """One context opened the way the engine opens it (bench/estimate.py's child)."""
    n_ctx, parallel = 1024, 2
    llama = LlamaSettings(flash_attn="off")
    shape = context_shape(n_ctx, parallel, llama, pooled=False)
    args = {
        "path": str(starter_model_path()),
        "n_ctx": shape.n_ctx,
        "n_seq_max": shape.n_seq_max,
        "n_batch": shape.n_batch,
        "n_ubatch": shape.n_ubatch,
        "kv": "f16",
        "flash_attn": "off",
        "unified_kv": True,
        "pooled": None,
    }
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--child", json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    logged = json.loads(proc.stdout.strip().splitlines()[-1])["buffers_mib"]
    assert all(logged.values()), f"missing buffer lines in llama.cpp's log: {logged}"
    est = estimate_memory(info, n_ctx, parallel=parallel, llama=llama)
    assert_matches_llamacpp(est, logged["model"], logged["KV"], logged["compute"], logged["output"])


def test_kv_cache_is_sized_for_llamacpps_padded_context(info):
    assert estimate_memory(info, 1000).kv_ram == estimate_memory(info, 1024).kv_ram


# -- GPU split (arithmetic only) ---------------------------------------------------------


def estimates(info: GgufInfo, n_ctx: int = 4096, **kwargs) -> list[MemoryEstimate]:
    """One estimate per gpu_layers value, 0 .. n_layers + 1."""
    return [estimate_memory(info, n_ctx, gpu_layers=k, **kwargs) for k in range(info.n_layers + 2)]


def test_weights_are_split_not_duplicated(info):
    """RAM + VRAM weights are the file's weights, plus the tied head's copy once it is on
    the GPU (llama.cpp duplicates token_embd as the head; the input copy stays in RAM)."""
    extras = [e.weights_ram + e.weights_vram - info.weights_bytes for e in estimates(info)]
    assert extras[0] == 0
    assert extras[-1] == info.tied_head_bytes
    assert set(extras) <= {0, info.tied_head_bytes}
    assert extras == sorted(extras)  # once copied, it stays copied


def test_vram_grows_with_every_gpu_layer(info):
    for kv_type in ("f16", "q8_0"):
        ests = estimates(info, llama=LlamaSettings(kv_cache_type=kv_type))
        vram = [e.vram for e in ests]
        assert vram[0] == 0
        assert all(a < b for a, b in zip(vram, vram[1:], strict=False)), vram
        weights_ram = [e.weights_ram for e in ests]
        assert all(a >= b for a, b in zip(weights_ram, weights_ram[1:], strict=False))


def test_gpu_layers_count_blocks_like_llamacpp(info):
    """llama.cpp's -ngl counts n_layers + 1 slots, the output layer being the last: with
    k <= n_layers the last k - 1 blocks are offloaded. KV cells live with their block."""
    n = info.n_layers
    kv_per_block = estimate_memory(info, 4096).kv_ram // n
    for k, est in enumerate(estimates(info)):
        blocks_on_gpu = max(k - 1, 0) if k <= n else n
        assert est.kv_vram == blocks_on_gpu * kv_per_block, k
        assert est.kv_ram + est.kv_vram == n * kv_per_block


def test_partial_offload_puts_the_output_layer_on_the_gpu_first(info):
    n = info.n_layers
    for k in (1, 2, n // 2, n):
        est = estimate_memory(info, 4096, gpu_layers=k)
        blocks = sum(info.layer_bytes[n - (k - 1) :]) if k > 1 else 0
        assert est.weights_vram == blocks + info.output_bytes + info.tied_head_bytes, k


def test_full_offload_leaves_only_token_embeddings_in_ram(info):
    n_ctx = 4096
    cpu = estimate_memory(info, n_ctx)
    full = estimate_memory(info, n_ctx, gpu_layers=info.n_layers + 1)
    assert full.weights_ram == info.input_bytes == TOKEN_EMBD_BYTES
    assert full.weights_vram == sum(info.layer_bytes) + info.output_bytes + info.tied_head_bytes
    assert full.kv_ram == 0 and full.kv_vram == cpu.kv_ram
    assert full.work_ram == 0
    # More than n_layers + 1 (llama.cpp's "all", e.g. -ngl 999) is the same as n_layers + 1.
    assert estimate_memory(info, n_ctx, gpu_layers=999) == full


def brute_force_fit(info: GgufInfo, n_ctx: int, budget: int) -> int:
    fitting = [e.gpu_layers for e in estimates(info, n_ctx) if e.vram <= budget]
    return max(fitting, default=0)


@pytest.mark.parametrize("n_ctx", [512, 8192])
def test_fit_gpu_layers_takes_the_most_layers_that_fit(info, n_ctx):
    vrams = [e.vram for e in estimates(info, n_ctx)]
    budgets = {0, 1, 10 * MIB, 600 * MIB, 800 * MIB, 2**40}
    for v in vrams[1:]:  # right at, just under and just over each step
        budgets |= {v - 1, v, v + 1}
    for budget in sorted(budgets):
        fit = fit_gpu_layers(info, n_ctx, budget)
        assert fit.gpu_layers == brute_force_fit(info, n_ctx, budget), budget
        assert fit.vram <= budget or fit.gpu_layers == 0
        assert fit == estimate_memory(info, n_ctx, gpu_layers=fit.gpu_layers)


def test_fit_gpu_layers_extremes(info):
    assert fit_gpu_layers(info, 4096, 1 * MIB).gpu_layers == 0  # not even the CUDA context
    assert fit_gpu_layers(info, 4096, 0).vram == 0
    huge = fit_gpu_layers(info, 4096, 2**40)
    assert huge.gpu_layers == info.n_layers + 1
    assert huge.kv_ram == 0


def test_unknown_kv_type_is_refused_with_the_allowed_ones(info):
    with pytest.raises(ValueError, match="unknown KV-cache type 'q3_k'") as excinfo:
        estimate_memory(info, 4096, llama=LlamaSettings(kv_cache_type="q3_k"))  # type: ignore[arg-type]
    for name in KV_TYPES:
        assert name in str(excinfo.value)


def test_q8_0_kv_cache_is_34_32nds_of_a_byte_per_value(info):
    f16 = estimate_memory(info, 4096, llama=LlamaSettings(kv_cache_type="f16"))
    q8 = estimate_memory(info, 4096, llama=LlamaSettings(kv_cache_type="q8_0"))
    assert q8.kv_ram == f16.kv_ram * 34 / 32 / 2
    assert q8.weights_ram == f16.weights_ram  # only the cache changes


# -- the shape of the context -------------------------------------------------------------


def big_vocab() -> GgufInfo:
    """A gemma3-270m-like shape: 18 layers, a 262k vocabulary, one KV head of 256, a
    sliding window of 512 on five layers of every six."""
    from tests.support.models import synthetic_gguf

    base = synthetic_gguf(
        "gemma3:270m", layers=18, n_embd=640, n_head=4, n_head_kv=1, n_vocab=262144,
        file_bytes=300_000_000, tied=True,
    )  # fmt: skip
    return replace(
        base,
        architecture="gemma3",
        head_dim_k=256,
        head_dim_v=256,
        n_ff=2048,
        n_swa=512,
        swa_layers=tuple(i % 6 < 5 for i in range(18)),
    )


def test_more_slots_add_output_rows_not_cache(info):
    one = estimate_memory(info, 4096, parallel=1)
    four = estimate_memory(info, 4096, parallel=4)
    assert (one.n_seq_max, four.n_seq_max) == (2, 5)  # the slots and the embedding sequence
    assert four.output_ram == 4 * info.n_vocab * 5 > one.output_ram == 4 * info.n_vocab * 2
    assert four.kv_ram == one.kv_ram  # one unified cache of n_ctx cells, whatever the slots
    assert four.ram > one.ram


def test_the_micro_batch_sizes_the_compute_buffer():
    info = big_vocab()
    small, large = (estimate_memory(info, 4096, llama=LlamaSettings(ubatch=u)) for u in (128, 512))
    # the logits of every token of the micro-batch dominate with a large vocabulary
    assert large.compute_ram - small.compute_ram >= 4 * info.n_vocab * (512 - 128)
    assert large.compute_ram == pytest.approx(4 * 512 * info.n_vocab, rel=0.02)
    # embedding a micro-batch's worth of tokens grows the output buffer the same way
    assert large.embed_ram + large.output_ram == 4 * (info.n_vocab + info.n_embd) * 512
    assert small.kv_ram < large.kv_ram  # the window's cache holds one micro-batch more


def test_a_quantized_cache_shrinks_only_the_cache(info):
    f16 = estimate_memory(info, 8192, parallel=4)
    q8 = estimate_memory(info, 8192, parallel=4, llama=LlamaSettings(kv_cache_type="q8_0"))
    q4 = estimate_memory(info, 8192, parallel=4, llama=LlamaSettings(kv_cache_type="q4_0"))
    assert q4.kv_ram < q8.kv_ram < f16.kv_ram
    assert q8.kv_ram == f16.kv_ram * 34 / 64 and q4.kv_ram == f16.kv_ram * 18 / 64
    assert (q8.weights_ram, q8.output_ram) == (f16.weights_ram, f16.output_ram)


def test_attention_without_flash_holds_every_heads_scores(info):
    on = estimate_memory(info, 8192, llama=LlamaSettings(flash_attn="on"))
    off = estimate_memory(info, 8192, llama=LlamaSettings(flash_attn="off"))
    auto = estimate_memory(info, 8192)
    assert auto == on and on.flash_attn and not off.flash_attn  # auto: on, on the CPU
    scores = 4 * 512 * 8192 * info.n_head
    assert off.compute_ram > scores > on.compute_ram
    assert off.work_ram == scores // 2 and on.work_ram == 0  # the CPU's f16 copy


def test_flash_attention_auto_on_a_gpu_depends_on_the_head_size(info):
    full = info.n_layers + 1
    assert estimate_memory(info, 4096, gpu_layers=full).flash_attn  # head size 64
    odd = replace(info, head_dim_k=48, head_dim_v=48)
    assert not estimate_memory(odd, 4096, gpu_layers=full).flash_attn
    assert estimate_memory(odd, 4096).flash_attn  # the CPU has it for every size


def test_sliding_window_layers_get_a_capped_cache():
    info = big_vocab()
    per_cell = info.kv_bytes_per_token(0)  # 1 KV head of 256 + 256, f16
    for n_ctx, parallel in ((2048, 1), (8192, 1), (8192, 4), (32768, 4)):
        est = estimate_memory(info, n_ctx, parallel=parallel)
        window = min(n_ctx, -(-(512 * (parallel + 1) + 512) // 256) * 256)
        assert est.kv_ram == (3 * n_ctx + 15 * window) * per_cell, (n_ctx, parallel)
    no_swa = replace(info, n_swa=0)
    assert estimate_memory(no_swa, 8192).kv_ram == 18 * 8192 * per_cell
    assert estimate_memory(info, 8192).kv_ram < estimate_memory(no_swa, 8192).kv_ram


def test_a_split_cache_gives_each_sequence_its_padded_share(info):
    split = LlamaSettings(unified_kv=False)
    est = estimate_memory(info, 4096, parallel=4, llama=split)
    per_seq = -(-(4096 // 5) // 256) * 256  # 819 cells, padded to 1024
    assert est.kv_ram == 5 * per_seq * sum(info.kv_bytes_per_token(i) for i in range(info.n_layers))
    assert est.kv_ram > estimate_memory(info, 4096, parallel=4).kv_ram


def test_an_embedding_model_batches_its_whole_context(info):
    pooled = replace(info, embedding_model=True)
    est = estimate_memory(pooled, 2048, parallel=DEFAULT_PARALLEL)
    assert (est.n_batch, est.n_ubatch) == (2048, 2048)
    assert est.compute_ram >= 4 * 2048 * info.n_vocab  # logits of the whole input
    encoder = replace(pooled, has_kv_cache=False)
    assert estimate_memory(encoder, 2048).kv_ram == 0


@pytest.mark.parametrize(
    ("arch", "keys", "window", "swa"),
    [
        ("llama", {"llama.attention.sliding_window": 4096}, 0, ()),  # llama ignores it
        ("gemma3", {}, 0, ()),  # no window: no SWA
        ("gemma3", {"gemma3.attention.sliding_window": 512}, 512, (1, 1, 1, 1, 1, 0, 1, 1)),
        ("gemma2", {}, 4096, (1, 0, 1, 0, 1, 0, 1, 0)),  # gemma2's default window
        ("cohere2moe", {"cohere2moe.attention.sliding_window": 8}, 8, (0, 1, 1, 1, 0, 1, 1, 1)),
        (
            "gpt-oss",
            {
                "gpt-oss.attention.sliding_window": 128,
                "gpt-oss.attention.sliding_window_pattern": [False, True] * 4,
            },
            128,
            (0, 1, 0, 1, 0, 1, 0, 1),
        ),
    ],
)
def test_sliding_window_layers_as_llamacpp_sets_them(arch, keys, window, swa):
    from nodes.gguf import _sliding_window

    found = _sliding_window(arch, 8, lambda key, default=None: keys.get(key, default))
    assert found == (window, tuple(bool(x) for x in swa))


# -- bad files ---------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadFailed, match="does not exist"):
        read_gguf(tmp_path / "nope.gguf")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip, not a model" * 100)
    with pytest.raises(ModelLoadFailed, match="is not a GGUF file"):
        read_gguf(path)


def test_truncated_gguf_file(tmp_path):
    path: Path = tmp_path / "truncated.gguf"
    with starter_model_path().open("rb") as f:
        path.write_bytes(f.read(1_000_000))
    with pytest.raises(ModelLoadFailed, match="not a readable GGUF file.*truncated or corrupt"):
        read_gguf(path)


def test_a_projector_counts_where_mtmd_loads_it(info, starter_path, tmp_path):
    from nodes.gguf import is_projector
    from tests.support.vision_model import write_projector

    projector = write_projector(tmp_path / "mmproj.gguf")
    seeing = read_gguf(starter_path, projector)
    size = projector.stat().st_size
    assert seeing.projector_bytes == size and info.projector_bytes == 0
    extra = size + size // 4  # its weights and an allowance for its compute buffer
    cpu, blind_cpu = estimate_memory(seeing, 2048), estimate_memory(info, 2048)
    assert (cpu.ram - blind_cpu.ram, cpu.vram - blind_cpu.vram) == (extra, 0)
    gpu, blind_gpu = (estimate_memory(i, 2048, gpu_layers=5) for i in (seeing, info))
    assert (gpu.ram - blind_gpu.ram, gpu.vram - blind_gpu.vram) == (0, extra)
    assert is_projector(projector) and not is_projector(starter_path)

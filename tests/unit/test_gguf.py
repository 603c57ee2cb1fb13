"""nodes.gguf: reading GGUF files and estimating the memory of a replica.

Runs on the starter model (SmolLM2-135M-Instruct Q4_1). The CPU estimates are
checked against the buffer sizes llama.cpp itself logs, both as recorded numbers
and live (one load in a subprocess); the GPU split is pure arithmetic, so it is
checked for consistency and against llama.cpp's layer-placement rules without a GPU.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

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

# Buffer sizes llama.cpp logged for the starter model, in MiB, as (model, KV, compute, output).
# Obtained with llama-cpp-python 0.3.36: llama_cpp.Llama(path, n_ctx=N, n_threads=2,
# verbose=True), CPU only, default n_batch/n_ubatch 512, flash attention off (auto resolves
# to off on the CPU), f16 KV cache; read from the stderr lines
#   load_tensors:   CPU_Mapped model buffer size =    92.10 MiB
#   llama_kv_cache:        CPU KV buffer size =    90.00 MiB
#   sched_reserve:        CPU compute buffer size =    99.38 MiB
#   llama_context:        CPU  output buffer size =     0.19 MiB
LLAMACPP_BUFFERS_MIB = {
    512: (92.10, 11.25, 98.25, 0.19),
    2048: (92.10, 45.00, 99.38, 0.19),
    4096: (92.10, 90.00, 99.38, 0.19),
    8192: (92.10, 180.00, 166.38, 0.19),
}
COMPUTE_TOLERANCE = 0.03  # compute_ram (graph + output) against logged compute + output

# Loads the model verbosely in a fresh interpreter; llama.cpp logs to stderr. Without
# llama.cpp's extra buffer types (AMX, repack), as the estimate counts: where a box uses
# them (nodes/cpu_kernels.py) their repacked copy stands in for the mapped pages of the same
# weights, which stay only as reclaimable page cache.
LOAD_VERBOSE = (
    "import sys, llama_cpp; from nodes.cpu_kernels import extra_bufts\n"
    "with extra_bufts(False): "
    "llama_cpp.Llama(sys.argv[1], n_ctx=int(sys.argv[2]), n_threads=2, verbose=True)"
)
BUFFER_LINE = re.compile(r"\b(model|KV|compute|output) buffer size\s*=\s*([0-9.]+) MiB")


@pytest.fixture(scope="module")
def info() -> GgufInfo:
    return read_gguf(starter_model_path())


def mib(n_bytes: int) -> float:
    return n_bytes / MIB


def logged_buffers(stderr: str) -> dict[str, float]:
    """llama.cpp's logged buffer sizes in MiB by kind, summed over devices and buffer types."""
    sizes = dict.fromkeys(("model", "KV", "compute", "output"), 0.0)
    for kind, size in BUFFER_LINE.findall(stderr):
        sizes[kind] += float(size)
    return sizes


def assert_matches_llamacpp(
    est: MemoryEstimate, model: float, kv: float, compute: float, output: float
) -> None:
    assert round(mib(est.weights_ram), 2) == model  # exact, up to the log's rounding
    assert round(mib(est.kv_ram), 2) == kv
    assert mib(est.compute_ram) == pytest.approx(compute + output, rel=COMPUTE_TOLERANCE)


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


@pytest.mark.parametrize("n_ctx", sorted(LLAMACPP_BUFFERS_MIB))
def test_cpu_estimate_matches_llamacpp_buffers(info, n_ctx):
    est = estimate_memory(info, n_ctx)
    assert est.gpu_layers == 0 and est.vram == 0
    assert_matches_llamacpp(est, *LLAMACPP_BUFFERS_MIB[n_ctx])
    assert est.ram == (
        est.weights_ram + est.kv_ram + est.compute_ram + est.work_ram + est.overhead_ram
    )


def test_cpu_estimate_matches_a_live_llamacpp_load(info):
    n_ctx = 1024
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_VERBOSE, str(starter_model_path()), str(n_ctx)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    logged = logged_buffers(proc.stderr)
    assert all(logged.values()), f"missing buffer lines in llama.cpp's log: {logged}"
    est = estimate_memory(info, n_ctx)
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
        ests = estimates(info, kv_type=kv_type)
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
        estimate_memory(info, 4096, kv_type="q3_k")
    for name in KV_TYPES:
        assert name in str(excinfo.value)


def test_q8_0_kv_cache_is_34_32nds_of_a_byte_per_value(info):
    f16 = estimate_memory(info, 4096, kv_type="f16")
    q8 = estimate_memory(info, 4096, kv_type="q8_0")
    assert q8.kv_ram == f16.kv_ram * 34 / 32 / 2
    assert q8.weights_ram == f16.weights_ram  # only the cache changes


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

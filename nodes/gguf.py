"""GGUF files: what a model is, and how much memory a replica of it needs.

``read_gguf`` reads a file's metadata and tensor table with the ``gguf``
package (llama.cpp's own reader). ``estimate_memory`` turns that into the RAM
and VRAM one replica takes: the ONE llama.cpp context the engine opens for it
(``nodes.engine.context_shape``: ``n_ctx`` cells in one KV cache shared by
``parallel`` slots and a sequence for embeddings, ``n_batch``/``n_ubatch``, the
KV-cache type, flash attention), on ``gpu_layers`` GPU layers, following how
llama.cpp allocates:

- weights: the tensors' own bytes. llama.cpp counts the output head as layer
  ``n_layers`` and offloads the last ``gpu_layers`` of ``n_layers + 1``: the
  head first (with a copy of the token embeddings when the head is tied to
  them), then blocks from the last one down. Token embeddings always stay in
  RAM.
- KV cache: per layer, ``n_head_kv * (head_dim_k + head_dim_v)`` values of the
  KV-cache type (f16, or q8_0/q4_0 blocks, which need flash attention) per
  cell, on the device of its layer. Full-attention layers have ``n_ctx`` cells
  (rounded up to a multiple of 256); sliding-window layers (``swa_full`` off)
  ``min(n_ctx, n_swa * n_seq_max + n_ubatch)``, rounded the same way
  (``llama_kv_cache_iswa``). Encoders (BERT ...) have no cache.
- compute buffer: the worst-case graph llama.cpp reserves, one micro-batch of
  ``n_ubatch`` tokens (``_graph``): the larger of a layer's attention (the
  masks, without flash attention every head's scores over the widest cache,
  and the layer's activations), its feed-forward, and the logits of every
  token of the micro-batch (``n_ubatch x n_vocab`` floats: a large vocabulary
  makes this the largest buffer). On the CPU, attention without flash also
  converts the scores to f16 in a work buffer outside llama.cpp's log.
- output buffer: logits of one row per sequence (``n_vocab x n_seq_max``
  floats); embedding an input makes every token an output, so it grows to the
  logits and embeddings of one micro-batch, and stays so (``embed_ram``).
- a fixed allowance for the runtime (threads, allocator) and, per GPU, the
  CUDA context.
- a vision model's projector (``projector_bytes``): its file, loaded whole by
  mtmd on the GPU when the model has layers there, else in RAM, plus a quarter
  again for its encoder's compute buffer (not measured: an allowance).

``flash_attn: auto`` counts as on for the CPU (llama.cpp resolves it so) and on a
GPU for the head sizes CUDA has kernels for.

Measured (``bench/estimate.py --synthetic``: the starter model and synthetic
llama GQA, gemma3 with a 262k vocabulary and sliding windows, gemma2 with
sliding windows and soft-capping, qwen3moe and a pooled embedding model, at
context 2048 and 8192, 1 and 4 slots, the cache unified and split, flash
attention off/on, f16 and q8_0): KV exact, compute and output buffers from 0.91
to 1.00 of the sizes llama.cpp logs (the lowest with a split cache and flash
attention; 0.96 or more otherwise), totals from 0.98 to 1.00. The GPU figures
follow the same rules but are not measured here (no GPU on the dev box).

Not modelled: KV shared between layers (gemma3n), recurrent and hybrid state
(mamba, qwen3next, lfm2: their attention layers are counted, their state is
not), MLA's compressed cache (deepseek2): for those the estimate is rough.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from nodes.engine import ContextShape, LlamaSettings, context_shape
from nodes.errors import ModelLoadFailed

GGUF_MAGIC = b"GGUF"
MIB = 1024**2

N_UBATCH = 512  # llama.cpp's default micro-batch
N_CTX_PAD = 256  # llama.cpp rounds the context up to a multiple of this
RUNTIME_OVERHEAD = 16 * MIB  # threads, allocator, buffers outside llama.cpp's accounting
GPU_OVERHEAD = 512 * MIB  # CUDA context, cuBLAS workspace, fragmentation (per GPU)
# Head sizes CUDA has flash-attention kernels for (ggml-cuda/fattn.cu), where ``auto`` turns
# it on; elsewhere llama.cpp falls back to the plain attention.
CUDA_FLASH_ATTN_HEAD_DIMS = frozenset((40, 64, 72, 80, 96, 112, 128, 256))
# Bytes per value of the KV-cache types llama.cpp accepts (block bytes / block size).
KV_TYPES: dict[str, float] = {
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 34 / 32,
    "q5_1": 24 / 32,
    "q5_0": 22 / 32,
    "q4_1": 20 / 32,
    "q4_0": 18 / 32,
    "iq4_nl": 18 / 32,
}


def check_gguf(path: str | Path) -> None:
    """Refuse a missing, empty or non-GGUF file with a message that says which."""
    p = Path(path)
    if not p.exists():
        raise ModelLoadFailed(f"The model file {p} does not exist.")
    if not p.is_file():
        raise ModelLoadFailed(f"The model path {p} is not a file.")
    try:
        with p.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelLoadFailed(f"The model file {p} cannot be read: {exc.strerror}.") from None
    if not magic:
        raise ModelLoadFailed(f"The model file {p} is empty. Re-download or re-create the model.")
    if magic != GGUF_MAGIC:
        raise ModelLoadFailed(
            f"The model file {p} is not a GGUF file (it starts with {magic!r}, not b'GGUF'). "
            f"Re-download or re-create the model."
        )


@dataclass(frozen=True, slots=True)
class GgufInfo:
    """What a GGUF file says about its model (sizes in bytes)."""

    path: str
    file_size: int
    architecture: str
    name: str | None
    parameters: int  # weights, counted from the tensors
    quantization: str  # "Q4_K_M", "Q8_0", "F16" ...
    n_layers: int  # transformer blocks
    n_ctx_train: int
    n_embd: int
    n_head: int
    n_head_kv: tuple[int, ...]  # per layer (most models: the same for all)
    head_dim_k: int
    head_dim_v: int
    n_vocab: int
    layer_bytes: tuple[int, ...]  # weights of each block
    input_bytes: int  # token embeddings and anything not in a block or the head
    output_bytes: int  # output norm and head
    # A model without output.weight uses its token embeddings as the head too;
    # llama.cpp copies them to the GPU when the head is offloaded.
    tied_head_bytes: int
    embedding_model: bool  # declares a pooling type: made for embeddings
    # Every key of the header (Ollama's /api/show model_info); long arrays such as the
    # vocabulary are None, as Ollama shows them unless asked to be verbose.
    metadata: dict[str, Any] = field(default_factory=dict)
    projector_bytes: int = 0  # a vision model's projector file (mmproj); 0: none
    n_ff: int = 0  # feed-forward width (the largest layer's); 0: 4 * n_embd
    n_expert: int = 0  # a mixture of experts: experts per layer, and how many each token uses
    n_expert_used: int = 0
    n_ff_exp: int = 0  # an expert's feed-forward width
    # Sliding-window attention: the window, and which layers use it (llama.cpp's is_swa).
    n_swa: int = 0
    swa_layers: tuple[bool, ...] = ()
    has_kv_cache: bool = True  # False: an encoder (BERT ...) that llama.cpp gives no cache

    @property
    def weights_bytes(self) -> int:
        """Bytes of all tensors (what llama.cpp maps when nothing is offloaded)."""
        return self.input_bytes + sum(self.layer_bytes) + self.output_bytes

    def kv_bytes_per_token(self, layer: int, kv_type: str = "f16") -> float:
        per_value = KV_TYPES[kv_type]
        return self.n_head_kv[layer] * (self.head_dim_k + self.head_dim_v) * per_value

    def is_swa(self, layer: int) -> bool:
        """Whether ``layer`` attends only to a sliding window (and gets a smaller cache)."""
        return self.n_swa > 0 and layer < len(self.swa_layers) and self.swa_layers[layer]

    def describe(self) -> str:
        """One line for people: "llama 135M Q4_1, 30 layers, context 8192"."""
        size = _human_count(self.parameters)
        return (
            f"{self.architecture} {size} {self.quantization}, {self.n_layers} layers, "
            f"context {self.n_ctx_train}"
        )


@dataclass(frozen=True, slots=True)
class MemoryEstimate:
    """Memory of one replica, split by what it is for and where it lives (bytes)."""

    n_ctx: int
    gpu_layers: int  # llama.cpp's n_gpu_layers: 0 = CPU only, n_layers + 1 = everything
    kv_type: str
    weights_ram: int
    weights_vram: int
    kv_ram: int
    kv_vram: int
    compute_ram: int  # llama.cpp's compute buffers (the reserved graph) in RAM
    compute_vram: int
    work_ram: int  # the CPU backend's scratch (f16 attention scores), outside llama.cpp's log
    overhead_ram: int
    overhead_vram: int
    output_ram: int = 0  # llama.cpp's output buffer (logits of n_seq_max rows), in RAM
    embed_ram: int = 0  # what the output buffer grows by once an input is embedded
    cache_ram: int = 0  # prompts saved out of the KV cache (nodes/prompt_cache.py), full
    parallel: int = 1  # the slots
    n_seq_max: int = 2
    n_batch: int = N_UBATCH
    n_ubatch: int = N_UBATCH
    flash_attn: bool = True  # as llama.cpp will resolve the setting

    @property
    def ram(self) -> int:
        return (
            self.weights_ram
            + self.kv_ram
            + self.compute_ram
            + self.output_ram
            + self.embed_ram
            + self.cache_ram
            + self.work_ram
            + self.overhead_ram
        )

    @property
    def vram(self) -> int:
        return self.weights_vram + self.kv_vram + self.compute_vram + self.overhead_vram


def read_gguf(path: str | Path, projector: str | Path = "") -> GgufInfo:
    """Metadata and tensor sizes of the model in ``path`` (and the size of its
    ``projector``, for a vision model).

    Results are cached while the file's size and modification time stay the
    same: reading a large vocabulary takes seconds.
    """
    p = Path(path)
    check_gguf(p)
    stat = p.stat()
    info = _read_gguf(str(p.resolve()), stat.st_size, stat.st_mtime_ns)
    if projector:
        check_gguf(projector)
        info = replace(info, projector_bytes=Path(projector).stat().st_size)
    return info


def is_projector(path: str | Path) -> bool:
    """Whether the GGUF in ``path`` is a vision projector (mmproj), as Ollama decides:
    ``general.type`` says so, or it has vision blocks and no language-model blocks
    (``clip.vision.block_count`` without ``clip.block_count``)."""
    import gguf

    check_gguf(path)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt files raise anything
        raise ModelLoadFailed(
            f"The file {path} is not a readable GGUF file ({exc}). It may be truncated or "
            f"corrupt; re-download or re-create the model."
        ) from None

    def value(key: str) -> Any:
        f = reader.fields.get(key)
        return f.contents() if f is not None else None

    arch = value("general.architecture") or ""
    if value("general.type") == "projector":
        return True
    return not value(f"{arch}.block_count") and bool(value(f"{arch}.vision.block_count"))


@functools.lru_cache(maxsize=128)
def _read_gguf(path: str, size: int, mtime_ns: int) -> GgufInfo:
    try:
        return _parse(path, size)
    except ModelLoadFailed:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt files raise anything
        raise ModelLoadFailed(
            f"The model file {path} is not a readable GGUF file ({exc}). "
            f"It may be truncated or corrupt; re-download or re-create the model."
        ) from None


def _parse(path: str, size: int) -> GgufInfo:
    import gguf  # numpy-heavy; only the processes that plan import it

    reader = gguf.GGUFReader(path)

    def value(key: str, default=None):
        f = reader.fields.get(key)
        if f is None:
            return default
        return f.contents()

    arch = value("general.architecture")
    if not arch:
        raise ModelLoadFailed(f"The model file {path} does not name its architecture.")
    n_layers = int(value(f"{arch}.block_count", 0))
    n_embd = int(value(f"{arch}.embedding_length", 0))
    n_head = _first(value(f"{arch}.attention.head_count", 0))
    if not (n_layers and n_embd and n_head):
        raise ModelLoadFailed(
            f"The model file {path} lacks {arch}.block_count, embedding_length or "
            f"attention.head_count; llama.cpp cannot run it."
        )
    head_kv = value(f"{arch}.attention.head_count_kv", n_head)
    n_head_kv = tuple(head_kv) if isinstance(head_kv, list) else (int(head_kv),) * n_layers
    head_dim = n_embd // n_head
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    n_vocab = int(value(f"{arch}.vocab_size", 0)) or (len(tokens.data) if tokens else 0)

    layer_bytes = [0] * n_layers
    input_bytes = output_bytes = parameters = 0
    type_counts: dict[str, int] = {}
    for t in reader.tensors:
        size_bytes, elements = int(t.n_bytes), int(t.n_elements)
        parameters += elements
        type_counts[t.tensor_type.name] = type_counts.get(t.tensor_type.name, 0) + size_bytes
        if t.name.startswith("blk."):
            index = int(t.name.split(".")[1])
            if index < n_layers:
                layer_bytes[index] += size_bytes
                continue
        if t.name.startswith("output"):
            output_bytes += size_bytes
        else:
            input_bytes += size_bytes
    swa_window, swa_layers = _sliding_window(str(arch), n_layers, value)
    tied_head_bytes = 0
    if not any(t.name == "output.weight" for t in reader.tensors):
        embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        tied_head_bytes = int(embd.n_bytes) if embd is not None else 0

    return GgufInfo(
        path=path,
        file_size=size,
        architecture=str(arch),
        name=value("general.name"),
        parameters=parameters,
        quantization=_quantization(value("general.file_type"), type_counts),
        n_layers=n_layers,
        n_ctx_train=int(value(f"{arch}.context_length", 0)) or 2048,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=int(value(f"{arch}.attention.key_length", head_dim)),
        head_dim_v=int(value(f"{arch}.attention.value_length", head_dim)),
        n_vocab=n_vocab,
        layer_bytes=tuple(layer_bytes),
        input_bytes=input_bytes,
        output_bytes=output_bytes,
        tied_head_bytes=tied_head_bytes,
        embedding_model=f"{arch}.pooling_type" in reader.fields,
        metadata={k: _shown(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")},
        n_ff=_largest(value(f"{arch}.feed_forward_length", 0)),
        n_expert=int(value(f"{arch}.expert_count", 0)),
        n_expert_used=int(value(f"{arch}.expert_used_count", 0)),
        n_ff_exp=int(value(f"{arch}.expert_feed_forward_length", 0)),
        n_swa=swa_window,
        swa_layers=swa_layers,
        has_kv_cache=str(arch) not in NO_KV_CACHE,
    )


# Architectures llama.cpp runs without a KV cache (encoders: llama_model::create_memory).
NO_KV_CACHE = frozenset(
    (
        "bert", "jina-bert-v2", "jina-bert-v3", "nomic-bert", "nomic-bert-moe", "neo-bert",
        "eurobert", "modern-bert", "gemma-embedding", "dream", "llada", "llada-moe", "rnd1",
        "wavtokenizer-dec", "t5encoder",
    )
)  # fmt: skip
# Interleaved sliding-window attention as each architecture's load_arch_hparams sets it up:
# (n_pattern, dense_first, the window when the GGUF names none; 0: no SWA without one).
# A GGUF's own attention.sliding_window_pattern (one bool per layer, or a number) wins.
SWA_PATTERNS: dict[str, tuple[int, bool, int]] = {
    "gemma2": (2, False, 4096),
    "gemma3": (6, False, 0),
    "gemma3n": (5, False, 0),
    "gemma4": (0, False, 0),  # the pattern is always in the file
    "gpt-oss": (2, False, 0),
    "cohere2": (4, False, 0),
    "cohere2moe": (4, True, 0),
    "olmo2": (4, False, 0),
    "llama4": (4, False, 8192),  # chunked attention, sized like a window
    "exaone4": (4, False, 0),
    "exaone-moe": (4, False, 0),
    "afmoe": (4, False, 0),
    "mellum": (4, False, 0),
    "muse-glimmer": (4, False, 0),
    "laguna": (4, True, 0),
    "mimo2": (0, False, 0),
    "maple": (0, False, 0),
    "granite-swa": (0, False, 0),
}


def _sliding_window(
    arch: str, n_layers: int, value: Callable[..., Any]
) -> tuple[int, tuple[bool, ...]]:
    """The sliding window and which layers use it (llama.cpp's ``n_swa`` and ``is_swa``)."""
    known = SWA_PATTERNS.get(arch)
    if known is None:
        return 0, ()
    n_pattern, dense_first, default_window = known
    window = int(value(f"{arch}.attention.sliding_window", default_window) or 0)
    if window <= 0:
        return 0, ()
    pattern = value(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list):
        layers = tuple(bool(x) for x in pattern[:n_layers])
        return window, layers + (False,) * (n_layers - len(layers))
    if pattern is not None:
        n_pattern = int(pattern)
    if dense_first:
        layers = tuple(n_pattern == 0 or i % n_pattern != 0 for i in range(n_layers))
    else:
        layers = tuple(n_pattern == 0 or i % n_pattern < n_pattern - 1 for i in range(n_layers))
    return window, layers


def _shown(f) -> Any:
    """A header value as /api/show gives it: scalars and short arrays; None for long ones."""
    if len(f.data) > 16 and len(f.types) > 1:  # an array of more than 16 items
        return None
    return f.contents()


def estimate_memory(
    info: GgufInfo,
    n_ctx: int,
    *,
    parallel: int = 1,
    llama: LlamaSettings | None = None,
    gpu_layers: int = 0,
    gpus: int = 1,
) -> MemoryEstimate:
    """RAM and VRAM of one replica of ``info`` with ``parallel`` slots over ``n_ctx``
    cells and ``llama``'s settings (see the module docstring)."""
    llama = llama or LlamaSettings()
    kv_type = llama.kv_cache_type
    if kv_type not in KV_TYPES:
        raise ValueError(f"unknown KV-cache type {kv_type!r}; use one of {', '.join(KV_TYPES)}")
    shape = context_shape(n_ctx, parallel, llama, pooled=info.embedding_model)
    n = info.n_layers
    gpu_layers = max(0, min(gpu_layers, n + 1))
    first_gpu = n + 1 - gpu_layers  # layers from here on are offloaded; the head is layer n
    on_gpu = [i >= first_gpu for i in range(n)]
    head_on_gpu = gpu_layers > 0
    all_on_gpu = gpu_layers == n + 1
    flash = _flash_attn(info, llama.flash_attn, on_gpu=head_on_gpu)
    cells, swa_cells = kv_cells(info, shape, llama.unified_kv)
    streams = 1 if llama.unified_kv else shape.n_seq_max

    weights_vram = sum(b for b, g in zip(info.layer_bytes, on_gpu, strict=True) if g)
    weights_ram = sum(info.layer_bytes) - weights_vram + info.input_bytes
    if head_on_gpu:
        weights_vram += info.output_bytes + info.tied_head_bytes
    else:
        weights_ram += info.output_bytes
    projector = info.projector_bytes + info.projector_bytes // 4  # weights and compute
    if gpu_layers:  # mtmd puts the projector on the GPU whenever the model uses one
        weights_vram += projector
    else:
        weights_ram += projector

    kv = [0] * n
    if info.has_kv_cache:
        kv = [
            int(
                streams
                * (swa_cells if info.is_swa(i) else cells)
                * info.kv_bytes_per_token(i, kv_type)
            )
            for i in range(n)
        ]
    kv_vram = sum(b for b, g in zip(kv, on_gpu, strict=True) if g)
    kv_ram = sum(kv) - kv_vram
    # A saved sequence holds its tokens' cells of every layer (fewer of sliding-window
    # layers, which keep only the window): at most this, in RAM wherever the cache is.
    cache_ram = 0
    if info.has_kv_cache:
        saved = llama.prompt_cache_tokens(n_ctx)
        cache_ram = int(saved * sum(info.kv_bytes_per_token(i, kv_type) for i in range(n)))

    graph = _graph(info, shape, cells, swa_cells, flash)
    if not head_on_gpu:
        compute_ram, compute_vram = graph.total, 0
    elif all_on_gpu:  # the host keeps the inputs (and a copy of the embeddings) only
        compute_ram, compute_vram = 4 * graph.tokens * info.n_embd, graph.total
    else:  # blocks on both sides; the logits on the GPU with the head
        compute_ram, compute_vram = graph.masks + graph.attention, graph.total
    work_ram = 0 if flash or all_on_gpu else graph.f16_scores
    # Logits of one row per sequence; embedding an input (embeddings on, every token an
    # output) grows the buffer to logits and embeddings of every token of one micro-batch.
    output = 4 * info.n_vocab * shape.n_seq_max
    embedded = 4 * (info.n_vocab + info.n_embd) * max(shape.n_ubatch, shape.n_seq_max)
    return MemoryEstimate(
        n_ctx=n_ctx,
        gpu_layers=gpu_layers,
        kv_type=kv_type,
        weights_ram=weights_ram,
        weights_vram=weights_vram,
        kv_ram=kv_ram,
        kv_vram=kv_vram,
        compute_ram=compute_ram,
        compute_vram=compute_vram,
        work_ram=work_ram,
        overhead_ram=RUNTIME_OVERHEAD,
        overhead_vram=GPU_OVERHEAD * gpus if gpu_layers else 0,
        output_ram=output,
        embed_ram=embedded - output,
        cache_ram=cache_ram,
        parallel=parallel,
        n_seq_max=shape.n_seq_max,
        n_batch=shape.n_batch,
        n_ubatch=shape.n_ubatch,
        flash_attn=flash,
    )


def kv_cells(info: GgufInfo, shape: ContextShape, unified: bool = True) -> tuple[int, int]:
    """Cells of the KV cache of full-attention layers, and of sliding-window layers, per
    stream: the whole cache when it is ``unified``, else each sequence's own.

    llama.cpp pads the context to a multiple of 256 (split: each sequence's share,
    so the whole may grow); a sliding-window layer (``swa_full`` off) keeps the window
    of every sequence of its stream plus one micro-batch, padded the same way, and
    never more than the context."""
    cells = _pad(shape.n_ctx, N_CTX_PAD)
    seqs = shape.n_seq_max
    if not unified:
        cells = _pad(cells // seqs, N_CTX_PAD)
        seqs = 1
    if not info.n_swa:
        return cells, cells
    window = info.n_swa * seqs + shape.n_ubatch
    return cells, _pad(min(cells, window), N_CTX_PAD)


@dataclass(frozen=True, slots=True)
class _Graph:
    """The worst-case graph llama.cpp reserves its compute buffer for (bytes)."""

    tokens: int  # rows of the reserved micro-batch
    masks: int  # the attention masks, alive through every layer
    attention: int  # a layer's attention at its peak
    total: int  # the buffer: the largest stage, over the masks
    f16_scores: int  # the CPU's f16 copy of the scores (a work buffer, outside the graph)


def _graph(info: GgufInfo, shape: ContextShape, cells: int, swa_cells: int, flash: bool) -> _Graph:
    """The compute buffer llama.cpp reserves (``sched_reserve``): the graph of one
    micro-batch of ``n_ubatch`` tokens (rounded up to a multiple of ``n_seq_max``), each
    an output, over the whole KV cache. ggml's allocator frees a tensor after its last
    use, so the buffer is the largest set alive at once, at one of these stages:

    - a layer's attention: the masks (one per cache, f16 with flash attention, f32
      without), without flash attention the scores of every head over the widest cache
      (f32; softmax works in place), and the layer's activations (the residual stream,
      the normalised input, Q, K and V, the attention output);
    - a layer's feed-forward (for a mixture of experts: the router and the chosen
      experts' activations);
    - the head: the logits of every output, after the masks are freed.

    Measured against llama.cpp's log by ``bench/estimate.py`` (dense, grouped-query,
    sliding-window, mixture-of-experts and pooled shapes)."""
    s = shape.n_seq_max
    t = -(-shape.n_ubatch // s) * s
    outputs = min(shape.n_ubatch, shape.n_batch)
    if info.has_kv_cache:
        spans = {swa_cells if info.is_swa(i) else cells for i in range(info.n_layers)}
    else:  # no cache: each token attends to the micro-batch
        spans = {t}
    widest = max(spans)
    masks = sum((2 if flash else 4) * t * kv for kv in spans)
    e, h = info.n_embd, info.n_head
    q = h * info.head_dim_k
    kv_dim = max(info.n_head_kv, default=0) * (info.head_dim_k + info.head_dim_v)
    activations = 4 * t * (3 * e + 2 * q + kv_dim)
    scores = 0 if flash else 4 * t * widest * h
    attention = scores + activations
    if info.n_expert:
        ff = info.n_ff_exp or info.n_ff // max(info.n_expert_used, 1)
        used = info.n_expert_used
        ffn = 4 * t * (2 * e + used * (3 * ff + e) + 3 * info.n_expert)
    else:
        ffn = 4 * t * (2 * e + 3 * (info.n_ff or 4 * e))
    logits = 4 * outputs * info.n_vocab + 8 * t * e
    return _Graph(
        tokens=t,
        masks=masks,
        attention=attention,
        total=max(masks + attention, masks + ffn, logits),
        f16_scores=scores // 2,
    )


def _flash_attn(info: GgufInfo, setting: str, *, on_gpu: bool) -> bool:
    """Whether llama.cpp runs flash attention: ``auto`` turns it on where the backend has
    a kernel for it (the CPU always; CUDA for the usual head sizes)."""
    if setting != "auto":
        return setting == "on"
    return not on_gpu or info.head_dim_k in CUDA_FLASH_ATTN_HEAD_DIMS


def _pad(n: int, to: int) -> int:
    return -(-n // to) * to


def fit_gpu_layers(
    info: GgufInfo,
    n_ctx: int,
    vram_budget: int,
    *,
    parallel: int = 1,
    llama: LlamaSettings | None = None,
    gpus: int = 1,
    estimate: Callable[[int], MemoryEstimate] | None = None,
) -> MemoryEstimate:
    """The estimate with the most GPU layers whose VRAM fits ``vram_budget``.

    Everything that does not fit stays in RAM (partial offload); with no room
    even for one layer, the model runs on the CPU (``gpu_layers == 0``).
    ``estimate(gpu_layers)`` replaces ``estimate_memory`` (a caller's memo).
    VRAM grows with every layer, by about the same amount per block, so an
    interpolated guess (bisection if that stalls) finds it in a few estimates.
    """
    if estimate is None:

        def estimate(layers: int) -> MemoryEstimate:
            return estimate_memory(
                info, n_ctx, parallel=parallel, llama=llama, gpu_layers=layers, gpus=gpus
            )

    top = estimate(info.n_layers + 1)
    if top.vram <= vram_budget:
        return top
    lo, hi = 0, top.gpu_layers  # the VRAM of lo layers fits, of hi does not
    v_lo, v_hi = 0, top.vram
    step = 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if step < 3 and v_lo < v_hi:
            guess = lo + (vram_budget - v_lo) * (hi - lo) // (v_hi - v_lo)
            mid = min(max(guess, lo + 1), hi - 1)
        v_mid = estimate(mid).vram
        if v_mid <= vram_budget:
            lo, v_lo = mid, v_mid
        else:
            hi, v_hi = mid, v_mid
        step += 1
    return estimate(lo)


def _first(value) -> int:
    return int(value[0] if isinstance(value, Sequence) and not isinstance(value, str) else value)


def _largest(value) -> int:
    """A per-layer array's largest value (feed-forward widths may differ by layer)."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return int(max(value, default=0))
    return int(value or 0)


def _quantization(file_type: int | None, type_bytes: dict[str, int]) -> str:
    if file_type is not None:
        import gguf

        try:
            return gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_")
        except ValueError:
            pass
    return max(type_bytes, key=type_bytes.__getitem__) if type_bytes else "unknown"


def _human_count(n: int) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)

"""GGUF files: what a model is, and how much memory a replica of it needs.

``read_gguf`` reads a file's metadata and tensor table with the ``gguf``
package (llama.cpp's own reader). ``estimate_memory`` turns that into the RAM
and VRAM one replica takes for a context length, KV-cache type and number of
GPU layers, following how llama.cpp allocates:

- weights: the tensors' own bytes. llama.cpp counts the output head as layer
  ``n_layers`` and offloads the last ``gpu_layers`` of ``n_layers + 1``: the
  head first (with a copy of the token embeddings when the head is tied to
  them), then blocks from the last one down. Token embeddings always stay in
  RAM.
- KV cache: ``n_ctx`` cells (llama.cpp rounds up to a multiple of 256) of
  ``n_head_kv * (head_dim_k + head_dim_v)`` values per layer, on the device of
  its layer. The engine uses f16; quantized types need flash attention, which
  it does not turn on.
- compute buffers: llama.cpp reserves a graph for a 512-token micro-batch; the
  larger of the attention scores (``n_ctx x n_ubatch x n_head`` floats) and the
  logits (``n_ubatch x n_vocab`` floats) sets its size. On the CPU, the
  attention product also converts those scores to f16 in a work buffer.
- a fixed allowance for the runtime (threads, allocator) and, per GPU, the
  CUDA context.
- a vision model's projector (``projector_bytes``): its file, loaded whole by
  mtmd on the GPU when the model has layers there, else in RAM, plus a quarter
  again for its encoder's compute buffer (not measured: an allowance).

Measured (``bench/estimate.py``, the starter model and a synthetic F16 model
of another shape): within 1% of the buffer sizes llama.cpp logs, and within 4%
of the RSS growth of a replica that filled a context of 2048 tokens or more.
Smaller contexts come out above the RSS (up to half again at 512 tokens):
llama.cpp reserves room for 512 rows of logits that a chat never fills.
Reserving too much is the safe side. The GPU figures
follow the same rules but are not measured here (no GPU on the dev box).

Sliding-window attention and KV sharing, which some architectures use to save
memory, are not modelled: for those the KV estimate is an upper bound.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from nodes.errors import ModelLoadFailed

GGUF_MAGIC = b"GGUF"
MIB = 1024**2

N_UBATCH = 512  # llama.cpp's default micro-batch; the graph is reserved for it
N_CTX_PAD = 256  # llama.cpp rounds the context up to a multiple of this
RUNTIME_OVERHEAD = 16 * MIB  # threads, allocator, buffers outside llama.cpp's accounting
GPU_OVERHEAD = 512 * MIB  # CUDA context, cuBLAS workspace, fragmentation (per GPU)
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

    @property
    def weights_bytes(self) -> int:
        """Bytes of all tensors (what llama.cpp maps when nothing is offloaded)."""
        return self.input_bytes + sum(self.layer_bytes) + self.output_bytes

    def kv_bytes_per_token(self, layer: int, kv_type: str = "f16") -> float:
        per_value = KV_TYPES[kv_type]
        return self.n_head_kv[layer] * (self.head_dim_k + self.head_dim_v) * per_value

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
    compute_ram: int  # llama.cpp's compute and output buffers in RAM
    compute_vram: int
    work_ram: int  # the CPU backend's scratch (f16 attention scores), outside llama.cpp's log
    overhead_ram: int
    overhead_vram: int

    @property
    def ram(self) -> int:
        return self.weights_ram + self.kv_ram + self.compute_ram + self.work_ram + self.overhead_ram

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
    )


def _shown(f) -> Any:
    """A header value as /api/show gives it: scalars and short arrays; None for long ones."""
    if len(f.data) > 16 and len(f.types) > 1:  # an array of more than 16 items
        return None
    return f.contents()


def estimate_memory(
    info: GgufInfo,
    n_ctx: int,
    *,
    gpu_layers: int = 0,
    kv_type: str = "f16",
    n_ubatch: int = N_UBATCH,
    gpus: int = 1,
) -> MemoryEstimate:
    """RAM and VRAM of one replica of ``info`` (see the module docstring)."""
    if kv_type not in KV_TYPES:
        raise ValueError(f"unknown KV-cache type {kv_type!r}; use one of {', '.join(KV_TYPES)}")
    n = info.n_layers
    gpu_layers = max(0, min(gpu_layers, n + 1))
    first_gpu = n + 1 - gpu_layers  # layers from here on are offloaded; the head is layer n
    on_gpu = [i >= first_gpu for i in range(n)]
    head_on_gpu = gpu_layers > 0
    all_on_gpu = gpu_layers == n + 1
    cells = -(-n_ctx // N_CTX_PAD) * N_CTX_PAD

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

    kv = [int(cells * info.kv_bytes_per_token(i, kv_type)) for i in range(n)]
    kv_vram = sum(b for b, g in zip(kv, on_gpu, strict=True) if g)
    kv_ram = sum(kv) - kv_vram

    b = min(n_ubatch, cells)
    attention = 4 * b * (1 + 4 * info.n_embd + cells * (1 + info.n_head))
    logits = 4 * b * (info.n_embd + info.n_vocab)
    graph = max(attention, logits)
    f16_scores = 2 * b * cells * info.n_head  # the CPU's work buffer for softmax(KQ) @ V
    output = 4 * info.n_vocab
    if not head_on_gpu:
        compute_ram, compute_vram, work_ram = graph + output, 0, f16_scores
    elif all_on_gpu:
        compute_ram, compute_vram, work_ram = 4 * b * info.n_embd + output, graph, 0
    else:  # blocks on both sides; the logits on the GPU with the head
        compute_ram, compute_vram, work_ram = attention + output, graph, f16_scores
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
    )


def fit_gpu_layers(
    info: GgufInfo,
    n_ctx: int,
    vram_budget: int,
    *,
    kv_type: str = "f16",
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
            return estimate_memory(info, n_ctx, gpu_layers=layers, kv_type=kv_type, gpus=gpus)

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

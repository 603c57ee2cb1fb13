"""How close is Corral's memory estimate (nodes/gguf.py) to the buffers llama.cpp allocates?

For each model and each shape of the grid, opens ONE llama.cpp context the way
the engine does (``nodes.engine.context_shape``: ``n_ctx`` cells in one unified
KV cache, ``n_seq_max`` = parallel + 1, ``n_batch``/``n_ubatch``, the KV-cache
type, flash attention on or off, ``swa_full`` off, embeddings off at creation),
through llama-cpp-python's low-level API in a fresh child process, and reads the
sizes llama.cpp logs for its model, KV, compute and output buffers (a
``llama_log_set`` callback). Compared with ``estimate_memory`` for the same
shape, CPU only: its weights, KV, compute and output buffers.

Models: the starter model, and with --synthetic GGUFs written with
``gguf.GGUFWriter`` (random F16 weights, the starter model's tokenizer padded
out where the vocabulary is larger):

  llama-gqa      llama, 8 blocks, n_embd 1024, 16 heads over 4 KV heads
  gemma3-256k    gemma3, 18 blocks, vocabulary 262,144, head size 256, 1 KV
                 head, sliding window 512 on 5 of every 6 layers, tied head
  gemma2-swa     gemma2, 12 blocks, window 1024 on every other layer, attention
                 and final-logit soft-capping
  qwen3moe       qwen3moe, 8 blocks, 32 experts (4 used), head size 128
  llama-embed    llama with a pooling type: an embedding model, whose batches
                 are as large as its context

Grid (each model): n_ctx from --ctx (2048 and 8192), parallel 1 and 4 (with 4,
the KV cache unified and split per slot: ``unified_kv``), and (flash attention,
KV type) = (off, f16), (on, f16), (on, q8_0); llama.cpp refuses a quantized V
cache without flash attention. Extra buffer types are off (the
estimate counts plain CPU buffers; the repacked ones are the same size).

Target: every row's total within +-10% of llama.cpp's, and each of the KV and
compute + output columns too.

Results go to bench/results/estimate-<time>.json.

Run: .venv/bin/python bench/estimate.py [--synthetic] [--ctx 2048 8192] [--model PATH]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nodes.engine import LlamaSettings, context_shape  # noqa: E402
from nodes.gguf import MIB, GgufInfo, estimate_memory, read_gguf  # noqa: E402
from nodes.models import starter_model_path  # noqa: E402

CONTEXTS = (2048, 8192)
PARALLEL = (1, 4)
ATTENTION = (("off", "f16"), ("on", "f16"), ("on", "q8_0"))
TOLERANCE = 0.10
KV_GGML_TYPES = {"f16": 1, "q4_0": 2, "q8_0": 8}  # ggml_type
FLASH_ATTN_TYPES = {"auto": -1, "off": 0, "on": 1}  # llama_flash_attn_type
BUFFER_LINE = re.compile(r"\b(model|KV|compute|output) buffer size\s*=\s*([0-9.]+) MiB")


# -- the measurement (in a child process) -------------------------------------------------


def open_context(args: dict[str, Any]) -> dict[str, Any]:
    """Child: load ``args["path"]`` and open one context of the given shape; return the
    buffer sizes (MiB) llama.cpp logged, summed over devices and buffer types."""
    import llama_cpp

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    mp = llama_cpp.llama_model_default_params()
    mp.n_gpu_layers = 0
    mp.use_extra_bufts = False  # plain CPU buffers, and no AMX crash (nodes/cpu_kernels.py)
    model = llama_cpp.llama_model_load_from_file(args["path"].encode(), mp)
    if not model:
        return {"error": "llama.cpp could not load the model", "log": lines[-5:]}
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx = args["n_ctx"]
    cp.n_seq_max = args["n_seq_max"]
    cp.n_batch = args["n_batch"]
    cp.n_ubatch = args["n_ubatch"]
    cp.kv_unified = args["unified_kv"]
    cp.swa_full = False
    cp.embeddings = False
    cp.n_threads = cp.n_threads_batch = 1
    cp.type_k = cp.type_v = KV_GGML_TYPES[args["kv"]]
    cp.flash_attn_type = FLASH_ATTN_TYPES[args["flash_attn"]]
    if args["pooled"] is not None:
        cp.pooling_type = args["pooled"]
    ctx = llama_cpp.llama_init_from_model(model, cp)
    text = "".join(lines)
    if not ctx:
        tail = [line for line in text.splitlines() if line.strip()][-3:]
        return {"error": "llama.cpp could not open the context: " + " | ".join(tail)}
    sizes = dict.fromkeys(("model", "KV", "compute", "output"), 0.0)
    for kind, size in BUFFER_LINE.findall(text):
        sizes[kind] += float(size)
    flash = re.search(r"flash_attn\s*=\s*(\w+)", text)
    return {
        "buffers_mib": sizes,
        "n_ctx": llama_cpp.llama_n_ctx(ctx),
        "flash_attn": flash.group(1) if flash else None,
        "kv_cells": [
            int(n) for n in re.findall(r"size =\s*\d+(?:\.\d+)? MiB \(\s*(\d+) cells", text)
        ],
    }


def measure_in_child(args: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0 or not proc.stdout.strip():
        tail = proc.stderr.strip().splitlines()[-3:]
        return {"error": f"the child exited with {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- synthetic models ------------------------------------------------------------------------


@dataclass(frozen=True)
class Synthetic:
    """A model shape to write with random F16 weights."""

    label: str
    arch: str
    n_layers: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int = 0  # 0: the tokenizer's own
    tied: bool = False  # no output.weight: the head is the token embeddings
    qk_norm: bool = False  # attn_q_norm / attn_k_norm (gemma3, qwen3)
    post_norms: bool = False  # gemma2/3's post-attention and post-FFN norms
    n_expert: int = 0
    n_expert_used: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)  # under "<arch>."


SYNTHETIC = (
    Synthetic("llama-gqa", "llama", 8, 1024, 16, 4, 64, 2816),
    Synthetic(
        "gemma3-256k", "gemma3", 18, 640, 4, 1, 256, 2048, n_vocab=262144, tied=True,
        qk_norm=True, post_norms=True, metadata={"attention.sliding_window": 512},
    ),
    Synthetic(
        "gemma2-swa", "gemma2", 12, 768, 8, 4, 128, 2048, tied=True, post_norms=True,
        metadata={
            "attention.sliding_window": 1024,
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
        },
    ),
    Synthetic(
        "qwen3moe", "qwen3moe", 8, 1024, 16, 4, 128, 0, qk_norm=True,
        n_expert=32, n_expert_used=4, metadata={"expert_feed_forward_length": 384},
    ),
    Synthetic(
        "llama-embed", "llama", 6, 768, 12, 12, 64, 2048, metadata={"pooling_type": 1},
    ),
)  # fmt: skip


def write_synthetic(dest: Path, shape: Synthetic, like: Path) -> Path:
    """``shape`` as a GGUF with F16 random weights and ``like``'s tokenizer (padded with
    unused tokens up to ``shape.n_vocab``)."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(like)
    tokens = list(reader.fields["tokenizer.ggml.tokens"].contents())
    kinds = list(reader.fields["tokenizer.ggml.token_type"].contents())
    n_vocab = shape.n_vocab or len(tokens)
    for i in range(len(tokens), n_vocab):
        tokens.append(f"<unused{i}>")
        kinds.append(int(gguf.TokenType.UNUSED))
    w = gguf.GGUFWriter(dest, shape.arch)
    w.add_name(f"corral synthetic {shape.label}")
    w.add_block_count(shape.n_layers)
    w.add_context_length(32768)
    w.add_embedding_length(shape.n_embd)
    w.add_feed_forward_length(shape.n_ff or 4 * shape.n_embd)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_key_length(shape.head_dim)
    w.add_value_length(shape.head_dim)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(shape.head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    if shape.n_expert:
        w.add_expert_count(shape.n_expert)
        w.add_expert_used_count(shape.n_expert_used)
    for key, value in shape.metadata.items():
        name = f"{shape.arch}.{key}"
        if isinstance(value, float):
            w.add_float32(name, value)
        else:
            w.add_uint32(name, value)
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer.") or key in ("tokenizer.chat_template",):
            continue
        if key == "tokenizer.ggml.tokens":
            w.add_token_list(tokens)
        elif key == "tokenizer.ggml.token_type":
            w.add_token_types(kinds)
        else:
            vtype = f.types[0]
            sub_type = f.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(key, f.contents(), vtype, sub_type=sub_type)

    rng = np.random.default_rng(0)

    def matrix(*shape_: int) -> np.ndarray:  # numpy order: llama.cpp's ne reversed
        return (rng.standard_normal(shape_, dtype=np.float32) * 0.02).astype(np.float16)

    def norm(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    e, d = shape.n_embd, shape.head_dim
    q_dim, kv_dim = shape.n_head * d, shape.n_head_kv * d
    w.add_tensor("token_embd.weight", matrix(n_vocab, e))
    for i in range(shape.n_layers):
        blk = f"blk.{i}."
        w.add_tensor(blk + "attn_norm.weight", norm(e))
        w.add_tensor(blk + "attn_q.weight", matrix(q_dim, e))
        w.add_tensor(blk + "attn_k.weight", matrix(kv_dim, e))
        w.add_tensor(blk + "attn_v.weight", matrix(kv_dim, e))
        w.add_tensor(blk + "attn_output.weight", matrix(e, q_dim))
        if shape.qk_norm:
            w.add_tensor(blk + "attn_q_norm.weight", norm(d))
            w.add_tensor(blk + "attn_k_norm.weight", norm(d))
        if shape.post_norms:
            w.add_tensor(blk + "post_attention_norm.weight", norm(e))
            w.add_tensor(blk + "post_ffw_norm.weight", norm(e))
        w.add_tensor(blk + "ffn_norm.weight", norm(e))
        if shape.n_expert:
            ff = shape.metadata["expert_feed_forward_length"]
            w.add_tensor(blk + "ffn_gate_inp.weight", matrix(shape.n_expert, e))
            w.add_tensor(blk + "ffn_gate_exps.weight", matrix(shape.n_expert, ff, e))
            w.add_tensor(blk + "ffn_up_exps.weight", matrix(shape.n_expert, ff, e))
            w.add_tensor(blk + "ffn_down_exps.weight", matrix(shape.n_expert, e, ff))
        else:
            w.add_tensor(blk + "ffn_gate.weight", matrix(shape.n_ff, e))
            w.add_tensor(blk + "ffn_up.weight", matrix(shape.n_ff, e))
            w.add_tensor(blk + "ffn_down.weight", matrix(e, shape.n_ff))
    w.add_tensor("output_norm.weight", norm(e))
    if not shape.tied:
        w.add_tensor("output.weight", matrix(n_vocab, e))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dest


# -- driver --------------------------------------------------------------------------------


def ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def within(r: float | None) -> bool:
    return r is not None and abs(r - 1) <= TOLERANCE


def measure(
    label: str, info: GgufInfo, n_ctx: int, parallel: int, fa: str, kv: str, unified: bool
) -> dict:
    llama = LlamaSettings(flash_attn=fa, kv_cache_type=kv, unified_kv=unified)  # type: ignore[arg-type]
    pooled = info.embedding_model
    shape = context_shape(n_ctx, parallel, llama, pooled=pooled)
    est = estimate_memory(info, n_ctx, parallel=parallel, llama=llama)
    estimated = {
        "model": est.weights_ram / MIB,
        "KV": est.kv_ram / MIB,
        "compute": est.compute_ram / MIB,
        "output": est.output_ram / MIB,
    }
    args = {
        "path": info.path,
        "n_ctx": shape.n_ctx,
        "n_seq_max": shape.n_seq_max,
        "n_batch": shape.n_batch,
        "n_ubatch": shape.n_ubatch,
        "kv": kv,
        "flash_attn": fa,
        "unified_kv": unified,
        "pooled": 1 if pooled else None,  # the engine's MEAN where the GGUF names none
    }
    real = measure_in_child(args)
    got = real.get("buffers_mib", {})
    row: dict[str, Any] = {
        "model": label,
        "n_ctx": n_ctx,
        "parallel": parallel,
        "flash_attn": fa,
        "kv_cache_type": kv,
        "unified_kv": unified,
        "shape": asdict(shape),
        "estimate": asdict(est),
        "estimate_mib": estimated,
        "llamacpp": real,
    }
    if got:
        total_est, total_real = sum(estimated.values()), sum(got.values())
        row["total_ratio"] = ratio(total_est, total_real)
        row["kv_ratio"] = ratio(estimated["KV"], got["KV"])
        row["compute_ratio"] = ratio(
            estimated["compute"] + estimated["output"], got["compute"] + got["output"]
        )
        row["within"] = all(
            within(row[k]) or (k == "kv_ratio" and got["KV"] == estimated["KV"] == 0)
            for k in ("total_ratio", "kv_ratio", "compute_ratio")
        )
    else:
        row["within"] = False
    return row


COLUMNS = [  # header, format of a value (the header sets the width)
    ("model      ", "{:11s}"),
    ("n_ctx", "{:>5d}"),
    ("par", "{:>3d}"),
    ("fa ", "{:>3s}"),
    ("kv  ", "{:>4s}"),
    ("uni", "{:>3s}"),
    ("KV est", "{:>6.1f}"),
    ("KV l.c", "{:>6.1f}"),
    ("cmp+out est", "{:>11.1f}"),
    ("cmp+out l.c", "{:>11.1f}"),
    ("total est", "{:>9.1f}"),
    ("total l.c", "{:>9.1f}"),
    ("KV/", "{:>5.3f}"),
    ("cmp/ ", "{:>5.3f}"),
    ("total/", "{:>6.3f}"),
    ("±10%", "{:>4s}"),
]


def cell(fmt: str, value) -> str:
    width = int(re.search(r"(\d+)", fmt).group(1))
    return "-".rjust(width) if value is None else fmt.format(value)


def print_row(row: dict) -> None:
    est, got = row["estimate_mib"], row["llamacpp"].get("buffers_mib", {})
    values = [
        row["model"],
        row["n_ctx"],
        row["parallel"],
        row["flash_attn"],
        row["kv_cache_type"],
        "yes" if row["unified_kv"] else "no",
        est["KV"],
        got.get("KV"),
        est["compute"] + est["output"],
        (got["compute"] + got["output"]) if got else None,
        sum(est.values()),
        sum(got.values()) if got else None,
        row.get("kv_ratio"),
        row.get("compute_ratio"),
        row.get("total_ratio"),
        "yes" if row["within"] else "NO",
    ]
    print(" ".join(cell(fmt, v) for (_, fmt), v in zip(COLUMNS, values, strict=True)), flush=True)
    if "error" in row["llamacpp"]:
        print(f"    llama.cpp: {row['llamacpp']['error']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="a GGUF file (default: the starter model)")
    parser.add_argument("--ctx", type=int, nargs="+", default=list(CONTEXTS), metavar="N_CTX")
    parser.add_argument("--parallel", type=int, nargs="+", default=list(PARALLEL))
    parser.add_argument("--synthetic", action="store_true", help="also measure generated GGUFs")
    parser.add_argument("--only", nargs="+", help="only the synthetic models with these labels")
    parser.add_argument(
        "--keep", type=Path, help="write the synthetic GGUFs here, and reuse them (default: temp)"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(open_context(json.loads(args.child))))
        return

    models: list[tuple[str, Path]] = [
        ("model", args.model) if args.model else ("starter", starter_model_path())
    ]
    tmp = tempfile.TemporaryDirectory(prefix="corral-estimate-")
    rows = []
    infos: dict[str, GgufInfo] = {}
    try:
        if args.synthetic:
            for shape in SYNTHETIC:
                if args.only and shape.label not in args.only:
                    continue
                path = (args.keep or Path(tmp.name)) / f"{shape.label}.gguf"
                if path.exists():
                    print(f"reusing {path}", flush=True)
                    models.append((shape.label, path))
                    continue
                path.parent.mkdir(parents=True, exist_ok=True)
                started = time.perf_counter()
                write_synthetic(path, shape, starter_model_path())
                print(f"wrote {shape.label} ({path.stat().st_size / MIB:.0f} MiB) in "
                      f"{time.perf_counter() - started:.1f} s", flush=True)  # fmt: skip
                models.append((shape.label, path))
        for label, path in models:
            info = read_gguf(path)
            infos[label] = info
            print(f"{label}: {info.describe()}, vocabulary {info.n_vocab}, "
                  f"{info.weights_bytes / MIB:.1f} MiB weights")  # fmt: skip
        print("\nMiB; est: estimate_memory, l.c: llama.cpp's logged buffers; cpu only\n")
        print(" ".join(header for header, _ in COLUMNS), flush=True)
        for label, _ in models:
            for n_ctx in args.ctx:
                for parallel in args.parallel:
                    for unified in (True, False) if parallel > 1 else (True,):
                        for fa, kv in ATTENTION:
                            row = measure(label, infos[label], n_ctx, parallel, fa, kv, unified)
                            rows.append(row)
                            print_row(row)
    finally:
        tmp.cleanup()

    import gguf
    import llama_cpp

    failed = [r for r in rows if not r["within"]]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} rows within ±{TOLERANCE:.0%}")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"estimate-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(
        json.dumps(
            {
                "command": " ".join(sys.argv),
                "tolerance": TOLERANCE,
                "cpu_count": os.cpu_count(),
                "llama_cpp_python": llama_cpp.__version__,
                "gguf": getattr(gguf, "__version__", None),
                "models": {
                    label: {
                        **{k: v for k, v in asdict(info).items() if k != "metadata"},
                        "weights_bytes": info.weights_bytes,
                    }
                    for label, info in infos.items()
                },
                "results": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

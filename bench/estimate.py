"""How close is Corral's memory estimate (nodes/gguf.py) to what llama.cpp really uses?

For a GGUF model (the starter model unless --model says otherwise) and each
context length (512, 1024, 2048, 4096 and 8192 unless --ctx says otherwise),
compares ``estimate_memory`` (CPU only, f16 KV cache) with two measurements,
each taken in a fresh process so that nothing else lives in it:

  llama.cpp buffers  the model, KV, compute and output buffer sizes llama.cpp
                     logs while it loads the model (a verbose llama_cpp.Llama,
                     its stderr parsed). Like with like: compared to the
                     estimate's weights + KV + compute_ram.
  RSS growth         a process's peak resident memory minus its RSS just
                     before it constructs Corral's LlamaCppEngine, after the
                     engine has loaded, filled the context to n_ctx - 40
                     tokens and generated 16 tokens greedily. Compared to the
                     estimate's ram, which adds the CPU backend's work buffer
                     and a runtime allowance to the buffers.

Target: each ratio within +-10%. Expect small contexts to come out above the
RSS: llama.cpp reserves its compute buffer for 512 rows of logits, which a chat
that samples one token at a time never touches, so those pages never become
resident. The estimate keeps that reserve (it is the safe side).

--synthetic also writes, with gguf.GGUFWriter, a llama-architecture GGUF of
another shape (8 blocks, n_embd 1024, 16 heads, 4 KV heads, F16 random
weights, its own output head, the starter model's tokenizer) to a temporary
directory and measures it the same way.

Results go to bench/results/estimate-<time>.json.

Run: .venv/bin/python bench/estimate.py [--ctx 512 4096] [--model PATH] [--synthetic]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nodes.gguf import MIB, GgufInfo, MemoryEstimate, estimate_memory, read_gguf  # noqa: E402
from nodes.models import starter_model_path  # noqa: E402

CONTEXTS = (512, 1024, 2048, 4096, 8192)
NEW_TOKENS = 16
ROOM = 40  # the prompt fills the context up to n_ctx - ROOM tokens
TOLERANCE = 0.10
FILLER = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, lit the great "
    "lamp, wound the clockwork that turned the lens, and wrote the weather, the ships he "
    "saw and the state of the sea in a leather-bound log that nobody else ever read. "
)

# A verbose load in a fresh interpreter: llama.cpp logs its buffer sizes to stderr. Without
# extra buffer types (AMX, repack), as the estimate counts (see tests/unit/test_gguf.py).
LOAD_VERBOSE = (
    "import sys, llama_cpp; from nodes.cpu_kernels import extra_bufts\n"
    "with extra_bufts(False): "
    "llama_cpp.Llama(sys.argv[1], n_ctx=int(sys.argv[2]), n_threads=int(sys.argv[3]), "
    "verbose=True)"
)
BUFFER_LINE = re.compile(r"\b(model|KV|compute|output) buffer size\s*=\s*([0-9.]+) MiB")
CONTEXT_LINE = re.compile(r"llama_context: n_ctx\s*=\s*(\d+)")
FLASH_LINE = re.compile(r"llama_context: flash_attn\s*=\s*(\w+)")


# -- measurements (each in a child process) ----------------------------------------------


def llamacpp_buffers(path: str, n_ctx: int, threads: int) -> dict:
    """The buffer sizes (MiB) llama.cpp logs when it loads ``path`` with ``n_ctx``."""
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_VERBOSE, path, str(n_ctx), str(threads)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:]
        return {"error": f"llama.cpp exited with {proc.returncode}: {' | '.join(tail)}"}
    sizes = dict.fromkeys(("model", "KV", "compute", "output"), 0.0)
    for kind, size in BUFFER_LINE.findall(proc.stderr):
        sizes[kind] += float(size)  # summed over devices and buffer types
    n_ctx_run = CONTEXT_LINE.search(proc.stderr)
    flash = FLASH_LINE.search(proc.stderr)
    return {
        "buffers_mib": sizes,
        "total_mib": sum(sizes.values()),
        "n_ctx": int(n_ctx_run.group(1)) if n_ctx_run else None,
        "flash_attn": flash.group(1) if flash else None,
    }


def _rss_worker(conn, path: str, n_ctx: int, threads: int) -> None:
    try:
        conn.send(measure_rss(path, n_ctx, threads))
    except BaseException as exc:  # noqa: BLE001 - reported in the table, not raised
        conn.send({"error": f"{type(exc).__name__}: {exc}"})


def measure_rss(path: str, n_ctx: int, threads: int) -> dict:
    """Child process: RSS around one engine that fills its context and generates."""
    import gc
    import threading

    import psutil

    from nodes.engine import EngineSpec, Finished, GenerateRequest, SamplingParams
    from nodes.llamacpp import LlamaCppEngine

    proc = psutil.Process()
    gc.collect()
    before = proc.memory_info().rss
    started = time.perf_counter()
    engine = LlamaCppEngine(EngineSpec(model="bench", path=path, n_ctx=n_ctx, n_threads=threads))
    loaded = proc.memory_info().rss
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, seed=0)
    unit = engine.encode(GenerateRequest(prompt=FILLER, params=params))
    target = engine.info.n_ctx - ROOM
    tokens = (unit * (target // len(unit) + 1))[:target]  # the content does not matter
    events = list(engine.generate(tokens, params, threading.Event()))
    done = events[-1]
    assert isinstance(done, Finished)
    after = proc.memory_info().rss
    peak = max(peak_rss(), after)
    return {
        "n_ctx": engine.info.n_ctx,
        "rss_before": before,
        "rss_loaded": loaded,
        "rss_after": after,
        "rss_peak": peak,
        "growth_mib": (peak - before) / MIB,
        "load_growth_mib": (loaded - before) / MIB,
        "prompt_tokens": done.usage.prompt_tokens,
        "completion_tokens": done.usage.completion_tokens,
        "finish_reason": done.reason,
        "load_s": engine.info.load_seconds,
        "prompt_s": done.timings.prompt,
        "generation_s": done.timings.generation,
        "wall_s": time.perf_counter() - started,
    }


def peak_rss() -> int:
    """This process's peak RSS in bytes (0 where unknown).

    VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over exec, so a
    spawned child would report its parent's size at the fork.
    """
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return 0
    found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    return int(found.group(1)) * 1024 if found else 0


def rss_in_child(path: str, n_ctx: int, threads: int) -> dict:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_rss_worker, args=(child, path, n_ctx, threads))
    proc.start()
    child.close()
    try:
        result = parent.recv()
    except EOFError:
        result = {"error": "the measuring process died"}
    proc.join(60)
    if proc.exitcode not in (0, None) and "error" not in result:
        result["error"] = f"the measuring process exited with {proc.exitcode}"
    return result


# -- the synthetic model -------------------------------------------------------------------


def write_synthetic(
    dest: Path,
    like: Path,
    *,
    n_layers: int = 8,
    n_embd: int = 1024,
    n_head: int = 16,
    n_head_kv: int = 4,
    n_ff: int = 2816,
    n_ctx_train: int = 8192,
) -> Path:
    """A llama-architecture GGUF with F16 random weights and ``like``'s tokenizer."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(like)
    n_vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    w = gguf.GGUFWriter(dest, "llama")
    w.add_name("corral synthetic llama")
    w.add_block_count(n_layers)
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            vtype = field.types[0]
            sub_type = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(key, field.contents(), vtype, sub_type=sub_type)

    rng = np.random.default_rng(0)

    def matrix(rows: int, cols: int) -> np.ndarray:  # llama.cpp's ne = (cols, rows)
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)

    def norm() -> np.ndarray:
        return np.ones(n_embd, dtype=np.float32)

    kv_dim = n_embd // n_head * n_head_kv
    w.add_tensor("token_embd.weight", matrix(n_vocab, n_embd))
    for i in range(n_layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", norm())
        w.add_tensor(f"blk.{i}.attn_q.weight", matrix(n_embd, n_embd))
        w.add_tensor(f"blk.{i}.attn_k.weight", matrix(kv_dim, n_embd))
        w.add_tensor(f"blk.{i}.attn_v.weight", matrix(kv_dim, n_embd))
        w.add_tensor(f"blk.{i}.attn_output.weight", matrix(n_embd, n_embd))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", norm())
        w.add_tensor(f"blk.{i}.ffn_gate.weight", matrix(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_up.weight", matrix(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_down.weight", matrix(n_embd, n_ff))
    w.add_tensor("output_norm.weight", norm())
    w.add_tensor("output.weight", matrix(n_vocab, n_embd))
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


def measure(label: str, path: str, info: GgufInfo, n_ctx: int, threads: int) -> dict:
    est: MemoryEstimate = estimate_memory(info, n_ctx)
    est_buffers = (est.weights_ram + est.kv_ram + est.compute_ram) / MIB
    row: dict = {
        "model": label,
        "path": path,
        "n_ctx": n_ctx,
        "estimate": asdict(est),
        "estimate_buffers_mib": est_buffers,
        "estimate_ram_mib": est.ram / MIB,
    }
    row["llamacpp"] = llamacpp_buffers(path, n_ctx, threads)
    row["rss"] = rss_in_child(path, n_ctx, threads)
    row["buffers_ratio"] = ratio(est_buffers, row["llamacpp"].get("total_mib", 0))
    row["rss_ratio"] = ratio(est.ram / MIB, row["rss"].get("growth_mib", 0))
    row["buffers_within"] = within(row["buffers_ratio"])
    row["rss_within"] = within(row["rss_ratio"])
    return row


COLUMNS = [  # header, format of a value (the header sets the width)
    ("model    ", "{:9s}"),
    ("n_ctx", "{:>5d}"),
    ("est buf MiB", "{:>11.1f}"),
    ("llama.cpp MiB", "{:>13.1f}"),
    ("est/buf", "{:>7.3f}"),
    ("est RAM MiB", "{:>11.1f}"),
    ("RSS growth MiB", "{:>14.1f}"),
    ("est/RSS", "{:>7.3f}"),
    ("±10% buf/RSS", "{:>12s}"),
]


def cell(fmt: str, value) -> str:
    width = int(re.search(r"(\d+)", fmt).group(1))
    return "-".rjust(width) if value is None else fmt.format(value)


def print_row(row: dict) -> None:
    yes = {True: "yes", False: "no"}
    values = [
        row["model"],
        row["n_ctx"],
        row["estimate_buffers_mib"],
        row["llamacpp"].get("total_mib"),
        row["buffers_ratio"],
        row["estimate_ram_mib"],
        row["rss"].get("growth_mib"),
        row["rss_ratio"],
        f"{yes[row['buffers_within']]}/{yes[row['rss_within']]}",
    ]
    print(" ".join(cell(fmt, v) for (_, fmt), v in zip(COLUMNS, values, strict=True)), flush=True)
    for what in ("llamacpp", "rss"):
        if "error" in row[what]:
            print(f"    {what}: {row[what]['error']}", flush=True)
    ran_with = row["llamacpp"].get("n_ctx")
    if ran_with and ran_with != row["n_ctx"]:
        print(f"    llama.cpp ran with n_ctx {ran_with}", flush=True)


def main() -> None:
    from nodes.llamacpp import default_threads

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="a GGUF file (default: the starter model)")
    parser.add_argument("--ctx", type=int, nargs="+", default=list(CONTEXTS), metavar="N_CTX")
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument(
        "--synthetic", action="store_true", help="also measure a generated llama GGUF"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    models = [("model", args.model) if args.model else ("starter", starter_model_path())]
    tmp = tempfile.TemporaryDirectory(prefix="corral-estimate-")
    if args.synthetic:
        started = time.perf_counter()
        path = write_synthetic(Path(tmp.name) / "synthetic-llama-f16.gguf", starter_model_path())
        print(f"wrote {path} ({path.stat().st_size / MIB:.0f} MiB) in "
              f"{time.perf_counter() - started:.1f} s", flush=True)  # fmt: skip
        models.append(("synthetic", path))

    print(
        f"threads={args.threads} new_tokens={NEW_TOKENS} prompt=n_ctx-{ROOM} kv=f16 cpu only",
        flush=True,
    )
    infos = {}
    for label, path in models:
        info = read_gguf(path)
        infos[label] = info
        print(f"{label}: {path} — {info.describe()}, {info.weights_bytes / MIB:.2f} MiB weights")
    print()
    print(" ".join(header for header, _ in COLUMNS), flush=True)
    rows = []
    try:
        for label, path in models:
            for n_ctx in args.ctx:
                row = measure(label, str(path), infos[label], n_ctx, args.threads)
                rows.append(row)
                print_row(row)
    finally:
        tmp.cleanup()

    import gguf
    import llama_cpp

    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"estimate-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(
        json.dumps(
            {
                "threads": args.threads,
                "new_tokens": NEW_TOKENS,
                "prompt_room": ROOM,
                "tolerance": TOLERANCE,
                "cpu_count": os.cpu_count(),
                "llama_cpp_python": llama_cpp.__version__,
                "gguf": getattr(gguf, "__version__", None),
                "models": {
                    label: {**asdict(info), "weights_bytes": info.weights_bytes}
                    for label, info in infos.items()
                },
                "results": rows,
            },
            indent=2,
        )
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

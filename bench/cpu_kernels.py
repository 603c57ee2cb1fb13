"""How fast does the installed llama.cpp decode with its extra buffer types on and off?

llama.cpp may keep a CPU model's weights in "extra buffer types": Intel AMX tiles
and the repacked layouts of the AVX2/AVX-512 kernels (nodes/cpu_kernels.py picks
them per box; issue 15: GCC 12's AMX build segfaults). This measures, with the
llama-cpp-python installed in this virtualenv, for the starter model (Q4_1) and a
Q4_0 requantisation of it (repack kernels exist for Q4_0, not for Q4_1; AMX takes
both), each with ``use_extra_bufts`` on and off:

  prompt   tokens/s of one --prompt-token batch (the kind of batch that crashed)
  decode   tokens/s of --tokens greedy tokens, one at a time after that prompt, as
           llama-bench's tg test: EOS does not stop it, sampling is an argmax

Each variant runs in a child process (--threads threads, --reps repetitions; the
median, as a busy box slows a repetition now and then, and the standard
deviation), so a crash is reported as "crashed: SIGSEGV" and the next variant
still runs. Corral's own choice for this
box (``cpu_kernels.current()``) is printed above the table.

Results go to bench/results/cpu_kernels-<time>.json (or --json PATH).

Run: .venv/bin/python bench/cpu_kernels.py [--threads 2 --tokens 128 --reps 3]
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _cluster import write_results  # noqa: E402

from nodes import cpu_kernels  # noqa: E402
from nodes.models import starter_model_path  # noqa: E402

PROMPT = "The lighthouse keeper climbed the spiral stairs every evening at dusk. " * 16

# Runs in a child: load with use_extra_bufts as told, then time a prompt and greedy decode.
MEASURE = r"""
import json, sys, time
import numpy as np
import llama_cpp
from nodes.cpu_kernels import extra_bufts
path, on, threads, n_prompt, n_gen, reps = sys.argv[1:7]
threads, n_prompt, n_gen, reps = int(threads), int(n_prompt), int(n_gen), int(reps)
with extra_bufts(on == "on"):
    llm = llama_cpp.Llama(path, n_ctx=n_prompt + n_gen + 8, n_batch=n_prompt,
                          n_threads=threads, n_threads_batch=threads, verbose=False)
prompt = llm.tokenize(sys.argv[7].encode())[:n_prompt]
n_vocab = llm.n_vocab()

def greedy():
    logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return int(np.argmax(np.ctypeslib.as_array(logits, shape=(n_vocab,))))

prompt_tps, decode_tps = [], []
for rep in range(reps + 1):  # the first is a warm-up
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    for _ in range(n_gen):
        llm.eval([greedy()])
    t2 = time.perf_counter()
    if rep:
        prompt_tps.append(len(prompt) / (t1 - t0))
        decode_tps.append(n_gen / (t2 - t1))
print(json.dumps({"prompt_tokens": len(prompt), "prompt_tps": prompt_tps,
                  "decode_tps": decode_tps}))
"""


@dataclass
class Row:
    model: str  # "Q4_1 (starter)", "Q4_0"
    extra_bufts: bool
    kernels: str  # what llama.cpp picks: "AMX+repack", "plain", ...
    outcome: str  # "ok", "crashed: SIGSEGV", "failed: ..."
    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    prompt_tps_sd: float = 0.0
    decode_tps: float = 0.0
    decode_tps_sd: float = 0.0


def requantize(src: Path, dst: Path) -> None:
    """``src`` as Q4_0, with llama.cpp's own quantizer (``--allow-requantize``)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.allow_requantize = True
    params.nthread = 2
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
        raise SystemExit(f"llama_model_quantize failed for {src}")


def measure(model: Path, on: bool, args: argparse.Namespace) -> dict:
    """One variant in a child process: its figures, or how it ended."""
    command = [sys.executable, "-c", MEASURE, str(model), "on" if on else "off"]
    command += [str(args.threads), str(args.prompt_tokens), str(args.tokens), str(args.reps)]
    command.append(PROMPT)
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT
        )
    except subprocess.TimeoutExpired:
        return {"outcome": f"hung: no answer in {args.timeout:.0f} s"}
    if done.returncode < 0:
        return {"outcome": f"crashed: {signal.Signals(-done.returncode).name}"}
    if done.returncode != 0:
        return {"outcome": f"failed: exit {done.returncode}: {done.stderr.strip()[-200:]}"}
    return {"outcome": "ok", **json.loads(done.stdout.strip().splitlines()[-1])}


def row(name: str, on: bool, kernels: str, figures: dict) -> Row:
    r = Row(name, on, kernels if on else "plain", figures["outcome"])
    if figures["outcome"] == "ok":
        r.prompt_tokens = figures["prompt_tokens"]
        r.prompt_tps, r.prompt_tps_sd = median_sd(figures["prompt_tps"])
        r.decode_tps, r.decode_tps_sd = median_sd(figures["decode_tps"])
    return r


def median_sd(values: list[float]) -> tuple[float, float]:
    return statistics.median(values), statistics.stdev(values) if len(values) > 1 else 0.0


def print_table(rows: list[Row]) -> None:
    print(f"\n{'model':<16} {'extra bufts':<12} {'kernels':<24} {'prompt tok/s':>16} "
          f"{'decode tok/s':>16}")  # fmt: skip
    for r in rows:
        if r.outcome != "ok":
            figures = f"{r.outcome:>33}"
        else:
            figures = (f"{r.prompt_tps:>9.1f} ± {r.prompt_tps_sd:<4.1f} "
                       f"{r.decode_tps:>9.1f} ± {r.decode_tps_sd:<4.1f}")  # fmt: skip
        print(f"{r.model:<16} {'on' if r.extra_bufts else 'off':<12} {r.kernels:<24} {figures}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128, help="greedy tokens to decode")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per variant")
    parser.add_argument("--model", type=Path, default=None, help="default: the starter model")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import llama_cpp

    info = cpu_kernels.system_info()
    build = cpu_kernels.BuildFeatures.parse(info)
    model_name, flags = cpu_kernels.cpu_identity()
    in_use, _ = cpu_kernels.kernels_in_use(build, "amx_int8" in flags)
    choice = cpu_kernels.current()
    print(f"CPU: {model_name}; llama-cpp-python {llama_cpp.__version__}")
    print(f"build: {info.strip()}")
    print(f"Corral's choice on this box: {choice.label} ({choice.reason})")

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp:
        starter = args.model or starter_model_path()
        q4_0 = Path(tmp) / "q4_0.gguf"
        requantize(starter, q4_0)
        for name, path in (("Q4_1 (starter)", starter), ("Q4_0", q4_0)):
            for on in (True, False):
                figures = measure(path, on, args)
                rows.append(row(name, on, in_use, figures))
                print(f"  {name}, extra buffer types {'on' if on else 'off'}: {figures['outcome']}")
    print_table(rows)
    write_results(
        ROOT / "bench" / "results",
        "cpu_kernels",
        args.json,
        {
            "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "cpu": model_name,
            "llama_cpp": llama_cpp.__version__,
            "system_info": info,
            "choice": asdict(choice),
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
            | {"model": str(args.model or starter_model_path())},
            "rows": [asdict(r) for r in rows],
        },
    )


if __name__ == "__main__":
    main()

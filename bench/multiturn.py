"""Does a conversation's next turn reuse the cache of its earlier turns?

A simulated homelab of two Ray nodes (``bench/_cluster.py``, one logical CPU each)
runs one ``corral serve``-like Corral with two replicas of the starter model (one
per node, llama.cpp, one thread each, ``parallel: --slots`` where models.yaml has
that field). ``--conversations`` conversations (8) of ``--turns`` turns (6) share a
system prompt of about ``--system-tokens`` tokens (1,500); each has its own
questions, and each turn sends the whole history (system prompt, earlier
questions, the replies the model gave) as a streamed, greedy chat completion of
at most ``--reply-tokens`` tokens. All conversations run at once (``--at-once``),
as a household's users would. Measured:

  turn 1     TTFT of each conversation's first turn: the system prompt may be
             cached (another conversation sent it), its question is not
  turns 2-6  TTFT of the later turns: only the newest question should need
             evaluating, if the replica that holds the conversation serves it
  cold       TTFT of each conversation's last prompt sent again afterwards, one at
             a time on an idle cluster, with its first characters changed
             ("[cold 3] ...") so that no cache holds any of it: a full prefill

The whole run is done twice, each on a fresh cluster: corral.yaml
``prefix_routing: true`` (a conversation goes back to the replica that served it)
and ``prefix_routing: false`` (least-loaded only). Target (issue 16): with prefix
routing on, TTFT p50 of turns 2-6 <= 0.25x the cold prefill's p50. The turns are
measured under the load of all conversations, the cold prefill alone: the
comparison is the harder one for the turns. Results go to
bench/results/multiturn-<time>.json (or --json PATH).

Run: .venv/bin/python bench/multiturn.py                 (a few minutes per setting)
     .venv/bin/python bench/multiturn.py --prefix-routing off --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cluster import SimNode, corral_on, homelab, run_main, write_results  # noqa: E402

from nodes.models import STARTER_MODEL, starter_model_path  # noqa: E402

MODEL = STARTER_MODEL
NODES = [
    SimNode("minipc-n100-ram16g", "head", "box1"),
    SimNode("nas-ram8g", "worker", "box2"),
]
CELLS_PER_SLOT = 4096  # a conversation reaches about 2,100 tokens
TARGET_RATIO = 0.25
RULES = [
    "Answer in plain language and keep each answer short unless asked for detail.",
    "When a question is about cooking, give quantities in grams and millilitres.",
    "When a question is about the garden, say which season the advice is for.",
    "Never invent a phone number, an address or an opening time.",
    "If a question is ambiguous, say which reading you answer.",
    "When asked for a list, give at most five items, most useful first.",
    "Mention safety first when a task involves electricity, gas, ladders or knives.",
    "Prefer what can be done with ordinary household tools and supplies.",
    "When a question concerns children, suggest asking an adult for anything risky.",
    "Use the metric system, and the 24-hour clock for times.",
]
TOPICS = [
    "baking bread at home",
    "growing tomatoes on a balcony",
    "fixing a dripping tap",
    "planning a weekly family menu",
    "keeping a bicycle in good shape",
    "saving energy in winter",
    "starting a compost heap",
    "teaching a child to swim",
]
FOLLOW_UPS = [
    "What do I need before I start?",
    "What is the most common mistake, and how do I avoid it?",
    "How long does it usually take?",
    "Can you give me a simple step-by-step plan?",
    "What should I do if it goes wrong?",
    "Summarise your advice in two sentences.",
]


@dataclass
class Turn:
    """One request: a conversation's turn, or a cold prefill of its last prompt."""

    conversation: int
    turn: int  # 1-based; 0 for the cold prefill
    ttft: float = 0.0
    seconds: float = 0.0
    prompt_chars: int = 0
    error: str | None = None


@dataclass
class Run:
    """One setting's measurements in one round."""

    prefix_routing: bool
    round: int
    turns: list[Turn] = field(default_factory=list)
    cold: list[Turn] = field(default_factory=list)
    wall: float = 0.0


# -- the prompts -------------------------------------------------------------------


def system_prompt(tokens: int) -> tuple[str, int]:
    """A household assistant's instructions of about ``tokens`` tokens (and the count)."""
    from llama_cpp import Llama

    vocab = Llama(str(starter_model_path()), vocab_only=True, verbose=False)
    lines = ["You are the assistant of a household. Follow these rules in every answer."]
    n = 0
    while True:
        rule = RULES[n % len(RULES)]
        lines.append(f"Rule {n + 1}: {rule} (This rule applies in every conversation.)")
        text = "\n".join(lines)
        count = len(vocab.tokenize(text.encode(), add_bos=False))
        if count >= tokens:
            return text, count
        n += 1


def question(conversation: int, turn: int) -> str:
    topic = TOPICS[conversation % len(TOPICS)]
    if turn == 1:
        return f"I would like some help with {topic}. Where should I begin?"
    return FOLLOW_UPS[(turn - 2) % len(FOLLOW_UPS)] + f" (This is about {topic}.)"


# -- the requests ------------------------------------------------------------------


def stream_chat(client: httpx.Client, messages: list[dict], max_tokens: int) -> tuple[Turn, str]:
    """A streamed, greedy chat completion: (its timings, its text)."""
    body = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "seed": 42,
        "stream": True,
    }
    turn = Turn(-1, -1, prompt_chars=sum(len(m["content"]) for m in messages))
    text, first, finished = "", None, False
    started = time.perf_counter()
    try:
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                turn.error = f"HTTP {r.status_code}"
                return turn, ""
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    turn.error = str(data["error"].get("message", "error event"))[:200]
                    return turn, text
                for choice in data.get("choices", []):
                    piece = (choice.get("delta") or {}).get("content") or ""
                    if piece and first is None:
                        first = time.perf_counter()
                    text += piece
                    finished = finished or choice.get("finish_reason") is not None
    except httpx.HTTPError as exc:
        turn.error = f"{type(exc).__name__}: {exc}"
        return turn, text
    turn.seconds = time.perf_counter() - started
    if first is None or not finished:
        turn.error = "no text" if first is None else "no finish reason"
    else:
        turn.ttft = first - started
    return turn, text


def conversation(
    client: httpx.Client, system: str, i: int, args: argparse.Namespace
) -> tuple[list[Turn], list[dict]]:
    """Conversation ``i``, turn by turn: its turns and the history of its last prompt."""
    messages = [{"role": "system", "content": system}]
    turns = []
    for t in range(1, args.turns + 1):
        messages.append({"role": "user", "content": question(i, t)})
        turn, text = stream_chat(client, messages, args.reply_tokens)
        turn.conversation, turn.turn = i, t
        turns.append(turn)
        if t < args.turns:
            messages.append({"role": "assistant", "content": text or "(no answer)"})
    return turns, messages


def cold_prefill(client: httpx.Client, messages: list[dict], i: int, tag: str) -> Turn:
    """``messages`` again with its first characters changed: no cache holds any of it."""
    changed = [{**messages[0], "content": f"[cold {tag} {i}] " + messages[0]["content"]}]
    turn, _ = stream_chat(client, changed + messages[1:], 8)
    turn.conversation, turn.turn = i, 0
    return turn


# -- the cluster -------------------------------------------------------------------


def has_parallel_field() -> bool:
    from cluster.spec import ModelSpec

    return "parallel" in ModelSpec.model_fields


def has_prefix_routing() -> bool:
    from cluster.settings import CorralSettings

    return "prefix_routing" in CorralSettings.model_fields


def model_spec(args: argparse.Namespace):
    from cluster.spec import ModelSpec

    entry = {
        "name": MODEL,
        "source": str(starter_model_path()),
        "context": CELLS_PER_SLOT,
        "threads": 1,
        "replicas": {"min": 2, "max": 2},
        "placement": {"strategy": "spread", "gpu": "never"},
        "keep_alive": -1,
    }
    if has_parallel_field():
        entry.update(parallel=args.slots, context=CELLS_PER_SLOT * args.slots)
    return ModelSpec(**entry)


def deploy_model(args: argparse.Namespace) -> list[str]:
    """Two replicas of the starter model, one per node; the nodes they run on."""
    import ray

    from deployments.actors import CONTROLLER_ACTOR, NAMESPACE

    controller = ray.get_actor(CONTROLLER_ACTOR, namespace=NAMESPACE)
    report = ray.get(controller.apply.remote([model_spec(args)]), timeout=600)
    if report.failed:
        raise RuntimeError(f"the model did not load: {report.failed}")
    nodes = sorted(p.node for p in report.plan.for_model(MODEL))
    if nodes != sorted(n.name for n in NODES):
        raise RuntimeError(f"expected one replica on each node, the planner chose {nodes}")
    return nodes


def run_setting(prefix_routing: bool, rnd: int, system: str, args: argparse.Namespace) -> Run:
    """A fresh cluster with ``prefix_routing``, the conversations, then the cold prefills."""
    run = Run(prefix_routing, rnd)
    settings = {"num_ctx": CELLS_PER_SLOT}
    if has_prefix_routing():
        settings["prefix_routing"] = prefix_routing
    label = f"prefix routing {'on' if prefix_routing else 'off'}"
    started = time.monotonic()
    with homelab(NODES) as lab, corral_on(lab, **settings) as running:
        deploy_model(args)
        print(f"  {label}: 2 replicas up ({time.monotonic() - started:.0f}s)", flush=True)
        limits = httpx.Limits(max_connections=args.conversations)
        with httpx.Client(base_url=running.url, timeout=args.timeout, limits=limits) as client:
            # Warm both replicas (first decode, threads) with a prompt that shares nothing.
            for _ in range(2):
                stream_chat(client, [{"role": "user", "content": "Say hello."}], 4)
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.at_once) as pool:
                done = list(
                    pool.map(
                        lambda i: conversation(client, system, i, args), range(args.conversations)
                    )
                )
            run.wall = time.perf_counter() - t0
            run.turns = [t for turns, _ in done for t in turns]
            tag = f"{'on' if prefix_routing else 'off'}{rnd}"
            run.cold = [cold_prefill(client, m, i, tag) for i, (_, m) in enumerate(done)]
    s = summarize([run])
    print(
        f"  {label}: turn 1 {s['turn1_ttft_p50_ms']:.0f} ms, turns 2-{args.turns} "
        f"{s['later_ttft_p50_ms']:.0f} ms, cold {s['cold_ttft_p50_ms']:.0f} ms, "
        f"{s['errors']} errors ({time.monotonic() - started:.0f}s)",
        flush=True,
    )
    return run


# -- report ------------------------------------------------------------------------


def p50_ms(turns: list[Turn]) -> float:
    ok = [t.ttft for t in turns if t.error is None]
    return 1000 * statistics.median(ok) if ok else 0.0


def p90_ms(turns: list[Turn]) -> float:
    ok = sorted(t.ttft for t in turns if t.error is None)
    return 1000 * ok[min(len(ok) - 1, int(0.9 * len(ok)))] if ok else 0.0


def summarize(runs: list[Run]) -> dict:
    turns = [t for r in runs for t in r.turns]
    cold = [t for r in runs for t in r.cold]
    first = [t for t in turns if t.turn == 1]
    later = [t for t in turns if t.turn > 1]
    n_turns = max((t.turn for t in turns), default=0)
    later_p50, cold_p50 = p50_ms(later), p50_ms(cold)
    errors = [t.error for t in turns + cold if t.error]
    return {
        "prefix_routing": runs[0].prefix_routing if runs else None,
        "requests": len(turns) + len(cold),
        "errors": len(errors),
        "error_kinds": {e: errors.count(e) for e in sorted(set(errors))},
        "turn1_ttft_p50_ms": p50_ms(first),
        "later_ttft_p50_ms": later_p50,
        "later_ttft_p90_ms": p90_ms(later),
        "cold_ttft_p50_ms": cold_p50,
        "later_vs_cold": later_p50 / cold_p50 if cold_p50 else 0.0,
        "ttft_p50_ms_by_turn": [
            p50_ms([t for t in turns if t.turn == n]) for n in range(1, n_turns + 1)
        ],
        "conversations_wall_s": sum(r.wall for r in runs),
    }


def report(args: argparse.Namespace, runs: list[Run], system_tokens: int, started: float) -> None:
    settings = sorted({r.prefix_routing for r in runs}, reverse=True)
    rows = [summarize([r for r in runs if r.prefix_routing == s]) for s in settings]
    print()
    by_turn = " ".join(f"{'t' + str(n):>6s}" for n in range(1, args.turns + 1))
    print(
        f"{'prefix routing':14s} {'reqs':>4s} {'err':>3s} {'turn 1':>7s} "
        f"{'2-' + str(args.turns) + ' p50':>8s} {'p90':>7s} {'cold':>7s} {'x cold':>6s}   {by_turn}"
    )
    for r in rows:
        turns = " ".join(f"{v:>6.0f}" for v in r["ttft_p50_ms_by_turn"])
        print(
            f"{'on' if r['prefix_routing'] else 'off':14s} {r['requests']:>4d} {r['errors']:>3d} "
            f"{r['turn1_ttft_p50_ms']:>7.0f} {r['later_ttft_p50_ms']:>8.0f} "
            f"{r['later_ttft_p90_ms']:>7.0f} {r['cold_ttft_p50_ms']:>7.0f} "
            f"{r['later_vs_cold']:>6.3f}   {turns}"
        )
    slots = f"{args.slots} slots" if has_parallel_field() else "one slot (no parallel field yet)"
    print(
        f"\nTTFT in ms (p50 unless said); x cold = turns 2-{args.turns} p50 / cold p50; "
        f"t1..t{args.turns}: p50 per turn. System prompt: {system_tokens} tokens; "
        f"{args.conversations} conversations, {args.at_once} at once, 2 replicas of {slots}."
    )
    targets = {}
    on = next((r for r in rows if r["prefix_routing"]), None)
    if on is not None and has_prefix_routing():
        targets[f"prefix routing on: turns 2-{args.turns} TTFT <= {TARGET_RATIO}x cold"] = bool(
            on["cold_ttft_p50_ms"] and on["later_vs_cold"] <= TARGET_RATIO
        )
    targets["no errors"] = all(r["errors"] == 0 for r in rows)
    print()
    for name, ok in targets.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    write_results(
        args.out,
        "multiturn",
        args.json,
        {
            "model": MODEL,
            "conversations": args.conversations,
            "turns": args.turns,
            "at_once": args.at_once,
            "system_tokens": system_tokens,
            "reply_tokens": args.reply_tokens,
            "slots": args.slots if has_parallel_field() else None,
            "prefix_routing_setting_exists": has_prefix_routing(),
            "rounds": args.rounds,
            "nodes": [asdict(n) for n in NODES],
            "cpu_count": os.cpu_count(),
            "wall_s": time.monotonic() - started,
            "results": rows,
            "runs": [
                {**summarize([r]), "round": r.round, "turns": [asdict(t) for t in r.turns],
                 "cold": [asdict(t) for t in r.cold]}
                for r in runs
            ],
            "targets": targets,
        },
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--at-once", type=int, default=8, help="conversations in flight at once")
    parser.add_argument("--system-tokens", type=int, default=1500)
    parser.add_argument("--reply-tokens", type=int, default=48, help="max_tokens of each turn")
    parser.add_argument("--slots", type=int, default=4, help="parallel: slots per replica")
    parser.add_argument(
        "--prefix-routing", choices=("both", "on", "off"), default="both",
        help="which settings to run (both: on, then off)",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=1, help="runs of every setting")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per request")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--json", type=Path, help="write the results here instead of --out")
    args = parser.parse_args()

    started = time.monotonic()
    settings = {"both": [True, False], "on": [True], "off": [False]}[args.prefix_routing]
    if not has_prefix_routing():
        print("note: this Corral has no prefix_routing setting: every run is without it")
        settings = [False]
    system, system_tokens = system_prompt(args.system_tokens)
    print(
        f"conversations={args.conversations} turns={args.turns} at_once={args.at_once} "
        f"system={system_tokens} tokens reply<={args.reply_tokens} tokens "
        f"slots={args.slots if has_parallel_field() else '1 (no parallel field yet)'} "
        f"rounds={args.rounds}",
        flush=True,
    )
    runs = []
    for rnd in range(1, args.rounds + 1):
        for prefix_routing in settings:
            runs.append(run_setting(prefix_routing, rnd, system, args))
    report(args, runs, system_tokens, started)


if __name__ == "__main__":
    run_main(main)

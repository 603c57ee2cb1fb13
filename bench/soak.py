"""A soak: 32 streaming clients for 60 s against two placements of one model.

A two-box simulated homelab (a mini PC as head and a NAS, one logical CPU each,
on this machine) serves the starter model with one replica on each box
(llama.cpp, --threads threads each; ``--engine fake`` runs the fake engine at
--token-delay instead, to load Corral's own path rather than inference).
First one client alone for --baseline seconds (the baseline: what the model
does for one user), then --clients closed-loop streaming clients for --seconds
(``tests/support/soak.py``: each reads its answer to the end and sends the
next; a 429 or 503 is honoured for its Retry-After). Only 127.0.0.1 is sent to.

Printed: requests and how each ended (ok, 429/503 with Retry-After, or the
failure), p50/p99 latency of the completed ones, tokens/s and its ratio to the
one-client baseline, the peak RSS of every Ray process that matters (ingress,
controller, Serve's controller, each replica, raylets, GCS) and how much the
ingress grew from the first fifth of the soak to the last. Pass: every request
ok or refused with Retry-After, no replica process replaced, ingress growth
under 16 MiB. Results go to bench/results/soak-<time>.json (or --json PATH).

Run: .venv/bin/python bench/soak.py            (about 2 minutes)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cluster import SimNode, corral_on, homelab, write_results  # noqa: E402

NODES = [SimNode("minipc-n100-ram16g", "head", "minipc"), SimNode("nas-ram8g", "worker", "nas")]
MODEL = "soak:latest"
GROWTH_LIMIT = 16 * 1024**2


def models_yaml(args: argparse.Namespace) -> str:
    engine = (
        f"    engine: fake\n    engine_options: {{token_delay: {args.token_delay}}}\n"
        if args.engine == "fake"
        else ""
    )
    return (
        "models:\n"
        "  - name: soak\n"
        "    source: {starter}\n"
        f"    context: {args.ctx}\n"
        f"    threads: {args.threads}\n"
        "    replicas: {min: 2, max: 2}\n"
        "    placement: {strategy: spread}\n" + engine
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--baseline", type=float, default=10, help="seconds of one client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--engine", choices=["llama.cpp", "fake"], default="llama.cpp")
    parser.add_argument("--token-delay", type=float, default=0.01, help="fake engine, s/token")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads per replica")
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--json", type=Path, help="write the results here instead of --out")
    args = parser.parse_args()

    from nodes.models import starter_model_path
    from tests.support.cluster import apply_models, placements, replica_pids
    from tests.support.soak import MIB, soak, table

    with homelab(NODES) as lab, corral_on(lab, max_queue=64) as corral:
        apply_models(models_yaml(args), lab.state_dir / "models.yaml", starter_model_path())
        nodes = sorted(placements(corral, MODEL))
        before = {node: replica_pids(MODEL, node) for node in nodes}
        where = ", ".join(nodes)
        print(f"{MODEL} ({args.engine}) on {where}; one client for {args.baseline:.0f} s")
        alone = soak(
            corral.url, MODEL, clients=1, seconds=args.baseline, max_tokens=args.max_tokens
        )
        print(f"baseline: {alone.tokens_per_second:.1f} tokens/s for one client\n")
        result = soak(
            corral.url,
            MODEL,
            clients=args.clients,
            seconds=args.seconds,
            max_tokens=args.max_tokens,
        )
        after = {node: replica_pids(MODEL, node) for node in nodes}

    print(table(result))
    ratio = result.tokens_per_second / alone.tokens_per_second
    growth = result.growth("ingress", warmup=min(10.0, args.seconds / 6))
    replaced = sorted(node for node in nodes if before[node] != after[node])
    print(f"\ntokens/s under {args.clients} clients vs one client: {ratio:.2f}x")
    print(f"ingress memory from the first fifth of the soak to the last: {growth / MIB:+.1f} MiB")
    print(f"replica processes replaced during the soak: {replaced or 'none'}")
    passed = not result.failures and not replaced and growth < GROWTH_LIMIT
    print("PASS" if passed else "FAIL")

    write_results(
        args.out,
        "soak",
        args.json,
        {
            "args": {k: str(v) for k, v in vars(args).items()},
            "placements": nodes,
            "baseline": alone.summary(),
            "soak": result.summary(),
            "tokens_per_second_ratio": ratio,
            "ingress_growth_bytes": growth,
            "replicas_replaced": replaced,
            "passed": passed,
        },
    )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())

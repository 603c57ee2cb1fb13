"""Load: 32 streaming clients for 20 s against two placements of one model.

Every request either completes (``[DONE]``) or is refused with 429/503 and a
Retry-After; no replica dies (the same processes serve from start to end, and
none counts a failed generation); the ingress's memory stays flat. The model
runs the fake engine (the starter GGUF as source), so the load falls on
Corral's own path, not on inference. ``bench/soak.py`` runs the same for 60 s
(with llama.cpp by default) and prints the figures; here they are printed
with ``pytest -s``.
"""

from __future__ import annotations

import pytest

from tests.support.cluster import (
    apply_models,
    fake_model,
    models_file,
    placements,
    replica_info,
    replica_stats,
)
from tests.support.soak import MIB, soak, table

MODEL = "soak-fake:latest"
CLIENTS, SECONDS, WARMUP = 32, 20.0, 5.0
GROWTH = 16 * MIB  # what "flat" allows the ingress over the soak (allocator noise)


@pytest.fixture(scope="module")
def two_placements(corral, tmp_path_factory, starter_path):
    root = tmp_path_factory.mktemp("soak")
    apply_models(
        models_file(
            fake_model(
                "soak-fake",
                replicas="{min: 2, max: 2}",
                placement="{nodes: [gpubox, nas], strategy: spread}",
                engine_options="{token_delay: 0.01, reply_tokens: 16}",
            )
        ),
        root / "models.yaml",
        starter_path,
    )
    yield sorted(placements(corral, MODEL))
    apply_models("models: []\n", root / "empty.yaml", starter_path)


def test_32_streaming_clients_every_request_ends_well_and_nothing_dies(corral, two_placements):
    assert two_placements == ["gpubox", "nas"]
    pids = {node: replica_info(MODEL, node).pid for node in two_placements}
    result = soak(corral.url, MODEL, clients=CLIENTS, seconds=SECONDS, max_tokens=16)
    print("\n" + table(result))

    assert len(result.outcomes) >= CLIENTS
    assert result.failures == {}, result.failures  # ok, or 429/503 with Retry-After
    assert result.by_kind["ok"] >= len(result.outcomes) // 2
    # No replica died: the same processes, no generation failed.
    assert {node: replica_info(MODEL, node).pid for node in two_placements} == pids
    assert all(replica_stats(MODEL, node).failed == 0 for node in two_placements)
    growth = result.growth("ingress", WARMUP)
    print(f"ingress memory over the soak: {growth / MIB:+.1f} MiB")
    assert growth < GROWTH

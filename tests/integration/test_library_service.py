"""A large pull does not slow the controller: pulls run in the library service, its own
actor, so ``ensure()`` (on every request's path) answers as fast during a pull as
without one.

The blob is a real multi-hundred-megabyte download from Debian's docker-registry,
pulled through Corral's API by the official ollama client, while this test asks the
controller for a loaded model's routes again and again.
"""

from __future__ import annotations

import shutil
import statistics
import threading
import time

import ollama
import pytest
import ray

from nodes.models import STARTER_MODEL
from tests.support.cluster import controller
from tests.support.oci import ollama_model, push_model, running_registry

pytestmark = pytest.mark.integration

MIB = 1024**2
PADDING = 400 * MIB  # after the starter model's bytes: a GGUF reader stops before them
SAMPLES = 200


def ensure_latencies(n: int, until: threading.Event | None = None) -> list[float]:
    """Seconds each ``ensure`` of the loaded starter model took: ``n`` of them, or as many
    as fit before ``until`` is set."""
    actor, took = controller(), []
    while len(took) < n and not (until is not None and until.is_set()):
        started = time.perf_counter()
        routes = ray.get(actor.ensure.remote(STARTER_MODEL), timeout=30)
        took.append(time.perf_counter() - started)
        assert routes, "the starter model has a placement"
    return took


@pytest.fixture(scope="module")
def big_model(tmp_path_factory, starter_path, corral):
    """A registry holding a model whose blob is the starter GGUF plus 400 MiB."""
    workdir = tmp_path_factory.mktemp("big-registry")
    gguf = workdir / "big.gguf"
    shutil.copyfile(starter_path, gguf)
    with gguf.open("ab") as f:
        f.truncate(gguf.stat().st_size + PADDING)
    model = ollama_model(gguf)
    (workdir / "registry").mkdir()
    with running_registry(workdir / "registry") as registry:
        push_model(registry.url, "library/big", "1", model)
        gguf.unlink()  # the registry holds its own copy
        yield f"{registry.host}/library/big:1"


def test_ensure_is_not_slowed_by_a_large_pull(corral, big_model):
    ensure_latencies(5)  # loads the starter model if it is not loaded, and warms up
    quiet = statistics.median(ensure_latencies(SAMPLES))

    done, progress, failure = threading.Event(), [], []

    def pull() -> None:
        try:
            client = ollama.Client(host=corral.url)
            for p in client.pull(big_model, insecure=True, stream=True):
                progress.append(p)
        except Exception as exc:  # noqa: BLE001 - reported by the assertions below
            failure.append(exc)
        finally:
            done.set()

    puller = threading.Thread(target=pull)
    puller.start()
    try:
        # Measure only while bytes move: from the first progress with a size on.
        deadline = time.monotonic() + 60
        while not any(p.completed for p in progress) and not done.is_set():
            assert time.monotonic() < deadline, "the pull never started downloading"
            time.sleep(0.01)
        busy = ensure_latencies(10_000, until=done)
    finally:
        puller.join(timeout=300)
    assert not failure, failure
    assert progress[-1].status == "success"
    assert len(busy) >= 20, f"the pull ended after {len(busy)} samples: measure a larger one"
    during = statistics.median(busy)
    tail = statistics.quantiles(busy, n=100)[98]
    print(
        f"ensure() median: {quiet * 1000:.2f} ms alone, {during * 1000:.2f} ms during a "
        f"{PADDING // MIB} MiB pull (p99 {tail * 1000:.2f} ms, max {max(busy) * 1000:.2f} ms; "
        f"{len(busy)} samples)"
    )
    assert during <= 2 * quiet, (quiet, during)
    ollama.Client(host=corral.url).delete(big_model)

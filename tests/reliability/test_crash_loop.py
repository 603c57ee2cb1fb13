"""A model process that crashes on every request, or while it loads, fails fast with its reason.

The fake engine's test-only ``test_crash_on`` makes the replica's process kill
itself with SIGSEGV, as llama.cpp's AMX kernel did on the first decode: no
Python exception, the process is simply gone, Serve starts another. Without a
limit each request would follow every restart for the whole load timeout.

What must hold:

* the client gets a clear error (502, OpenAI's shape, naming the crash) within a
  few seconds: its request is moved once, and the second death is final;
* three deaths within a minute mark the placement failed, with the signal that
  killed it, in ``/api/cluster/placements``, ``corral ps``, the controller's
  events and ``/metrics``; requests then get a 503 at once, on both APIs;
* ``corral apply`` of the file again tries the model at once;
* a model whose load crashes fails its cold start, and the next request gets
  the 503 at once instead of crashing another load.

The figures (time from the first crash to the client's error and to the
placement showing as failed) are printed (``pytest -s``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import ollama
import pytest

from tests.support.cluster import apply_models, events, fake_model, models_file, wait_for

CRASHY = "crashy:latest"
LOAD_CRASHY = "crashy-load:latest"
CORRAL = str(Path(sys.executable).with_name("corral"))
FEW_SECONDS = 15.0  # the client's error comes within this (a restart of the fake replica)


def crashy_models() -> str:
    return models_file(
        fake_model("crashy", engine_options="{test_crash_on: generate}"),
        fake_model(
            "crashy-load",
            replicas="{min: 0, max: 1}",
            engine_options="{test_crash_on: load}",
        ),
    )


@pytest.fixture(scope="module")
def crashy(corral, tmp_path_factory, starter_path):
    root = tmp_path_factory.mktemp("crashy")
    apply_models(crashy_models(), root / "models.yaml", starter_path)
    yield root
    apply_models("models: []\n", root / "empty.yaml", starter_path)


def chat(url: str, model: str, **extra) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)


def error_code(r: httpx.Response) -> str | None:
    """The error's code: of the body, or of a stream's last event (a stream that had begun,
    its role chunk sent, ends with its error as one event)."""
    if r.status_code != 200:
        return r.json()["error"]["code"]
    last = [line for line in r.text.splitlines() if line.startswith("data: {")][-1]
    return json.loads(last.removeprefix("data: ")).get("error", {}).get("code")


def failed_row(url: str, model: str) -> dict | None:
    rows = httpx.get(f"{url}/api/cluster/placements", timeout=30).json()["placements"]
    return next((r for r in rows if r["model"] == model and r["status"] == "FAILED"), None)


def test_a_model_that_crashes_on_every_request_fails_fast_with_its_reason(
    corral, crashy, starter_path
):
    since, first = time.time(), time.monotonic()
    r = chat(corral.url, CRASHY)
    to_error = time.monotonic() - first
    assert r.status_code == 502, r.text
    error = r.json()["error"]
    assert error["code"] == "model_crashed", error
    assert "crashed" in error["message"] and "corral ps" in error["message"], error
    assert to_error < FEW_SECONDS, to_error

    # The second request, streamed, meets the third death: the placement is given up on.
    r = chat(corral.url, CRASHY, stream=True)
    assert error_code(r) in ("model_crashed", "model_failed"), r.text
    row = wait_for(lambda: failed_row(corral.url, CRASHY), 30, "the placement to show FAILED")
    to_failed = time.monotonic() - first
    reason = row["failure"]["reason"]
    assert "crashed 3 times" in reason and "SIGSEGV" in reason, reason
    assert row["failure"]["retry_at"] > time.time()
    print(f"\nfirst crash -> client's error {to_error:.2f}s; -> placement failed {to_failed:.2f}s")

    # From now on: a 503 at once, on both APIs, saying why.
    started = time.monotonic()
    r = chat(corral.url, CRASHY)
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "model_failed"
    assert "SIGSEGV" in r.json()["error"]["message"]
    assert int(r.headers["retry-after"]) > 1
    with pytest.raises(ollama.ResponseError) as raised:
        ollama.Client(host=corral.url).chat(CRASHY, [{"role": "user", "content": "hi"}])
    assert raised.value.status_code == 503 and "SIGSEGV" in raised.value.error
    assert time.monotonic() - started < 5.0

    # `corral ps`, the events and /metrics say it too.
    ps = subprocess.run(
        [CORRAL, "ps", "--host", corral.url.removeprefix("http://")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ps.returncode == 0, ps.stderr
    assert f"{CRASHY} on" in ps.stdout and "FAILED" in ps.stdout and "SIGSEGV" in ps.stdout
    assert "retry in" in ps.stdout, ps.stdout
    failed = events(since, CRASHY, "failed")
    assert len(failed) == 1 and "SIGSEGV" in failed[0]["reason"], failed
    metrics = httpx.get(f"{corral.url}/metrics", timeout=30).text
    assert f'corral_placements_failed_total{{model="{CRASHY}"' in metrics

    # Applying the file again is asking to try it at once: it loads and serves again.
    apply_models(crashy_models(), crashy / "again.yaml", starter_path)
    assert failed_row(corral.url, CRASHY) is None
    r = chat(corral.url, CRASHY)
    assert r.status_code == 502 and r.json()["error"]["code"] == "model_crashed", r.text


def test_a_model_whose_load_crashes_fails_and_is_not_loaded_again_at_once(corral, crashy):
    since, first = time.time(), time.monotonic()
    r = chat(corral.url, LOAD_CRASHY)
    took = time.monotonic() - first
    assert r.status_code in (500, 503), r.text
    assert LOAD_CRASHY in r.json()["error"]["message"], r.text
    print(f"\nload crash -> client's error {took:.2f}s")

    row = wait_for(lambda: failed_row(corral.url, LOAD_CRASHY), 30, "the model to show FAILED")
    assert "SIGSEGV" in row["failure"]["reason"] or "died" in row["failure"]["reason"], row
    started = time.monotonic()
    r = chat(corral.url, LOAD_CRASHY)
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_failed", r.text
    assert time.monotonic() - started < 5.0
    assert events(since, LOAD_CRASHY, "failed")

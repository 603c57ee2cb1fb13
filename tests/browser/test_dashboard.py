"""The dashboard (``/ui``) in Debian's chromium, on the simulated homelab with the real
engine: what each tab shows, and that its buttons do what they say.

Every test ends with a clean browser console (``open_tab``) and saves screenshots in
its temporary folder (``shoot``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from playwright.sync_api import expect

from tests.support.cluster import fake_model, models_file, placements, wait_for
from tests.support.keys import keys_on
from tests.support.oci import ollama_model, push_model, running_registry

pytestmark = pytest.mark.integration

MODEL = "smollm2:135m"
LOAD_TIMEOUT = 120_000  # ms: a cold start of the real model on a busy 2-core box


def api(corral, method: str, path: str, **kwargs) -> httpx.Response:
    response = httpx.request(method, f"{corral.url}{path}", timeout=300, **kwargs)
    assert response.status_code == 200, response.text
    return response


@pytest.fixture
def models_file_kept(corral) -> Iterator[None]:
    """Puts back the applied models file when the test is done."""
    before = api(corral, "GET", "/api/cluster/models-file").json()["text"]
    yield
    api(corral, "POST", "/api/cluster/apply", json={"models_yaml": before})


def test_every_box_shows_with_its_memory_and_gpus(corral, dashboard, shoot):
    nodes = wait_for(
        lambda: [
            n
            for n in api(corral, "GET", "/api/cluster/nodes").json()["nodes"]
            if n["state"] == "up" and n["ram_total"]
        ],
        30,
        "the nodes to be probed",
    )
    tab = dashboard("cluster")
    for node in nodes:
        card = tab.page.locator(f'.node-card[data-node="{node["name"]}"]')
        expect(card).to_have_attribute("data-state", "up")
        expect(card).to_contain_text(node["role"])
        assert int(card.locator(".ram-bar").get_attribute("data-total")) == node["ram_total"]
        used = node["ram_total"] - int(card.locator(".ram-bar").get_attribute("data-free"))
        assert used == node["ram_used"]
        vram = card.locator(".vram-bar")
        if node["gpus"]:
            total = sum(g["vram_total"] for g in node["gpus"])
            assert int(vram.get_attribute("data-total")) == total
            for gpu in node["gpus"]:
                expect(card).to_contain_text(gpu["name"])
        else:
            expect(vram).to_have_count(0)
    shoot(tab, "dashboard-boxes")

    phone = dashboard("cluster", viewport={"width": 390, "height": 844})
    expect(phone.page.locator(".node-card")).to_have_count(len(nodes), timeout=10_000)
    assert phone.page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    shoot(phone, "dashboard-phone")


def test_loading_a_model_puts_it_on_its_box_and_unload_takes_it_off(corral, dashboard, shoot):
    api(corral, "POST", "/api/generate", json={"model": MODEL, "keep_alive": 0})  # not loaded
    tab = dashboard("models")
    page = tab.page
    page.fill("#load-model", MODEL)
    page.locator("#load-form button").click()
    row = page.locator(f'tr.placement[data-model="{MODEL}"]')
    expect(row).to_have_count(1, timeout=LOAD_TIMEOUT)
    node = row.get_attribute("data-node")
    assert set(placements(corral, MODEL)) == {node}
    expect(row).to_contain_text(node)
    shoot(tab, "dashboard-models")

    page.locator('a[data-tab="cluster"]').click()
    card = page.locator(f'.node-card[data-node="{node}"]')
    expect(card.locator(".node-models li", has_text=MODEL)).to_be_visible()
    held = int(card.locator(".ram-bar").get_attribute("data-models"))
    assert held == sum(p["ram"] * p["replicas"] for p in placements(corral, MODEL).values())
    shoot(tab, "dashboard-cluster")

    page.locator('a[data-tab="models"]').click()
    page.locator(f'button.unload[data-model="{MODEL}"]').click()
    expect(row).to_have_count(0, timeout=60_000)
    assert placements(corral, MODEL) == {}
    page.locator('a[data-tab="cluster"]').click()
    expect(card.locator(".node-models li", has_text=MODEL)).to_have_count(0)


def test_activity_charts_and_the_live_event_list(corral, dashboard, shoot):
    tab = dashboard("activity")
    api(corral, "POST", "/api/generate", json={"model": MODEL, "keep_alive": 0})
    for _ in range(3):
        api(
            corral,
            "POST",
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "Hi!"}],
                  "max_tokens": 16},
        )  # fmt: skip
    page = tab.page
    events = page.locator("#events li.event")
    expect(events.filter(has_text=MODEL).locator(":scope[data-kind='load']")).not_to_have_count(0)
    chart = page.locator(f'.chart[data-model="{MODEL}"]')
    expect(chart.locator("canvas")).not_to_have_count(0, timeout=10_000)
    # What the chart draws: the three requests and their tokens, in the stream's buckets.
    first = next(
        line
        for line in httpx.get(f"{corral.url}/api/cluster/stream?limit=1", timeout=30).iter_lines()
        if line.startswith("data: ")
    )
    rows = json.loads(first.removeprefix("data: "))["activity"]["series"][MODEL]
    assert sum(r[1] for r in rows) >= 3 and sum(r[2] for r in rows) > 0
    assert any(r[3] is not None for r in rows)
    shoot(tab, "dashboard-activity")


def test_plan_shows_the_diff_and_apply_makes_it_so(
    corral, dashboard, shoot, starter_path, models_file_kept
):
    text = models_file(fake_model("ui-fake:1", placement="{nodes: [nas]}"))
    tab = dashboard("plan")
    page = tab.page
    page.fill("#plan-text", text.replace("{starter}", str(starter_path)))
    expect(page.locator("#plan-apply")).to_be_disabled()
    page.locator("#plan-preview").click()
    change = page.locator('#plan-result .change[data-op="+"][data-model="ui-fake:1"]')
    expect(change).to_have_attribute("data-node", "nas")
    expect(change).to_contain_text("1 replica")
    expect(page.locator("#plan-result")).to_contain_text("1 to add")
    assert placements(corral, "ui-fake:1") == {}  # a plan changes nothing
    shoot(tab, "dashboard-plan")

    page.locator("#plan-apply").click()
    expect(page.locator("#confirm-dialog")).to_be_visible()
    page.locator("#confirm-yes").click()
    expect(page.locator("#apply-result")).to_contain_text("Applied", timeout=LOAD_TIMEOUT)
    assert set(placements(corral, "ui-fake:1")) == {"nas"}
    page.locator('a[data-tab="models"]').click()
    expect(page.locator('tr.placement[data-model="ui-fake:1"][data-node="nas"]')).to_be_visible()

    # A mistake in the file: the line it is on, and nothing to apply.
    page.locator('a[data-tab="plan"]').click()
    page.fill("#plan-text", "models:\n  - name: ui-fake:1\n    replicas: {min: -1}\n")
    page.locator("#plan-preview").click()
    expect(page.locator("#plan-result")).to_contain_text("models.yaml:3")
    expect(page.locator("#plan-apply")).to_be_disabled()


@pytest.fixture
def registry(tmp_path_factory, starter_path):
    with running_registry(tmp_path_factory.mktemp("registry")) as running:
        push_model(running.url, "library/smollm2", "ui", ollama_model(starter_path))
        yield running


def test_a_pull_shows_progress_and_ends_in_the_library(corral, dashboard, registry, shoot):
    name = f"{registry.host}/library/smollm2:ui"
    tab = dashboard("library")
    page = tab.page
    # Record every value the progress bar shows: a local pull is over in a second.
    page.evaluate(
        """() => { window.seen = [];
        setInterval(() => { const p = document.querySelector('#pull-progress');
          if (p && p.max > 0) window.seen.push(p.value / p.max); }, 5); }"""
    )
    page.fill("#pull-name", name)
    page.check("#pull-insecure")
    page.locator("#pull-submit").click()
    row = page.locator(f'tr.library-model[data-model="{name}"]')
    expect(row).to_be_visible(timeout=LOAD_TIMEOUT)
    expect(page.locator("#pull-status")).to_contain_text("success")
    seen = page.evaluate("window.seen")
    assert seen and max(seen) == 1.0, seen
    expect(row).to_contain_text("llama")  # its family, from the GGUF
    shoot(tab, "dashboard-library")

    row.locator("button.copy").click()
    page.fill("#copy-dest", "ui-copy:1")
    page.locator("#copy-submit").click()
    copy = page.locator('tr.library-model[data-model="ui-copy:1"]')
    expect(copy).to_be_visible()
    for model, shown in ((name, row), ("ui-copy:1", copy)):
        shown.locator("button.delete").click()
        expect(page.locator("#confirm-text")).to_contain_text(model)
        page.locator("#confirm-yes").click()
        expect(shown).to_have_count(0)
    tags = {m["name"] for m in api(corral, "GET", "/api/tags").json()["models"]}
    assert not {name, "ui-copy:1"} & tags


@pytest.fixture
def keys(corral) -> Iterator[dict[str, str]]:
    with keys_on(corral) as file:
        yield {"admin": file.create("admin")[1], "limited": file.create("alice", [MODEL])[1]}


def test_with_keys_the_page_asks_for_one_and_a_limited_key_sees_its_models(
    corral, dashboard, models_file_kept, keys, starter_path, shoot
):
    other = models_file(fake_model("ui-hidden:1", placement="{nodes: [nas]}"))
    admin = {"Authorization": f"Bearer {keys['admin']}"}
    text = other.replace("{starter}", str(starter_path))
    api(corral, "POST", "/api/cluster/apply", json={"models_yaml": text}, headers=admin)
    api(corral, "POST", "/api/generate", json={"model": MODEL}, headers=admin)  # loaded too

    tab = dashboard("models", live=False)
    page = tab.page
    expect(page.locator("#key-dialog")).to_be_visible()
    page.fill("#key-input", "corral-not-a-key")
    page.locator("#key-submit").click()
    expect(page.locator("#key-error")).to_be_visible()
    shoot(tab, "dashboard-key")
    page.fill("#key-input", keys["limited"])
    page.locator("#key-submit").click()
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    expect(page.locator("#whoami")).to_contain_text("alice")
    expect(page.locator(f'tr.placement[data-model="{MODEL}"]')).not_to_have_count(0)
    expect(page.locator('tr.placement[data-model="ui-hidden:1"]')).to_have_count(0)
    expect(page.locator(f'button.unload[data-model="{MODEL}"]')).to_have_count(0)
    page.locator('a[data-tab="cluster"]').click()
    expect(page.locator(".node-card")).to_have_count(0)
    assert keys["limited"] not in page.url

    # The admin key sees everything and may change things.
    full = dashboard("models", key=keys["admin"])
    expect(full.page.locator('tr.placement[data-model="ui-hidden:1"]')).to_have_count(1)
    expect(full.page.locator('button.unload[data-model="ui-hidden:1"]')).to_be_visible()
    full.page.locator("#key-forget").click()
    expect(full.page.locator("#key-dialog")).to_be_visible()
    assert full.page.evaluate("sessionStorage.getItem('corral.key')") is None

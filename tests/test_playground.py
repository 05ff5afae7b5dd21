"""The web playground at `/` and POST /v1/inspect: HTTP checks, then a real browser (Playwright driving
Debian's chromium) that types a prompt, streams the reply, and checks both maps render -- with no request
leaving the server."""

from __future__ import annotations

import os
from urllib.parse import urlparse

import httpx
import pytest

pytest.importorskip("fastapi")

from seekformer.interpret.report import inspect_prompt  # noqa: E402
from seekformer.serving import ServerConfig, ServerThread, create_app, load_model_dir  # noqa: E402
from seekformer.serving.demo import build_demo_model_dir  # noqa: E402

KEY = "sk-play"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_demo_model_dir(tmp_path_factory.mktemp("play-model"), max_position_embeddings=1024)


@pytest.fixture(scope="module")
def server(model_dir):
    model, tok = load_model_dir(model_dir)
    with ServerThread(create_app(model, tok, ServerConfig(model_name="play", api_key=KEY))) as srv:
        yield srv


def post(server, body, key=KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + "/v1/inspect", json=body, headers=headers, timeout=60)


def test_page_and_static_files_are_served(server):
    html = httpx.get(server.url + "/").text
    for hook in ("prompt", "send", "output", "routing-map", "attention-map"):
        assert f'data-testid="{hook}"' in html
    assert "http://" not in html and "https://" not in html  # nothing from elsewhere
    js = httpx.get(server.url + "/playground/playground.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"] and "/v1/inspect" in js.text
    assert "http://" not in js.text and "https://" not in js.text
    assert httpx.get(server.url + "/playground/../app.py").status_code == 404


def test_inspect_endpoint(server, model_dir):
    assert post(server, {"prompt": "hi"}, key=None).status_code == 401
    r = post(server, {"prompt": "The United States", "attention": "full"})
    assert r.status_code == 200, r.text
    rec = r.json()
    model, tok = load_model_dir(model_dir)
    ref = inspect_prompt(model, tok, tok.encode("The United States"), attention_format="full")
    assert rec["token_ids"] == ref["token_ids"] and rec["layers"] == ref["layers"] and rec["layers"]
    assert rec["attention"] == ref["attention"]
    r = post(server, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                      "attention": "mean_u8"})
    assert r.status_code == 200 and len(r.json()["attention_u8"]) == 2
    for body, fragment in [({"prompt": "word " * 1100}, "context is 1024"), ({"prompt": "hi", "layers": [5]},
                           "unknown layer 5"), ({"token_ids": [10 ** 6]}, "token ids must be"),
                           ({}, "exactly one of"), ({"prompt": "x", "attention": "all"}, "attention")]:
        r = post(server, body)
        assert r.status_code == 400 and fragment in r.json()["error"]["message"], r.text


def test_inspect_dense_model(tmp_path):
    d = build_demo_model_dir(tmp_path / "dense", first_k_dense_replace=2)
    model, tok = load_model_dir(d)
    with ServerThread(create_app(model, tok)) as srv:
        r = httpx.post(srv.url + "/v1/inspect", json={"prompt": "hello", "attention": "none"})
    assert r.status_code == 200 and r.json()["layers"] == [] and "dense" in r.json()["note"]


def _browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no chromium at {CHROMIUM}: apt-get install -y chromium (.ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the 'test' extra)")
    return sync_api.sync_playwright()


def _canvas_has_ink(page, testid: str) -> bool:
    return page.evaluate("""(id) => {
        const c = document.querySelector(`[data-testid="${id}"]`);
        if (!c.width || !c.height) return false;
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        const seen = new Set();
        for (let i = 0; i < d.length; i += 4 * 7) seen.add(d[i] * 65536 + d[i + 1] * 256 + d[i + 2]);
        return seen.size > 2;
    }""", testid)


def test_playground_in_a_real_browser(server, tmp_path):
    outside = []

    def guard(route):
        host = urlparse(route.request.url).hostname
        if host in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    with _browser() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.route("**/*", guard)
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/")
            page.fill("#api-key", KEY)
            page.dispatch_event("#api-key", "change")
            page.get_by_test_id("prompt").fill("The United States")
            page.fill("#max-tokens", "24")
            page.get_by_test_id("send").click()
            page.wait_for_selector('[data-testid="output"][data-done="1"]', timeout=60_000)
            assert len(page.get_by_test_id("output").inner_text()) > len("The United States")
            page.wait_for_selector('[data-testid="attention-map"][data-rendered="1"]', timeout=60_000)
            assert _canvas_has_ink(page, "routing-map") and _canvas_has_ink(page, "attention-map")
            page.get_by_test_id("routing-map").hover(position={"x": 3, "y": 3})
            detail = page.get_by_test_id("token-detail").inner_text()
            assert "token 0" in detail and "layer 1:" in detail and "attends to" in detail
            page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)
            # chat mode, streamed through /v1/chat/completions
            page.select_option("#mode", "chat")
            page.evaluate("document.querySelector('[data-testid=output]').dataset.done = ''")
            page.get_by_test_id("prompt").fill("Hello there")
            page.get_by_test_id("send").click()
            page.wait_for_selector('[data-testid="output"][data-done="1"]', timeout=60_000)
            assert "assistant:" in page.get_by_test_id("output").inner_text()
            # 1,024 tokens: drawn on canvases, hover still answers
            page.evaluate("window.seekPlayground.inspect({token_ids: Array.from({length: 1024}, (_, i) => 3 + i % 400)})")
            page.wait_for_selector('[data-testid="routing-map"][data-tokens="1024"]', timeout=60_000)
            page.get_by_test_id("routing-map").hover(position={"x": 2000, "y": 3})
            assert "token 1000" in page.get_by_test_id("token-detail").inner_text()
            assert page.evaluate("document.querySelectorAll('*').length") < 200  # no DOM node per token
            assert not errors, errors
        finally:
            browser.close()
    assert (tmp_path / "playground.png").stat().st_size > 10_000
    assert outside == [], f"requests left the server: {outside}"

"""Speculative decoding through the server: the per-request field, --speculative, and the playground's toggle."""

from __future__ import annotations

import json

import httpx
import pytest

pytest.importorskip("fastapi")

from seekformer.serving import ServerConfig, ServerThread, create_app, load_model_dir  # noqa: E402
from seekformer.serving.demo import build_demo_model_dir  # noqa: E402

from .test_playground import CHROMIUM_ARGS, CHROMIUM, _browser  # noqa: E402


@pytest.fixture(scope="module")
def mtp_dir(tmp_path_factory):
    return build_demo_model_dir(tmp_path_factory.mktemp("mtp-model"), num_nextn_predict_layers=1)


def _complete(srv, **body) -> httpx.Response:
    body = {"model": "m", "prompt": "The United States", "max_tokens": 24, "temperature": 0, **body}
    return httpx.post(srv.url + "/v1/completions", json=body, timeout=60)


def test_speculative_requests_give_the_greedy_text(mtp_dir):
    model, tok = load_model_dir(mtp_dir)
    with ServerThread(create_app(model, tok, ServerConfig(model_name="m"))) as srv:
        plain = _complete(srv).json()["choices"][0]["text"]
        fast = _complete(srv, speculative=True).json()["choices"][0]["text"]
        streamed = httpx.post(srv.url + "/v1/completions", json={
            "model": "m", "prompt": "The United States", "max_tokens": 24, "temperature": 0, "speculative": True,
            "stream": True}, timeout=60).text
        sampled = _complete(srv, speculative=True, temperature=0.8, seed=3)  # sampled: plain decoding
        r = _complete(srv, speculative="yes")
    assert fast == plain and plain
    assert "".join(json.loads(line[5:])["choices"][0]["text"] for line in streamed.splitlines()
                   if line.startswith("data:") and "[DONE]" not in line) == plain
    assert sampled.status_code == 200
    assert r.status_code == 400


def test_server_without_drafts_says_so(mtp_dir, tmp_path):
    model, tok = load_model_dir(mtp_dir)
    with ServerThread(create_app(model, tok, ServerConfig(model_name="m", speculative=False))) as srv:
        r = _complete(srv, speculative=True)
    assert r.status_code == 400 and "speculative" in r.json()["error"]["message"]
    dense_model, dense_tok = load_model_dir(build_demo_model_dir(tmp_path / "no-mtp"))
    with ServerThread(create_app(dense_model, dense_tok, ServerConfig(model_name="m"))) as srv:
        r = _complete(srv, speculative=True)
        assert _complete(srv).status_code == 200
    assert r.status_code == 400 and "MTP" in r.json()["error"]["message"]


def test_playground_speculative_toggle(mtp_dir):
    """The box sends speculative greedy requests: the page shows the same text as a plain greedy request."""
    model, tok = load_model_dir(mtp_dir)
    with ServerThread(create_app(model, tok, ServerConfig(model_name="m"))) as srv:
        want = _complete(srv, max_tokens=20).json()["choices"][0]["text"]
        with _browser() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                errors = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(srv.url + "/")
                page.get_by_test_id("prompt").fill("The United States")
                page.fill("#max-tokens", "20")
                page.get_by_test_id("speculative").check()
                assert page.is_disabled("#temperature")
                page.get_by_test_id("send").click()
                page.wait_for_selector('[data-testid="output"][data-done="1"]', timeout=60_000)
                assert page.get_by_test_id("output").inner_text() == "The United States" + want
                assert "speculative" in page.get_by_test_id("speed").inner_text()
                assert not errors, errors
            finally:
                browser.close()


def test_server_speculates_by_default_with_more_drafts(mtp_dir):
    model, tok = load_model_dir(mtp_dir)
    with ServerThread(create_app(model, tok, ServerConfig(model_name="m"))) as srv:
        plain = _complete(srv).json()["choices"][0]["text"]
    app = create_app(model, tok, ServerConfig(model_name="m", speculative=True, speculative_tokens=3))
    with ServerThread(app) as srv:
        fast = _complete(srv).json()["choices"][0]["text"]
        off = _complete(srv, speculative=False).json()["choices"][0]["text"]
    batch = app.state.backend.engine.batch
    assert fast == plain == off
    assert batch.drafter.k == 3 and batch.spec_stats["forwards"] > 0


def test_serve_cli_speculative_needs_mtp(tmp_path):
    import subprocess
    import sys

    d = build_demo_model_dir(tmp_path / "no-mtp")
    proc = subprocess.run([sys.executable, "-m", "seekformer", "serve", str(d), "--port", "0", "--speculative"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "MTP" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr

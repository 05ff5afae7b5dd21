"""`seekformer serve` under hostile input (issue 16, server items 1-5) and its infrastructure (issue 15:
CORS, /v1/embeddings, prometheus-client metrics). The model is the tiny random demo model."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from seekformer.evaluation.perplexity import score_tokens  # noqa: E402
from seekformer.inference import engine as engine_mod  # noqa: E402
from seekformer.inference import decoding as decoding_mod  # noqa: E402
from seekformer.inference.engine import Engine  # noqa: E402
from seekformer.inference.sampling import SamplingParams  # noqa: E402
from seekformer.serving import ServerConfig, ServerThread, create_app, load_model_dir  # noqa: E402
from seekformer.serving.prompt_work import PromptJob, PromptWork  # noqa: E402

NAME = "tiny-seek"


@pytest.fixture(scope="module")
def reference(seek_model_dir):
    return load_model_dir(seek_model_dir)


def _server(model_dir, **config) -> ServerThread:
    model, tok = load_model_dir(model_dir)
    return ServerThread(create_app(model, tok, ServerConfig(model_name=NAME, **config)))


@pytest.fixture(scope="module")
def server(seek_model_dir):
    with _server(seek_model_dir, max_batch_size=8, max_body_bytes=200_000, cors_origins=["http://app.example"],
                 prefill_chunk=64) as srv:
        yield srv


def _post(srv, path, body, **kw):
    return httpx.post(srv.url + path, json=body, timeout=kw.pop("timeout", 60), **kw)


def _stream(url: str, body: dict) -> tuple[str, list[str]]:
    """(text, raw data lines) of a streamed completion."""
    text, lines = "", []
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data:"):
                data = line[5:].strip()
                lines.append(data)
                if data != "[DONE]":
                    chunk = json.loads(data)
                    text += "".join(c.get("text", "") for c in chunk.get("choices", []))
    return text, lines


# ---------------------------------------------------------------- item 1: isolation and bounded fields
@pytest.mark.parametrize("field,value", [("seed", 2 ** 70), ("seed", -(2 ** 64)), ("top_k", 2 ** 40),
                                         ("min_tokens", 2 ** 62), ("max_tokens", 2 ** 63),
                                         ("repetition_penalty", 1e30), ("stop_token_ids", list(range(100)))])
def test_out_of_range_values_are_400_not_500(server, field, value):
    r = _post(server, "/v1/completions", {"model": NAME, "prompt": "Hi", "max_tokens": 2, field: value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field and "Traceback" not in r.text


def test_nan_and_infinity_are_400(server):
    for raw in ('{"model": "%s", "prompt": "Hi", "temperature": NaN}' % NAME,
                '{"model": "%s", "prompt": "Hi", "top_p": Infinity}' % NAME):
        r = httpx.post(server.url + "/v1/completions", content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, r.text


def test_largest_64_bit_seed_works(server):
    r = _post(server, "/v1/completions", {"model": NAME, "prompt": "Hi", "max_tokens": 2, "n": 2,
                                          "seed": 2 ** 64 - 1, "temperature": 1.0})
    assert r.status_code == 200 and len(r.json()["choices"]) == 2


def test_engine_failure_of_one_request_ends_only_that_request(reference, monkeypatch):
    """A request whose sampling raises (here: a patched choose()) ends with finish_reason "error"; the
    requests batched with it produce exactly what they produce alone."""
    model, tok = reference
    prompts = [tok.encode(p) for p in ("The United States", "Call me Ishmael.", "Fellow citizens")]
    alone = Engine(model, tok, max_batch_size=4).generate(prompts, SamplingParams(max_new_tokens=6))
    real = decoding_mod.choose

    def flaky(logits, params, *a, **kw):
        if any(p.seed == 666 for p in params):
            raise RuntimeError("sampling exploded")
        return real(logits, params, *a, **kw)

    monkeypatch.setattr(decoding_mod, "choose", flaky)
    eng = Engine(model, tok, max_batch_size=4)
    ids = [eng.add_request(p, SamplingParams(max_new_tokens=6)) for p in prompts]
    bad = eng.add_request(prompts[0], SamplingParams(max_new_tokens=6, seed=666))
    out = {i: [] for i in ids + [bad]}
    reasons = {}
    while eng.has_work():
        for ev in eng.step():
            if ev.token_id is not None:
                out[ev.request_id].append(ev.token_id)
            if ev.finish_reason:
                reasons[ev.request_id] = ev
    assert reasons[bad].finish_reason == "error" and "exploded" in str(reasons[bad].error)
    assert [out[i] for i in ids] == [c.token_ids for c in alone]


def test_server_failure_of_one_request_spares_the_others(seek_model_dir, monkeypatch, capfd):
    """Item 1 through HTTP: three streams run while a request fails inside the engine; the streams end
    with [DONE], the failing request gets a JSON 500 (no traceback in it)."""
    real = engine_mod.make_generator

    def bad_seed(seed, device):
        if seed == 666:
            raise RuntimeError("generator exploded")
        return real(seed, device)

    monkeypatch.setattr(engine_mod, "make_generator", bad_seed)
    with _server(seek_model_dir, max_batch_size=8) as srv:
        body = {"model": NAME, "prompt": "Hello", "max_tokens": 60, "temperature": 0, "ignore_eos": True}
        with ThreadPoolExecutor(4) as pool:
            streams = [pool.submit(_stream, srv.url, body) for _ in range(3)]
            time.sleep(0.3)
            r = _post(srv, "/v1/completions", {"model": NAME, "prompt": "Hi", "max_tokens": 4, "seed": 666})
            results = [f.result() for f in streams]
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
        assert "generator exploded" in r.json()["error"]["message"]
        for text, lines in results:
            assert lines[-1] == "[DONE]" and len(text) > 0
        assert srv.app.state.backend.outstanding == 0
    assert "Traceback" not in capfd.readouterr().err


# ---------------------------------------------------------------- item 2: sizes and the event loop
def test_oversized_body_is_413_before_parsing(server):
    big = b'{"model": "x", "prompt": "' + b"a" * 300_000 + b'"}'
    r = httpx.post(server.url + "/v1/completions", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert "--max-body-bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: counted while it arrives
        for _ in range(40):
            yield b"a" * 10_000

    r = httpx.post(server.url + "/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_prompt_characters_are_bounded_before_tokenizing(server, monkeypatch):
    handlers_tok = server.app.state.backend.tokenizer
    calls = []
    real = handlers_tok.encode
    monkeypatch.setattr(handlers_tok, "encode", lambda *a, **k: calls.append(1) or real(*a, **k))
    r = _post(server, "/v1/completions", {"model": NAME, "prompt": "x" * 150_000, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = _post(server, "/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "y" * 150_000}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert not calls  # refused on length alone


def test_tokenizing_runs_off_the_event_loop(server, monkeypatch):
    """While a prompt is being tokenized (held here until /health has answered), /health answers."""
    tok = server.app.state.backend.tokenizer
    real, entered, release = tok.encode, threading.Event(), threading.Event()

    def slow_encode(*a, **k):
        entered.set()
        release.wait(30)
        return real(*a, **k)

    monkeypatch.setattr(tok, "encode", slow_encode)
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(_post, server, "/v1/completions", {"model": NAME, "prompt": "Hello", "max_tokens": 2})
        assert entered.wait(30)
        health = httpx.get(server.url + "/health", timeout=10)  # would time out if the loop were blocked
        release.set()
        assert health.status_code == 200 and fut.result().status_code == 200


# ---------------------------------------------------------------- item 3: disconnects
def test_non_streaming_request_is_cancelled_when_its_client_leaves(server):
    backend = server.app.state.backend
    metrics = server.app.state.metrics
    def generated():
        return metrics.registry.get_sample_value("seekformer_generation_tokens_total")

    before = generated()
    body = {"model": NAME, "prompt": "Hello", "max_tokens": 400, "n": 4, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        _post(server, "/v1/completions", body, timeout=httpx.Timeout(60, read=0.5))
    deadline = time.monotonic() + 30
    while backend.outstanding and time.monotonic() < deadline:
        time.sleep(0.05)
    assert backend.outstanding == 0
    assert generated() - before < 4 * 400  # stopped early


# ---------------------------------------------------------------- item 4: head-of-line blocking
def test_chunked_prefill_keeps_running_requests_decoding(reference):
    """A 200-token prompt is prefilled 32 tokens per step while a running request emits a token every
    step, and its greedy output equals the unchunked engine's."""
    model, tok = reference
    long_prompt = (tok.encode("The United States of America " * 40))[:200]
    short = tok.encode("Hello")
    ref = Engine(model, tok, max_batch_size=2, prefill_chunk=512).generate([long_prompt, short],
                                                                           SamplingParams(max_new_tokens=5))
    eng = Engine(model, tok, max_batch_size=2, prefill_chunk=32)
    a = eng.add_request(short, SamplingParams(max_new_tokens=40, ignore_eos=True))
    eng.step()  # `a` is running
    b = eng.add_request(long_prompt, SamplingParams(max_new_tokens=5))
    steps_until_b, tokens_b = 0, []
    while True:
        events = eng.step()
        steps_until_b += 1
        assert any(ev.request_id == a and ev.token_id is not None for ev in events)  # never stalls
        tokens_b += [ev.token_id for ev in events if ev.request_id == b and ev.token_id is not None]
        if tokens_b:
            break
    assert steps_until_b == -(-200 // 32)  # one chunk per step
    while eng.has_work():
        tokens_b += [ev.token_id for ev in eng.step() if ev.request_id == b and ev.token_id is not None]
    assert tokens_b == ref[0].token_ids


def test_chunked_scoring_equals_one_forward(reference):
    model, tok = reference
    ids = tok.encode("Call me Ishmael. Some years ago, never mind how long precisely " * 6)[:150]

    class Sub:
        cancelled = False

    work = PromptWork(model, chunk_tokens=40)
    work.add(PromptJob(Sub(), 0, ids, "score", top_n=3))
    done = []
    while work:
        done += work.run_round()
    assert len(done) == 1
    got, want = done[0][1], score_tokens(model, [ids], top_n=3)[0]
    assert torch.allclose(got.logprobs, want.logprobs, atol=1e-4)
    assert torch.equal(got.top_ids, want.top_ids) and torch.equal(got.greedy, want.greedy)


def test_scoring_flood_does_not_hold_up_a_short_request(server):
    """40 echo+logprobs prompts are in flight when a 4-token request arrives: it finishes long before the
    flood does (scoring goes in bounded rounds between decode steps)."""
    finished = []
    lock = threading.Lock()
    prompt = "To be, or not to be, that is the question " * 5

    def score(i):
        r = _post(server, "/v1/completions", {"model": NAME, "prompt": prompt, "max_tokens": 1, "echo": True,
                                              "logprobs": 5}, timeout=120)
        with lock:
            finished.append(("score", r.status_code))

    with ThreadPoolExecutor(40) as pool, ThreadPoolExecutor(1) as other:
        jobs = [pool.submit(score, i) for i in range(40)]
        while server.app.state.backend.outstanding < 20:
            time.sleep(0.01)
        with lock:
            started_at = len(finished)
        r = other.submit(_post, server, "/v1/completions", {"model": NAME, "prompt": "Hi", "max_tokens": 4}).result()
        with lock:
            finished.append(("short", r.status_code))
        for j in jobs:
            j.result()
    assert all(code == 200 for _, code in finished)
    overtaken = [kind for kind, _ in finished].index("short") - started_at
    assert overtaken < (40 - started_at) / 2, f"{overtaken} scoring requests finished before the short one"


# ---------------------------------------------------------------- item 5: CLI failures are one line
def _run_cli(args, prelude=""):
    code = f"import sys; {prelude}\nfrom seekformer.cli import main\nmain({args!r})"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_serve_on_a_busy_port_is_one_line_exit_2(seek_model_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        p = _run_cli(["serve", str(seek_model_dir), "--port", str(port)])
    assert p.returncode == 2, p.stderr
    assert "already in use" in p.stderr and "Traceback" not in p.stderr and "serving" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_serve_without_the_serve_extra_is_one_line_exit_2(seek_model_dir):
    p = _run_cli(["serve", str(seek_model_dir)], prelude="sys.modules['fastapi'] = None")
    assert p.returncode == 2, p.stderr
    assert 'pip install -e ".[serve]"' in p.stderr and "Traceback" not in p.stderr


# ---------------------------------------------------------------- issue 15: CORS, embeddings, metrics
def test_cors_preflight_and_simple_request(server):
    r = httpx.options(server.url + "/v1/completions", headers={
        "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
    r = httpx.get(server.url + "/v1/models", headers={"Origin": "http://app.example"})
    assert r.headers["access-control-allow-origin"] == "http://app.example"
    r = httpx.get(server.url + "/v1/models", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_embeddings_are_pooled_hidden_states(server, reference):
    model, tok = reference
    texts = ["The United States", "Call me Ishmael. Some years ago"]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0)
    r = client.embeddings.create(model=NAME, input=texts, encoding_format="float")
    assert [d.index for d in r.data] == [0, 1] and r.usage.prompt_tokens == sum(len(tok.encode(t)) for t in texts)
    with torch.no_grad():
        for d, t in zip(r.data, texts):
            h = model(torch.tensor([tok.encode(t)]), return_hidden=True).hidden_states[0]
            assert np.allclose(d.embedding, h.mean(0).numpy(), atol=1e-4)
    last = _post(server, "/v1/embeddings", {"model": NAME, "input": tok.encode(texts[0]), "pooling": "last"}).json()
    with torch.no_grad():
        h = model(torch.tensor([tok.encode(texts[0])]), return_hidden=True).hidden_states[0, -1]
    assert np.allclose(last["data"][0]["embedding"], h.numpy(), atol=1e-4)
    b64 = _post(server, "/v1/embeddings", {"model": NAME, "input": texts[0], "encoding_format": "base64"}).json()
    vec = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(vec, r.data[0].embedding, atol=1e-6)
    # an input longer than the prefill chunk (64) goes through the chunked path: same pooling
    ids = tok.encode("Fellow citizens of the Senate and of the House " * 12)[:150]
    long = _post(server, "/v1/embeddings", {"model": NAME, "input": ids}).json()["data"][0]["embedding"]
    with torch.no_grad():
        h = model(torch.tensor([ids]), return_hidden=True).hidden_states[0].mean(0)
    assert np.allclose(long, h.numpy(), atol=1e-4)
    for bad, param in (({"input": []}, "input"), ({"input": [10 ** 6]}, "input"), ({"input": "x", "dimensions": 3},
                                                                                    "dimensions")):
        r = _post(server, "/v1/embeddings", {"model": NAME, **bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_metrics_come_from_prometheus_client(server):
    r = httpx.get(server.url + "/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    from prometheus_client.parser import text_string_to_metric_families

    names = {f.name for f in text_string_to_metric_families(r.text)}
    assert {"seekformer_requests", "seekformer_generation_tokens", "seekformer_queue_depth",
            "seekformer_request_latency_seconds", "seekformer_time_to_first_token_seconds"} <= names

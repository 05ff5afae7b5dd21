"""`seekformer serve` under load: simultaneous streams are batched and stay correct, a full queue answers
429, a client that goes away frees its slot, and shutdown lets in-flight requests finish."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from seekformer.serving import ServerConfig, ServerThread, create_app, load_model_dir  # noqa: E402

NAME = "tiny-seek"
PROMPTS = ["The United States", "Call me Ishmael.", "To be, or not to be", "Fellow citizens"]


def _server(model_dir, **config) -> ServerThread:
    model, tok = load_model_dir(model_dir)
    return ServerThread(create_app(model, tok, ServerConfig(model_name=NAME, **config)))


def _client(srv: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _stream_text(client, prompt: str, max_tokens: int, **kw) -> tuple[str, str | None]:
    text, reason = "", None
    for chunk in client.completions.create(model=NAME, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True, **kw):
        text += chunk.choices[0].text
        reason = chunk.choices[0].finish_reason or reason
    return text, reason


def test_sixteen_simultaneous_streams_are_batched_and_correct(seek_model_dir):
    with _server(seek_model_dir, max_batch_size=16) as srv:
        client = _client(srv)
        single = {p: client.completions.create(model=NAME, prompt=p, max_tokens=24, temperature=0).choices[0].text
                  for p in PROMPTS}
        jobs = [PROMPTS[i % len(PROMPTS)] for i in range(16)]
        barrier = threading.Barrier(16)

        def run(prompt):
            barrier.wait()
            return _stream_text(client, prompt, 24)

        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(run, jobs))
        backend = srv.app.state.backend
    for prompt, (text, reason) in zip(jobs, results):
        assert text == single[prompt]
        assert reason in ("length", "stop")
    assert backend.peak_running > 1  # decoded together, not one after another


def test_full_queue_answers_429_and_disconnect_frees_the_slot(seek_model_dir):
    with _server(seek_model_dir, max_batch_size=1, max_queue=0) as srv:
        client = _client(srv)
        backend = srv.app.state.backend
        stream = client.completions.create(model=NAME, prompt="Hello", max_tokens=400, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        next(iter(stream))  # the long request is now in flight
        with pytest.raises(openai.RateLimitError) as info:
            client.completions.create(model=NAME, prompt="Hi", max_tokens=2)
        assert info.value.status_code == 429
        stream.close()  # the client goes away: its sequence is cancelled
        deadline = time.monotonic() + 60
        while backend.outstanding and time.monotonic() < deadline:
            time.sleep(0.05)
        assert backend.outstanding == 0
        r = client.completions.create(model=NAME, prompt="Hi", max_tokens=2)
        assert r.usage.completion_tokens >= 1


def test_shutdown_lets_in_flight_requests_finish(seek_model_dir):
    srv = _server(seek_model_dir, max_batch_size=4).start()
    client = _client(srv)
    got = {}

    def long_stream():
        got["stream"] = _stream_text(client, "Hello", 150, extra_body={"ignore_eos": True})

    def long_plain():
        r = client.completions.create(model=NAME, prompt="World", max_tokens=150, temperature=0,
                                      extra_body={"ignore_eos": True})
        got["plain"] = (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens)

    threads = [threading.Thread(target=long_stream), threading.Thread(target=long_plain)]
    for t in threads:
        t.start()
    backend = srv.app.state.backend
    deadline = time.monotonic() + 60
    while backend.running < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    srv.stop()  # as on SIGTERM: stop accepting, finish open responses, drain the backend
    for t in threads:
        t.join(60)
    assert got["stream"][1] == "length"
    assert got["plain"][1:] == ("length", 150)
    assert not srv.thread.is_alive() and not backend.alive


def test_bench_measure_reports_every_level(seek_model_dir):
    """`seekformer bench serve`'s client side, against an in-process server (a smoke test, not a timing)."""
    from seekformer.bench.serve import markdown, measure

    with _server(seek_model_dir, max_batch_size=4) as srv:
        rows = measure(srv.url, NAME, levels=(1, 2), requests=1, max_tokens=4)
    assert [r["clients"] for r in rows] == [1, 2] and [r["tokens"] for r in rows] == [4, 8]
    assert rows[0]["speedup"] == 1.0 and all(r["p95_latency_s"] >= r["p50_latency_s"] > 0 for r in rows)
    table = markdown(rows, {"model": "tiny", "max_tokens": 4, "requests_per_client": 1, "machine": "x"},
                     "seekformer bench serve")
    assert table.count("\n| ") == 3  # header + 2 rows


def test_seekformer_serve_command_and_sigterm(seek_model_dir, capsys):
    """A user's session: `seekformer serve DIR --api-key K`, the openai client, then SIGTERM mid-stream."""
    import signal
    import subprocess
    import sys

    import httpx

    from seekformer.cli import main
    from seekformer.serving.server import free_port

    with pytest.raises(SystemExit) as e:
        main(["serve", str(seek_model_dir / "missing")])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "seekformer", "serve", str(seek_model_dir), "--port", str(port),
                             "--api-key", "k", "--model-name", NAME, "--log-level", "warning"])
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens >= 1
        stream = iter(client.completions.create(model=NAME, prompt="Hello", max_tokens=120, stream=True,
                                                extra_body={"ignore_eos": True}))
        next(stream)
        proc.send_signal(signal.SIGTERM)
        reasons = [c.choices[0].finish_reason for c in stream]
        assert reasons[-1] == "length"  # the stream in flight ran to its end
        assert proc.wait(60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()

"""Issue 16's acceptance for the server: concurrent streams plus a flood of hostile requests (huge bodies,
overflow values, echo+logprobs floods, long prompts, dropped connections) against `seekformer serve` in its
own process. Nothing else fails, the streams keep decoding, /health answers, memory returns, and the
server log holds no traceback.

The quick variant (8 streams) runs in the default suite and checks behaviour; the slow one (64 streams)
also checks the timing bounds: /health within a second, no stream gap above a few decode steps. The
streams and the /health poller run in their own processes (asyncio clients), so what they time is the
server, not the GIL of a test process that is busy flooding.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")

from seekformer.serving.server import free_port  # noqa: E402

NAME = "tiny-seek"
LIMIT = 1_000_000  # --max-body-bytes


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class Server:
    """`seekformer serve` in a subprocess, its stderr in a file."""

    def __init__(self, model_dir, log_path, batch: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "seekformer", "serve", str(model_dir), "--port", str(self.port), "--model-name",
             NAME, "--max-batch-size", str(batch), "--max-queue", "512", "--max-body-bytes", str(LIMIT),
             "--prefill-chunk", "128", "--threads", "1", "--log-level", "warning"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, open(log_path).read()
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("the server did not start")

    def stop(self) -> str:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        return open(self.log_path).read()


def _stream_body(prompt: str, tokens: int) -> dict:
    return {"model": NAME, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}


def _read_sse(line: str, acc: dict, stamps: list | None) -> None:
    """Fold one server-sent-events line into acc {tokens, reason, done}; stamps gets the time of chunks."""
    if not line.startswith("data:"):
        return
    data = line[5:].strip()
    if data == "[DONE]":
        acc["done"] = True
        return
    chunk = json.loads(data)
    if stamps is not None and chunk.get("choices"):
        stamps.append(time.perf_counter())
    for c in chunk.get("choices", []):
        acc["reason"] = c.get("finish_reason") or acc["reason"]
    if chunk.get("usage"):
        acc["tokens"] = chunk["usage"]["completion_tokens"]


def _stream(url: str, prompt: str, tokens: int) -> tuple[int, str | None, bool]:
    """(completion tokens, finish reason, saw [DONE]) of a streamed completion."""
    acc = {"tokens": 0, "reason": None, "done": False}
    with httpx.stream("POST", url + "/v1/completions", json=_stream_body(prompt, tokens), timeout=300) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            _read_sse(line, acc, None)
    return acc["tokens"], acc["reason"], acc["done"]


async def _astream(client, url: str, prompt: str, tokens: int, stamps: list) -> tuple[int, str | None, bool]:
    acc = {"tokens": 0, "reason": None, "done": False}
    async with client.stream("POST", url + "/v1/completions", json=_stream_body(prompt, tokens)) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            _read_sse(line, acc, stamps)
    return acc["tokens"], acc["reason"], acc["done"]


def stream_client_main(url: str, streams: int, tokens: int, out: str) -> None:
    """Run in its own process: `streams` concurrent streams; writes OUT.started once every stream has
    two chunks, then OUT (JSON: per stream (tokens, reason, done) and the gaps between its chunks)."""
    async def main():
        stamps = [[] for _ in range(streams)]
        limits = httpx.Limits(max_connections=streams + 4)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:
            tasks = [asyncio.create_task(_astream(client, url, f"Call me Ishmael {k}", tokens, stamps[k]))
                     for k in range(streams)]
            while min(len(s) for s in stamps) < 2 and not all(t.done() for t in tasks):
                await asyncio.sleep(0.01)
            Path(out + ".started").touch()
            results = await asyncio.gather(*tasks)
        gaps = [b - a for s in stamps for a, b in zip(s, s[1:])]
        Path(out).write_text(json.dumps({"streams": results, "gaps": gaps}))

    asyncio.run(main())


def health_poller_main(url: str, out: str, stop: str) -> None:
    """Run in its own process: GET /health every 0.1 s until the file `stop` exists; writes the latencies."""
    times = []
    with httpx.Client(timeout=60) as client:
        while not os.path.exists(stop):
            t = time.perf_counter()
            assert client.get(url + "/health").status_code == 200
            times.append(time.perf_counter() - t)
            time.sleep(0.1)
    Path(out).write_text(json.dumps(times))


def _spawn(call: str) -> subprocess.Popen:
    code = f"from tests.test_serving_hostile import *\n{call}"
    return subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _run_streams(url: str, streams: int, tokens: int, out: Path, during=None) -> dict:
    """The streams in a client process; `during()` runs once they all stream. Returns the client's JSON."""
    proc = _spawn(f"stream_client_main({url!r}, {streams}, {tokens}, {str(out)!r})")
    while not Path(str(out) + ".started").exists():
        assert proc.poll() is None, "the stream client died"
        time.sleep(0.02)
    extra = during() if during is not None else None
    assert proc.wait(900) == 0
    return {**json.loads(out.read_text()), "during": extra}


def _raw_huge_body(port: int, chunked: bool) -> bytes:
    """A body far over the limit: announced by Content-Length (only 64 kB sent), or chunked (sent until the
    server answers). Returns the status line."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        if not chunked:
            s.sendall((head + "Content-Length: 50000000\r\n\r\n").encode() + b'{"model": "' + b"a" * 65536)
        else:
            s.sendall((head + "Transfer-Encoding: chunked\r\n\r\n").encode())
            piece = b"%x\r\n" % 65536 + b"a" * 65536 + b"\r\n"
            try:
                for _ in range(LIMIT // 65536 + 4):
                    s.sendall(piece)
            except OSError:  # the server answered and closed: fine
                pass
        return s.recv(65536).split(b"\r\n", 1)[0]
    finally:
        s.close()


OVERFLOWS = [{"seed": 2 ** 70}, {"seed": -(2 ** 80)}, {"top_k": 2 ** 62}, {"max_tokens": 2 ** 64},
             {"min_tokens": 2 ** 63}, {"n": 10 ** 9}, {"logprobs": 2 ** 40}, {"temperature": 1e308},
             {"stop_token_ids": [2 ** 70]}, {"prompt": [2 ** 63]}, {"prompt": "x" * 900_000}]


def _hostile(url: str, port: int, kind: str, i: int) -> tuple[str, int]:
    """One hostile request; (kind, status or 0 for a dropped connection)."""
    if kind == "huge":
        line = _raw_huge_body(port, chunked=bool(i % 2))
        return kind, int(line.split()[1]) if line.startswith(b"HTTP/1.1") else -1
    if kind == "overflow":
        body = {"model": NAME, "prompt": "Hi", "max_tokens": 4, **OVERFLOWS[i % len(OVERFLOWS)]}
        return kind, httpx.post(url + "/v1/completions", json=body, timeout=120).status_code
    if kind == "echo":
        prompt = "To be, or not to be, that is the question: " * 20  # ~ 320 tokens: scored in chunks
        body = {"model": NAME, "prompt": prompt, "max_tokens": 1, "echo": True, "logprobs": 20}
        return kind, httpx.post(url + "/v1/completions", json=body, timeout=300).status_code
    if kind == "long":
        body = {"model": NAME, "prompt": "Fellow citizens of the Senate " * 25, "max_tokens": 4}
        return kind, httpx.post(url + "/v1/completions", json=body, timeout=300).status_code
    if kind == "drop_stream":
        body = {"model": NAME, "prompt": "Hello", "max_tokens": 300, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            next(r.iter_lines())
        return kind, 0
    if kind == "drop_plain":
        body = {"model": NAME, "prompt": "Hello", "max_tokens": 300, "n": 4, "ignore_eos": True}
        try:
            httpx.post(url + "/v1/completions", json=body, timeout=httpx.Timeout(120, read=0.3))
        except httpx.ReadTimeout:
            return kind, 0
        return kind, -1
    raise ValueError(kind)


def _low_priority_thread() -> None:
    """The flooding client threads run at the lowest CPU priority: on a 2-core machine their own HTTP work
    would otherwise take the cores from the server and the streams, and the gaps would time the client."""
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def _p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) > 100 else max(values)


def run_hostile(model_dir, tmp: Path, streams: int, tokens: int, floods: dict[str, int]) -> dict:
    srv = Server(model_dir, tmp / "server.log", batch=streams)
    report: dict = {}
    try:
        # warm up every path once, then take the memory baseline
        for kind in ("echo", "long", "overflow"):
            _hostile(srv.url, srv.port, kind, 0)
        _stream(srv.url, "Hello", 8)
        time.sleep(0.5)
        report["rss_start_mb"] = _rss_mb(srv.proc.pid)
        # baseline: the streams alone (median gap between chunks = one decode step of this batch)
        poller = _spawn(f"health_poller_main({srv.url!r}, {str(tmp / 'health0.json')!r}, {str(tmp / 'stop0')!r})")
        base = _run_streams(srv.url, streams, tokens, tmp / "base.json")
        (tmp / "stop0").touch()
        assert poller.wait(120) == 0
        report["step_s"] = statistics.median(base["gaps"])
        report["base_gap_max_s"] = max(base["gaps"])
        report["base_gap_p99_s"] = _p99(base["gaps"])
        report["base_health_max_s"] = max(json.loads((tmp / "health0.json").read_text()))
        # the streams again, with the flood and /health polls
        poller = _spawn(f"health_poller_main({srv.url!r}, {str(tmp / 'health.json')!r}, {str(tmp / 'stop')!r})")
        jobs = [(kind, i) for kind, n in floods.items() for i in range(n)]

        def flood():
            with ThreadPoolExecutor(32, initializer=_low_priority_thread) as pool:
                return list(pool.map(lambda job: _hostile(srv.url, srv.port, *job), jobs))

        run = _run_streams(srv.url, streams, tokens, tmp / "flood.json", during=flood)
        (tmp / "stop").touch()
        assert poller.wait(120) == 0
        health = json.loads((tmp / "health.json").read_text())
        report["streams"] = [tuple(x) for x in run["streams"]]
        report["hostile"] = run["during"]
        report["health_max_s"] = max(health)
        gaps = run["gaps"]
        report["gap_max_s"] = max(gaps)
        report["gap_p99_s"] = _p99(gaps)
        deadline = time.monotonic() + 60
        while httpx.get(srv.url + "/health").json()["running"] and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2.5)  # one malloc_trim interval
        httpx.post(srv.url + "/v1/completions", json={"model": NAME, "prompt": "Hi", "max_tokens": 1})
        time.sleep(0.5)
        report["rss_end_mb"] = _rss_mb(srv.proc.pid)
    finally:
        report["log"] = srv.stop()
    return report


def _check(report: dict, streams: int, tokens: int) -> None:
    assert report["streams"] == [(tokens, "length", True)] * streams  # nobody else failed
    expected = {"huge": {413}, "overflow": {400}, "echo": {200}, "long": {200}, "drop_stream": {0},
                "drop_plain": {0}}
    for kind, status in report["hostile"]:
        assert status in expected[kind], (kind, status)
    assert "Traceback" not in report["log"], report["log"][-3000:]
    assert report["rss_end_mb"] <= 1.2 * report["rss_start_mb"], report


def test_hostile_flood_quick(seek_model_dir, tmp_path):
    floods = {"huge": 2, "overflow": len(OVERFLOWS), "echo": 4, "long": 2, "drop_stream": 2, "drop_plain": 2}
    report = run_hostile(seek_model_dir, tmp_path, streams=8, tokens=48, floods=floods)
    _check(report, 8, 48)


@pytest.mark.slow
def test_hostile_flood_64_streams(seek_model_dir, tmp_path):
    floods = {"huge": 8, "overflow": 2 * len(OVERFLOWS), "echo": 40, "long": 8, "drop_stream": 8,
              "drop_plain": 8}
    load = os.getloadavg()[0]  # before the test: its own clients load the machine while it runs
    report = run_hostile(seek_model_dir, tmp_path, streams=64, tokens=160, floods=floods)
    figures = {k: round(v, 3) for k, v in report.items() if k not in ("log", "streams", "hostile")}
    print(figures)
    _check(report, 64, 160)
    if load > 0.5:  # wall-clock bounds mean nothing on a machine that was busy before the test began
        print(f"timing bounds not checked: load average {load:.1f} before the test")
        return
    assert report["health_max_s"] < 1.0, figures
    # the flood adds at most a few decode steps to the streams' waits (vs the same streams without it)
    assert report["gap_p99_s"] <= report["base_gap_p99_s"] + 4 * report["step_s"] + 0.05, figures
    assert report["gap_max_s"] <= report["base_gap_max_s"] + 8 * report["step_s"] + 0.1, figures

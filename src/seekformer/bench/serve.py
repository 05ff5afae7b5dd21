"""Serving throughput: aggregate tokens/s and latency with 1, 4 and 16 concurrent clients.

    rows, info = run_serve_bench(model_dir)      # starts `seekformer serve` in a subprocess on a free port
    write_report("benchmarks/results/serve.md", markdown(rows, info, command_line("serve")))

Each level runs C clients at once; each client sends `requests` streaming completions one after another
(a closed loop), every one generating exactly `max_tokens` tokens (`ignore_eos`), so levels do the same
work per request. Aggregate tokens/s = all completion tokens of the level / its wall time; latency is per
request, from sending it to its last byte; TTFT is the time to the first generated token. The server runs
in its own process (the clients' event loop never competes with it for the GIL) with `--max-batch-size`
equal to the largest level, so requests that arrive together are decoded in one batch.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import SeekformerError
from .report import Machine, header, table

QUICKSTART_DIR = Path("seekformer-quickstart")
PROMPTS = ["The United States", "Call me Ishmael. Some years ago", "To be, or not to be", "Fellow citizens of the"]


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


async def _one_request(client, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", url + "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise SeekformerError(f"the server answered {resp.status_code}: {(await resp.aread())[:200]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("choices") and first is None:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"latency": time.perf_counter() - start, "ttft": first or float("nan"), "tokens": tokens}


async def _level(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def worker(c: int) -> list[dict]:
            return [await _one_request(client, url, model, PROMPTS[(c + r) % len(PROMPTS)], max_tokens)
                    for r in range(requests)]

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(c) for c in range(clients))) for r in rs]
        wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    lat = [r["latency"] for r in results]
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "p50_latency_s": _percentile(lat, 0.5),
            "p95_latency_s": _percentile(lat, 0.95), "p50_ttft_s": _percentile([r["ttft"] for r in results], 0.5)}


def measure(url: str, model: str, levels=(1, 4, 16), requests: int = 4, max_tokens: int = 64) -> list[dict]:
    """Run every level against a live server at `url` (after one warm-up request); returns one row per level."""
    asyncio.run(_level(url, model, 1, 1, max_tokens))
    rows = [asyncio.run(_level(url, model, c, requests, max_tokens)) for c in levels]
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["speedup"] = r["tokens_per_s"] / base
    return rows


class ServerProcess:
    """`seekformer serve MODEL_DIR` in a subprocess on a free port (a context manager)."""

    def __init__(self, model_dir: str | os.PathLike, max_batch_size: int = 16, threads: int | None = None) -> None:
        from ..serving.server import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "seekformer", "serve", str(model_dir), "--port", str(self.port),
                    "--model-name", "bench", "--max-batch-size", str(max_batch_size), "--log-level", "warning"]
        if threads:
            self.cmd += ["--threads", str(threads)]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ServerProcess:
        import httpx

        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SeekformerError(f"the server exited: {self.proc.stderr.read()[-500:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SeekformerError("the server did not start within 300 s")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def default_model_dir(tmp: str) -> tuple[Path, str]:
    """The quickstart checkpoint when it exists (./seekformer-quickstart), else a random `tiny`-preset model."""
    from ..serving.demo import build_demo_model_dir

    if (QUICKSTART_DIR / "config.json").is_file() and (QUICKSTART_DIR / "tokenizer.json").is_file():
        return QUICKSTART_DIR, f"trained quickstart checkpoint ({QUICKSTART_DIR})"
    path = build_demo_model_dir(Path(tmp) / "tiny-random", preset="tiny")
    return path, "random-weight `tiny` preset (no quickstart checkpoint found; 512-token demo tokenizer)"


def run_serve_bench(model_dir: str | os.PathLike | None = None, levels=(1, 4, 16), requests: int = 4,
                    max_tokens: int = 64, threads: int | None = None, url: str | None = None,
                    model_name: str = "bench") -> tuple[list[dict], dict]:
    """Benchmark a server (started here on `model_dir`, or the one at `url`); returns (rows, info)."""
    import torch

    machine = Machine(threads or torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        if url is not None:
            rows = measure(url.rstrip("/"), model_name, levels, requests, max_tokens)
            desc, params = f"server at {url}", None
        else:
            if model_dir is None:
                path, desc = default_model_dir(tmp)
            else:
                path, desc = Path(model_dir), f"checkpoint {model_dir}"
            from ..checkpoint import load_config

            cfg = load_config(path)
            params = (cfg.num_parameters(), cfg.num_parameters(active=True))
            with ServerProcess(path, max_batch_size=max(levels), threads=threads) as srv:
                rows = measure(srv.url, "bench", levels, requests, max_tokens)
    info = {"machine": machine.line(), "model": desc, "parameters": params, "max_tokens": max_tokens,
            "requests_per_client": requests}
    return rows, info


def markdown(rows: list[dict], info: dict, command: str) -> str:
    """The benchmarks/results/serve.md report of `run_serve_bench`'s (rows, info)."""
    size = ""
    if info.get("parameters"):
        size = f", {info['parameters'][0] / 1e6:.1f}M parameters ({info['parameters'][1] / 1e6:.1f}M active)"
    lines = header("`seekformer serve` throughput", command, info["machine"])
    lines += [f"Model: {info['model']}{size}. Each client sends {info['requests_per_client']} streaming completions "
              f"in a row, {info['max_tokens']} tokens each (greedy, ignore_eos); the server decodes up to "
              f"{max(r['clients'] for r in rows)} sequences per step. When other jobs share the cores, absolute "
              "numbers are noisy; the ratio to one client is the figure to compare.", ""]
    lines += table(["clients", "requests", "tokens", "wall (s)", "aggregate tokens/s", "vs 1 client",
                    "p50 latency (s)", "p95 latency (s)", "p50 TTFT (s)"],
                   [[r["clients"], r["requests"], r["tokens"], f"{r['wall_s']:.2f}", f"{r['tokens_per_s']:.1f}",
                     f"{r['speedup']:.2f}x", f"{r['p50_latency_s']:.3f}", f"{r['p95_latency_s']:.3f}",
                     f"{r['p50_ttft_s']:.3f}"] for r in rows], align="r" * 9)
    return "\n".join(lines) + "\n"

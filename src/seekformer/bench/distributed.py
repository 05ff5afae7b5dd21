"""`seekformer bench distributed`: tokens/s of 1 process x T threads against P processes x T/P threads on this
machine, per strategy (DDP, FSDP2, FSDP2 + expert parallel), and the all-to-all traffic of expert parallelism.

Every configuration trains the same recipe for the same steps through the real command line; the figure is
the median of the logged `tokens_per_s` after the first records (warm-up). Ratios are against the 1-process
run measured in the same invocation.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from ..runtime import loadavg


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tokens_per_s(out: Path, skip: int = 1) -> float:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    tps = [r["tokens_per_s"] for r in recs if "tokens_per_s" in r][skip:]
    return statistics.median(tps) if tps else float("nan")


def all_to_all_bytes_per_token(hidden: int, k: int, dtype_bytes: int = 4) -> dict[str, float]:
    """Bytes one token moves per MoE layer in each direction pair: the formula 2*k*hidden*dtype and what
    seekformer sends (the gate weight rides as one extra column on the way out)."""
    return {"formula": 2 * k * hidden * dtype_bytes, "sent": k * (hidden + 1) * dtype_bytes + k * hidden * dtype_bytes}


def run_distributed_bench(preset: str = "tiny", steps: int = 30, seq_len: int = 256, batch_size: int = 16,
                          threads: int = 2, configs: list[tuple[str, int, str, int]] | None = None,
                          workdir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train `steps` steps per configuration (name, processes, strategy, expert_parallel); returns rows."""
    configs = configs or [("1 process", 1, "ddp", 1), ("DDP", 2, "ddp", 1), ("FSDP2", 2, "fsdp", 1),
                          ("FSDP2 + EP2", 2, "fsdp", 2)]
    root = Path(workdir or tempfile.mkdtemp(prefix="seekformer-bench-dist-"))
    recipe = {"model": {"preset": preset}, "tokenizer": {"vocab_size": 4096},
              "data": {"sources": ["builtin"], "cache_dir": str(root / "data")},
              "train": {"steps": steps, "seq_len": seq_len, "batch_size": batch_size, "eval_every": 0,
                        "eval_batches": 1, "save_every": 0, "log_every": 5, "progress": False}}
    (root / "r.yaml").write_text(yaml.safe_dump(recipe))
    rows = []
    for name, nproc, strategy, ep in configs:
        out = root / name.replace(" ", "_").replace("+", "")
        per = max(1, threads // nproc)
        env = dict(os.environ, OMP_NUM_THREADS=str(per))
        cmd = [sys.executable, "-m", "seekformer", "pretrain", str(root / "r.yaml"), "--train.out", str(out),
               "--train.threads", str(per), "--parallel.strategy", strategy, "--parallel.expert_parallel", str(ep)]
        if nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                   str(_port()), *cmd[1:]]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{proc.stderr[-2000:]}")
        rows.append({"name": name, "processes": nproc, "threads_per_process": per, "strategy": strategy,
                     "expert_parallel": ep, "tokens_per_s": _tokens_per_s(out), "wall_s": time.perf_counter() - t0})
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["ratio"] = r["tokens_per_s"] / base
    from ..config import SeekConfig

    cfg = SeekConfig.from_preset(preset)
    return {"rows": rows, "preset": preset, "steps": steps, "seq_len": seq_len, "batch_size": batch_size,
            "a2a": all_to_all_bytes_per_token(cfg.hidden_size, cfg.num_experts_per_tok),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "loadavg": loadavg()}


def to_markdown(res: dict[str, Any], command: str) -> str:
    """The benchmarks/results/distributed.md table."""
    lines = [f"`{command}`", "",
             f"preset `{res['preset']}`, {res['steps']} steps, global batch {res['batch_size']} x {res['seq_len']}, "
             f"fp32, gloo; {res['machine']}; load average at the end {res['loadavg']}", "",
             "| configuration | processes x threads | tokens/s | vs 1 process |", "|---|---|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['name']} | {r['processes']} x {r['threads_per_process']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['ratio']:.2f}x |")
    a = res["a2a"]
    lines += ["", f"All-to-all per token per MoE layer (fp32): formula 2*k*hidden*4 = {a['formula']:,} bytes; "
              f"seekformer sends {a['sent']:,} (the gate weight rides as one extra column on the way out)."]
    return "\n".join(lines) + "\n"

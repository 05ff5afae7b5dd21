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


def all_to_all_bytes_per_token(hidden: int, k: int, dtype_bytes: int = 4) -> dict[str, float]:
    """Bytes one token moves per MoE layer in each direction pair: the formula 2*k*hidden*dtype and what
    seekformer sends (the gate weight rides as one extra column on the way out)."""
    return {"formula": 2 * k * hidden * dtype_bytes, "sent": k * (hidden + 1) * dtype_bytes + k * hidden * dtype_bytes}


def _metric(out: Path, key: str, skip: int = 1) -> float:
    """The median of a logged metric after the first `skip` records (NaN when never logged)."""
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    vals = [r[key] for r in recs if key in r][skip:]
    return statistics.median(vals) if vals else float("nan")


def run_distributed_bench(preset: str = "tiny", steps: int = 30, seq_len: int = 256, batch_size: int = 16,
                          threads: int = 2, rounds: int = 2, configs: list[tuple[str, int, str, int]] | None = None,
                          workdir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train `steps` steps per configuration (name, processes, strategy, expert_parallel), the configurations
    interleaved over `rounds` rounds (so a change in the machine's load hits all of them); returns rows with
    the median tokens/s over rounds and each round's ratio to the 1-process run of the same round."""
    configs = configs or [("1 process", 1, "ddp", 1), ("DDP", 2, "ddp", 1), ("FSDP2", 2, "fsdp", 1),
                          ("FSDP2 + EP2", 2, "fsdp", 2)]
    root = Path(workdir or tempfile.mkdtemp(prefix="seekformer-bench-dist-"))
    recipe = {"model": {"preset": preset}, "tokenizer": {"vocab_size": 4096},
              "data": {"sources": ["builtin"], "cache_dir": str(root / "data")},
              "train": {"steps": steps, "seq_len": seq_len, "batch_size": batch_size, "eval_every": 0,
                        "eval_batches": 1, "save_every": 0, "log_every": 5, "progress": False}}
    (root / "r.yaml").write_text(yaml.safe_dump(recipe))
    load_start = loadavg()
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, *_ in configs}
    for i in range(rounds):
        for name, nproc, strategy, ep in configs:
            out = root / f"{name.replace(' ', '_').replace('+', '')}-{i}"
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
            runs[name].append({"tokens_per_s": _metric(out, "tokens_per_s"), "wall_s": time.perf_counter() - t0,
                               "a2a": _metric(out, "a2a_bytes_per_token_layer"),
                               "remote": _metric(out, "a2a_remote_fraction")})
    base_name = configs[0][0]
    rows = []
    for name, nproc, strategy, ep in configs:
        rs = runs[name]
        rows.append({"name": name, "processes": nproc, "threads_per_process": max(1, threads // nproc),
                     "strategy": strategy, "expert_parallel": ep,
                     "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                     "round_ratios": [r["tokens_per_s"] / b["tokens_per_s"] for r, b in zip(rs, runs[base_name])],
                     "a2a_bytes_per_token_layer": rs[-1]["a2a"], "a2a_remote_fraction": rs[-1]["remote"],
                     "wall_s": statistics.median(r["wall_s"] for r in rs)})
    for r in rows:
        r["ratio"] = statistics.median(r["round_ratios"])
    from ..config import SeekConfig

    cfg = SeekConfig.from_preset(preset)
    return {"rows": rows, "preset": preset, "steps": steps, "seq_len": seq_len, "batch_size": batch_size,
            "rounds": rounds, "a2a": all_to_all_bytes_per_token(cfg.hidden_size, cfg.num_experts_per_tok),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "loadavg": (load_start, loadavg())}


def to_markdown(res: dict[str, Any], command: str) -> str:
    """The benchmarks/results/distributed.md table."""
    la = ["n/a" if v is None else f"{v:.1f}" for v in res["loadavg"]]
    lines = [f"`{command}`", "",
             f"preset `{res['preset']}`, {res['steps']} steps, global batch {res['batch_size']} x {res['seq_len']}, "
             f"fp32, gloo; {res['machine']}; configurations interleaved over {res['rounds']} rounds; 1-minute load "
             f"average {la[0]} at the start and {la[1]} at the end (the machine is shared: ratios, not absolute "
             "figures, are the result)", "",
             "| configuration | processes x threads | tokens/s (median of rounds) | vs 1 process (median) | "
             "per round | all-to-all B/token/layer (measured) |", "|---|---|---:|---:|---|---:|"]
    for r in res["rows"]:
        a2a = r["a2a_bytes_per_token_layer"]
        a2a_s = "-" if a2a != a2a else f"{a2a:,.0f} ({r['a2a_remote_fraction']:.0%} remote)"
        rounds = ", ".join(f"{x:.2f}" for x in r["round_ratios"])
        lines.append(f"| {r['name']} | {r['processes']} x {r['threads_per_process']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['ratio']:.2f}x | {rounds} | {a2a_s} |")
    a = res["a2a"]
    lines += ["", f"All-to-all per token per MoE layer (fp32): formula 2*k*hidden*4 = {a['formula']:,} bytes; "
              f"seekformer sends {a['sent']:,} (k rows of hidden+1 values out -- the gate weight rides as one extra "
              "column -- and k rows of hidden back). The measured column is the expert-parallel run's own counter "
              "(`ExpertParallelExperts.traffic`, logged as `a2a_bytes_per_token_layer`); 'remote' is the share "
              "whose expert lives on the other rank, i.e. what crosses the wire."]
    return "\n".join(lines) + "\n"

"""Training-step throughput: seekformer vs `transformers` DeepseekV3ForCausalLM, same config, weights and batch.

One step = forward with labels, backward, AdamW update (torch's fused AdamW on both sides; seekformer
also runs the auxiliary-loss-free bias update its trainer does after every step). Both models start from
the same weights (the seekformer model is saved and loaded with `AutoModelForCausalLM`), use the same
thread count, batch and dtype, and their steps are interleaved (seekformer, transformers, seekformer, ...)
so a noisy machine slows both alike; the reported time per step is the median, the speedup the median of
the per-pair ratios.

transformers runs with its defaults: `sdpa` attention and the `grouped_mm` experts implementation.
`bf16` means fp32 weights and AdamW with the forward pass under `torch.autocast(bfloat16)` on both sides.

MFU = achieved FLOP/s / peak, where the peak is the best matmul throughput measured on this machine with
the same thread count and dtype, and the FLOPs of a step are 6 x (matmul parameters a token uses) x tokens
plus causal attention (3 x 2 x B x H x T^2/2 x (qk_head_dim + v_head_dim) per layer).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import SeekConfig
from ..errors import SeekformerError
from ..models.causal_lm import SeekForCausalLM
from .report import Machine, command_line, header, table, write_report

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ====================================================================== FLOPs and peak
def train_step_flops(cfg: SeekConfig, batch_size: int, seq_len: int) -> float:
    """Model FLOPs of one training step (forward + backward) on batch_size x seq_len tokens."""
    tokens = batch_size * seq_len
    matmul_params = cfg.num_parameters(active=True, include_embeddings=False) + cfg.vocab_size * cfg.hidden_size
    dense = 6.0 * matmul_params * tokens
    per_layer_fwd = 2.0 * batch_size * cfg.num_attention_heads * seq_len * seq_len / 2 * (cfg.qk_head_dim +
                                                                                         cfg.v_head_dim)
    return dense + 3.0 * per_layer_fwd * cfg.num_hidden_layers


def measure_matmul_peak(dtype: torch.dtype = torch.float32, sizes: Sequence[int] = (512, 1024, 2048),
                        repeats: int = 5) -> float:
    """Best square-matmul throughput (GFLOP/s) over a few sizes, with torch's current thread count."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        out = torch.empty(n, n, dtype=dtype)
        torch.mm(a, b, out=out)
        reps = max(2, int(repeats * (1024 / n) ** 3))
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            times.append(time.perf_counter() - t0)
        best = max(best, 2.0 * n**3 / min(times) / 1e9)
    return best


# ====================================================================== models
def require_transformers():
    try:
        import transformers
    except ImportError:  # pragma: no cover - depends on the environment
        raise SeekformerError("the training benchmark compares against transformers: pip install 'seekformer[hf]'")\
            from None
    return transformers


def build_pair(cfg: SeekConfig, seed: int = 0) -> tuple[SeekForCausalLM, torch.nn.Module]:
    """A seekformer model and the `transformers` model loaded from its save: same weights, default kernels."""
    transformers = require_transformers()
    model = SeekForCausalLM(cfg)
    model.reset_parameters(seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        from transformers.utils import logging as hf_logging

        verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            hf = transformers.AutoModelForCausalLM.from_pretrained(tmp)
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
    return model, hf


def _step_fn(model: torch.nn.Module, is_hf: bool, ids: torch.Tensor, dtype: str,
             gamma: float) -> Callable[[], float]:
    params = [p for p in model.parameters() if p.requires_grad]
    try:  # the same optimizer on both sides: torch's fused AdamW where the build has it
        opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    except (RuntimeError, TypeError):  # pragma: no cover - older torch
        opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()

    def step() -> float:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
        with ctx:
            if is_hf:
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            else:
                out = model(ids, labels=ids)
                loss = out.loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if not is_hf:
            for _, moe in model.moe_layers():
                moe.update_bias(gamma)
            return out.lm_loss.item()
        return loss.item()

    return step


# ====================================================================== the benchmark
def bench_preset(preset: str, dtypes: Sequence[str], batch_size: int, seq_len: int, steps: int, warmup: int = 2,
                 peaks: dict[str, float] | None = None, seed: int = 0,
                 log: Callable[[str], None] = print, overrides: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Time both models' training steps on `preset` (with config `overrides`) for each dtype."""
    cfg = SeekConfig.from_preset(preset, **(overrides or {}))
    if seq_len > cfg.max_position_embeddings:
        raise SeekformerError(f"--seq-len {seq_len} exceeds max_position_embeddings "
                              f"{cfg.max_position_embeddings} of preset {preset!r}")
    results = []
    for dtype in dtypes:
        if dtype not in DTYPES:
            raise SeekformerError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
        sf, hf = build_pair(cfg, seed)
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), generator=gen)
        steps_fn = {"seekformer": _step_fn(sf, False, ids, dtype, cfg.aux_free_bias_update_rate),
                    "transformers": _step_fn(hf, True, ids, dtype, 0.0)}
        times: dict[str, list[float]] = {k: [] for k in steps_fn}
        first_loss: dict[str, float] = {}
        for i in range(warmup + steps):
            for name, fn in steps_fn.items():  # interleaved: machine noise hits both alike
                t0 = time.perf_counter()
                loss = fn()
                dt = time.perf_counter() - t0
                first_loss.setdefault(name, loss)
                if i >= warmup:
                    times[name].append(dt)
        flops = train_step_flops(cfg, batch_size, seq_len)
        peak = (peaks or {}).get(dtype) or measure_matmul_peak(DTYPES[dtype])
        row: dict[str, Any] = {
            "preset": preset, "dtype": dtype, "batch_size": batch_size, "seq_len": seq_len,
            "threads": torch.get_num_threads(), "steps": steps, "peak_gflops": peak,
            "hf_experts_implementation": getattr(hf.config, "_experts_implementation", None),
            "hf_attn_implementation": getattr(hf.config, "_attn_implementation", None),
            "first_loss_diff": abs(first_loss["seekformer"] - first_loss["transformers"]),
        }
        for name, key in (("seekformer", "sf"), ("transformers", "hf")):
            med = statistics.median(times[name])
            row[f"{key}_step_ms"] = med * 1e3
            row[f"{key}_tokens_per_s"] = batch_size * seq_len / med
            row[f"{key}_mfu"] = flops / med / (peak * 1e9)
        # median of the paired ratios (step i of one model next to step i of the other): robust to load drift
        row["speedup"] = statistics.median(h / f for h, f in zip(times["transformers"], times["seekformer"]))
        log(f"{preset:>6} {dtype}: seekformer {row['sf_tokens_per_s']:8.0f} tok/s, transformers "
            f"{row['hf_tokens_per_s']:8.0f} tok/s, x{row['speedup']:.2f}")
        results.append(row)
        del sf, hf, steps_fn
    return results


def run_train_bench(presets: Sequence[str] = ("tiny", "small"), dtypes: Sequence[str] = ("fp32", "bf16"),
                    batch_size: int = 8, seq_len: int = 256, steps: int = 10, threads: int | None = None,
                    out_md: str | Path | None = None, log: Callable[[str], None] = print,
                    tune_malloc: bool = False, overrides: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Time training steps of seekformer and transformers for each preset and dtype; optionally write markdown.
    `overrides`: config fields changed in every preset (e.g. a held-out-like MoE of 16 experts, top-4).

    Returns one dict per (preset, dtype) with tokens/s, step time, MFU of both, and the speedup
    (transformers step time / seekformer step time). `tune_malloc` keeps freed memory in the process heap
    (see seekformer.runtime) for both models alike; by default the allocator is left as it is.
    """
    require_transformers()
    if tune_malloc:
        from ..runtime import tune_malloc as _tune

        tune_malloc = _tune()
    if batch_size < 1 or seq_len < 2 or steps < 1:
        raise SeekformerError("--batch-size and --steps must be >= 1 and --seq-len >= 2")
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    machine = Machine()
    try:
        peaks = {d: measure_matmul_peak(DTYPES[d]) for d in dtypes if d in DTYPES}
        log("matmul peak: " + ", ".join(f"{d} {p:.0f} GFLOP/s" for d, p in peaks.items())
            + f" ({torch.get_num_threads()} threads)")
        results: list[dict[str, Any]] = []
        for preset in presets:
            rows = bench_preset(preset, dtypes, batch_size, seq_len, steps, peaks=peaks, log=log, overrides=overrides)
            if overrides:
                for r in rows:
                    r["preset"] = f"{preset} (" + ", ".join(f"{k}={v}" for k, v in overrides.items()) + ")"
            results += rows
        for r in results:
            r["malloc_tuned"] = bool(tune_malloc)
    finally:
        torch.set_num_threads(previous_threads)
    if out_md:
        log(f"wrote {write_report(out_md, to_markdown(results, peaks, machine, command_line('train')))}")
    return results


def to_markdown(results: list[dict[str, Any]], peaks: dict[str, float], machine: Machine | str,
                command: str = "seekformer bench train") -> str:
    """The results as a markdown report with the machine and settings they were measured on."""
    import transformers

    r0 = results[0] if results else {}
    lines = header("Training step: seekformer vs transformers", command, machine)
    lines += [
        f"transformers {transformers.__version__}. Batch {r0.get('batch_size')} x {r0.get('seq_len')} tokens, "
        f"median of {r0.get('steps')} interleaved steps (forward, backward, AdamW) after warm-up. "
        f"transformers: `{r0.get('hf_attn_implementation')}` attention, "
        f"`{r0.get('hf_experts_implementation')}` experts. bf16 = autocast (fp32 master weights). "
        + ("glibc malloc tuned (`--tune-malloc`, both models). " if r0.get("malloc_tuned") else "")
        + "OMP_WAIT_POLICY=" + os.environ.get("OMP_WAIT_POLICY", "(unset)") + ", GOMP_SPINCOUNT="
        + os.environ.get("GOMP_SPINCOUNT", "(unset)") + ". "
        "MFU against the measured matmul peak (" + ", ".join(f"{d} {p:.0f} GFLOP/s" for d, p in peaks.items())
        + ").",
        "",
    ]
    lines += table(["preset", "dtype", "seekformer tok/s", "transformers tok/s", "speedup", "seekformer MFU",
                    "transformers MFU", "step-0 loss diff"],
                   [[r["preset"], r["dtype"], f"{r['sf_tokens_per_s']:.0f}", f"{r['hf_tokens_per_s']:.0f}",
                     f"**{r['speedup']:.2f}x**", f"{100 * r['sf_mfu']:.1f}%", f"{100 * r['hf_mfu']:.1f}%",
                     f"{r['first_loss_diff']:.1e}"] for r in results], align="llrrrrrr")
    return "\n".join(lines) + "\n"
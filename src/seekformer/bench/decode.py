"""Decoding throughput and KV-cache size: seekformer vs `transformers` generate(), same weights, in one run.

For each preset (random weights, saved by seekformer and loaded with `AutoModelForCausalLM`) or a given
model directory, prompt length and batch size, both libraries decode `new_tokens` greedy tokens per row
from the same random prompts (eos disabled on both sides), with the same dtype and thread count. Runs are
interleaved (seekformer, transformers, seekformer, ...) so a noisy machine slows both alike; the reported
time is the median.

KV-cache bytes per token (all layers) are read from the caches themselves: seekformer's latent cache
(`kv_lora_rank + qk_rope_head_dim` numbers per layer), transformers' DynamicCache after a generate() call,
and a per-head K/V cache of the same model (seekformer's "naive" mode) for reference.

With a model that has MTP modules, greedy self-speculative decoding is timed against plain greedy
decoding at batch 1 (acceptance rate, tokens per main-model forward, speed-up).

Decode tokens/s leaves the prefill out (it is timed separately, as time to first token): the prompt is
encoded the same way by both libraries, while each decode step differs -- transformers 5 caches the same
latent but re-expands the whole cache through kv_b_proj at every step, seekformer attends on it directly.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import SeekConfig
from ..errors import SeekformerError
from ..nn.kv_cache import KVCache
from .report import Machine, command_line, header, render, table, write_report
from .train import build_pair, require_transformers as _require_transformers

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load_pair(model_dir: str | Path, dtype: torch.dtype) -> tuple[torch.nn.Module, torch.nn.Module]:
    """seekformer and transformers models from one model directory."""
    transformers = _require_transformers()
    from ..models.causal_lm import SeekForCausalLM

    from transformers.utils import logging as hf_logging

    model = SeekForCausalLM.from_pretrained(model_dir, dtype=dtype)
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # its load report lists the MTP layer it ignores
    hf_logging.disable_progress_bar()
    try:
        hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    return model, hf


def kv_bytes_per_token(model, hf, ids: torch.Tensor) -> dict[str, float]:
    """Bytes per cached token over all decoder layers: seekformer latent, transformers, per-head K/V."""
    cfg = model.config
    dt = model.dtype
    ours = KVCache(cfg, 1, 1, "latent", dtype=dt, num_layers=cfg.num_hidden_layers).bytes_per_token()
    naive = KVCache(cfg, 1, 1, "naive", dtype=dt, num_layers=cfg.num_hidden_layers).bytes_per_token()
    out = hf.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=2, do_sample=False,
                      return_dict_in_generate=True, pad_token_id=0)
    cache, total = out.past_key_values, 0
    for layer in getattr(cache, "layers", []):
        for t in (layer.keys, layer.values):
            total += t.numel() * t.element_size()
    tokens = cache.get_seq_length() if hasattr(cache, "get_seq_length") else out.sequences.shape[1]
    return {"seekformer": ours, "transformers": total / max(1, tokens), "per_head": naive}


def bytes_per_token(model, context: int, compiled: bool = False) -> dict[str, float]:
    """Bytes one batch-1 decoding step reads at `context` cached tokens: the weights it multiplies by (attention
    as the step runs it, folded or not -- the compiled step folds less; the dense FFNs; per MoE layer the
    router, the shared experts and K of the E routed experts; the output head; one embedding row) and the
    latent cache."""
    from ..nn.mla_decode import FOLD_MAX_GROWTH, STATIC_FOLD_MAX_GROWTH, decode_folds, folded_weights

    cfg = model.config
    size = model.dtype.itemsize if hasattr(model.dtype, "itemsize") else 4
    weights = cfg.hidden_size  # the embedding row
    for layer in model.model.layers:
        attn = layer.self_attn
        fold = decode_folds(attn, STATIC_FOLD_MAX_GROWTH if compiled else FOLD_MAX_GROWTH)
        mats = [w for w in folded_weights(attn) if w is not None] if fold else \
            [p for n, p in attn.named_parameters() if "layernorm" not in n]
        weights += sum(w.numel() for w in mats)
        mlp = layer.mlp
        if hasattr(mlp, "experts"):
            shared = mlp.shared_experts.parameters() if mlp.shared_experts is not None else ()
            weights += mlp.gate.weight.numel() + sum(p.numel() for p in shared)
            per_expert = (mlp.experts.gate_up_proj.numel() + mlp.experts.down_proj.numel()) / mlp.num_experts
            weights += mlp.top_k * per_expert
        else:
            weights += sum(p.numel() for p in mlp.parameters())
    weights += model.lm_head.weight.numel()
    cache = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * context
    return {"weights": weights * size, "cache": cache * size, "total": (weights + cache) * size}


def read_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """Measured main-memory read bandwidth in bytes/s with torch's current thread count: the best of `repeats`
    sums over a `mib` MiB fp32 tensor (larger than the caches)."""
    x = torch.ones(mib * 2 ** 20 // 4)
    x.sum()
    best = min(_timed(x.sum) for _ in range(repeats))
    return x.numel() * 4 / best


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_model(name: str, model, hf, batch_sizes: Sequence[int], prompt_lens: Sequence[int], new_tokens: int,
                repeats: int, log: Callable[[str], None], compile: bool = False) -> list[dict[str, Any]]:
    """Time greedy decoding of both models for every (prompt length, batch size).

    Each setting is timed twice per library: generating 1 token (the prefill: time to first token) and
    generating `new_tokens`; decode tokens/s = batch x (new_tokens - 1) / (difference of the two), and
    end-to-end tokens/s = batch x new_tokens / (time of the long run). With `compile`, seekformer's
    compiled decoding step (inference/compiled.py) is timed too, interleaved with the eager one.
    """
    model.eval()
    hf.eval()
    hf.generation_config.eos_token_id = None  # decode exactly new_tokens on both sides
    cfg = model.config
    rows = []
    for plen in prompt_lens:
        if plen + new_tokens > cfg.max_position_embeddings:
            log(f"skip prompt {plen}: {plen} + {new_tokens} exceeds the context {cfg.max_position_embeddings}")
            continue
        for b in batch_sizes:
            g = torch.Generator().manual_seed(plen * 1000 + b)
            ids = torch.randint(3, cfg.vocab_size, (b, plen), generator=g)
            am = torch.ones_like(ids)

            def ours(n: int = new_tokens, compiled: bool = False):
                return model.generate(ids, max_new_tokens=n, ignore_eos=True, compile=compiled)

            def theirs(n: int = new_tokens):
                return hf.generate(ids, attention_mask=am, max_new_tokens=n, do_sample=False, pad_token_id=0)

            with torch.no_grad():
                a, h = ours(), theirs()  # warm-up, and the outputs to compare
                same = float((a[:, plen:] == h[:, plen:]).all(dim=1).float().mean())
                times: dict[str, list[float]] = {"sf1": [], "hf1": [], "sf": [], "hf": [], "sfc": []}
                if compile:
                    warm = _timed(lambda: ours(compiled=True))  # compilation (or the on-disk cache) + one run
                    c = ours(compiled=True)
                    same_c = float((c[:, plen:] == a[:, plen:]).all(dim=1).float().mean())
                for _ in range(repeats):
                    times["sf1"].append(_timed(lambda: ours(1)))
                    times["hf1"].append(_timed(lambda: theirs(1)))
                    times["sf"].append(_timed(ours))
                    times["hf"].append(_timed(theirs))
                    if compile:
                        times["sfc"].append(_timed(lambda: ours(compiled=True)))
            m = {k: statistics.median(v) for k, v in times.items() if v}
            steps = b * max(1, new_tokens - 1)
            row = {"model": name, "prompt_len": plen, "batch": b, "new_tokens": new_tokens, "identical": same,
                   "sf_ttft": m["sf1"], "hf_ttft": m["hf1"],
                   "sf_decode": steps / max(m["sf"] - m["sf1"], 1e-9), "hf_decode": steps / max(m["hf"] - m["hf1"], 1e-9),
                   "sf_e2e": b * new_tokens / m["sf"], "hf_e2e": b * new_tokens / m["hf"]}
            row["speedup"] = row["sf_decode"] / row["hf_decode"]
            form = model.__dict__.get("_decode_products", {}).get(torch.get_num_threads())
            if form:
                row["few_row_form"] = form["few_row_form"]
                row["form_ms"] = {k: 1e3 * v for k, v in form["seconds"].items()}
            log(f"{name} prompt {plen} batch {b}: decode seekformer {row['sf_decode']:.1f} tok/s, transformers "
                f"{row['hf_decode']:.1f} tok/s (x{row['speedup']:.2f}); first token {1e3 * m['sf1']:.0f} vs "
                f"{1e3 * m['hf1']:.0f} ms; identical rows {same:.0%}")
            if compile:
                row.update(sfc_decode=steps / max(m["sfc"] - m["sf1"], 1e-9), compile_warmup_s=warm,
                           identical_compiled=same_c)
                row["compiled_vs_eager"] = row["sfc_decode"] / row["sf_decode"]
                row["compiled_vs_hf"] = row["sfc_decode"] / row["hf_decode"]
                log(f"  compiled: {row['sfc_decode']:.1f} tok/s (x{row['compiled_vs_eager']:.2f} eager, "
                    f"x{row['compiled_vs_hf']:.2f} transformers); first compiled run {warm:.1f} s; identical to "
                    f"eager {same_c:.0%}")
            rows.append(row)
    return rows


def bench_speculative(name: str, model, prompt_ids: torch.Tensor, new_tokens: int, repeats: int,
                      log: Callable[[str], None], draft_counts: Sequence[int | None] = (None,),
                      compile: bool = False) -> list[dict[str, Any]]:
    """Greedy vs MTP self-speculative decoding at batch 1, for each number of drafts per step in
    `draft_counts` (None: the MTP depth); greedy and every speculative setting interleaved in each repeat.
    With `compile`, the compiled greedy step and the compiled speculative step (drafts + verification in one
    graph) are timed too, in the same rounds. [] when the model has no MTP module."""
    if not len(model.mtp):
        return []
    kw = dict(max_new_tokens=new_tokens, ignore_eos=True)
    counts = [len(model.mtp) if k is None else int(k) for k in draft_counts]
    modes = [False, True] if compile else [False]

    def greedy(c: bool):
        return model.generate(prompt_ids, compile=c, **kw)

    def speculative(k: int, c: bool):
        return model.generate(prompt_ids, speculative=True, num_speculative_tokens=k, return_dict=True, compile=c,
                              **kw)

    with torch.no_grad():
        plain = greedy(False)
        warm = {c: _timed(lambda: greedy(c)) for c in modes}
        specs, first = {}, {}
        for k in counts:
            for c in modes:
                t0 = time.perf_counter()
                specs[k, c] = speculative(k, c)
                first[k, c] = time.perf_counter() - t0
        same_plain = {c: bool(torch.equal(plain, greedy(c))) for c in modes}
        t_plain = {c: [] for c in modes}
        t_spec = {key: [] for key in specs}
        for _ in range(repeats):
            for c in modes:
                t_plain[c].append(_timed(lambda: greedy(c)))
                for k in counts:
                    t_spec[k, c].append(_timed(lambda: speculative(k, c)))
    med = {key: statistics.median(v) for key, v in t_spec.items()}
    plain_med = {c: statistics.median(v) for c, v in t_plain.items()}
    rows = []
    for k in counts:
        spec = specs[k, False]
        row = {"model": name, "new_tokens": new_tokens, "drafts": k, "mtp_depth": len(model.mtp),
               "identical": bool(torch.equal(plain, spec.sequences)),
               "acceptance_rate": spec.stats["acceptance_rate"], "tokens_per_forward": spec.stats["tokens_per_forward"],
               "greedy_tokens_per_s": new_tokens / plain_med[False],
               "speculative_tokens_per_s": new_tokens / med[k, False], "speedup": plain_med[False] / med[k, False]}
        log(f"{name} speculative, {k} drafts/step: acceptance {row['acceptance_rate']:.1%}, "
            f"{row['tokens_per_forward']:.2f} tokens/forward, x{row['speedup']:.2f} over greedy "
            f"(identical: {row['identical']})")
        if compile:
            cs = specs[k, True]
            row.update(compiled_greedy_tokens_per_s=new_tokens / plain_med[True],
                       compiled_speculative_tokens_per_s=new_tokens / med[k, True],
                       compiled_speedup=plain_med[True] / med[k, True],
                       compiled_vs_eager_greedy=plain_med[False] / med[k, True],
                       compiled_identical=bool(torch.equal(plain, cs.sequences)) and same_plain[True],
                       compiled_acceptance_rate=cs.stats["acceptance_rate"],
                       compiled_first_run_s=first[k, True], compiled_greedy_first_run_s=warm[True])
            log(f"{name} compiled speculative, {k} drafts/step: x{row['compiled_speedup']:.2f} over compiled "
                f"greedy, x{row['compiled_vs_eager_greedy']:.2f} over eager greedy (identical: "
                f"{row['compiled_identical']}); first run {first[k, True]:.1f} s")
        rows.append(row)
    return rows


def bench_llama_cpp(name: str, model_dir: str | Path, model, prompt_ids: torch.Tensor, new_tokens: int, repeats: int,
                    log: Callable[[str], None], gguf_type: str = "f32", compile: bool = False) -> dict[str, Any] | None:
    """Batch-1 greedy decode tokens/s of seekformer and llama.cpp (llama-cpp-python) on the same weights (the
    model's GGUF export), interleaved; None when llama_cpp is not installed. Prefill is left out on both sides.
    With `compile`, seekformer decodes through its compiled step."""
    try:
        import llama_cpp
    except ImportError:
        log("llama_cpp is not installed (pip install llama-cpp-python): no llama.cpp comparison")
        return None
    import tempfile

    from ..compress.gguf import export_gguf

    ids = prompt_ids[0].tolist()
    with tempfile.TemporaryDirectory() as tmp:
        path = export_gguf(model_dir, Path(tmp) / "model.gguf", gguf_type)
        llm = llama_cpp.Llama(str(path), n_ctx=len(ids) + new_tokens + 8, n_threads=torch.get_num_threads(),
                              n_threads_batch=torch.get_num_threads(), n_batch=512, logits_all=True, verbose=False)

        def theirs() -> tuple[list[int], float]:
            llm.reset()
            llm.eval(ids)
            out, t1 = [], time.perf_counter()
            for _ in range(new_tokens):
                tok = int(llm.scores[llm.n_tokens - 1].argmax()) if llm.n_tokens else 0
                out.append(tok)
                if len(out) < new_tokens:
                    llm.eval([tok])
            return out, (new_tokens - 1) / (time.perf_counter() - t1)

        def ours() -> tuple[list[int], float]:
            t0 = time.perf_counter()
            model.generate(prompt_ids, max_new_tokens=1, ignore_eos=True)
            t1 = time.perf_counter()
            out = model.generate(prompt_ids, max_new_tokens=new_tokens, ignore_eos=True,
                                 compile=compile)[0, len(ids):].tolist()
            decode = (time.perf_counter() - t1) - (t1 - t0)
            return out, (new_tokens - 1) / max(decode, 1e-9)

        with torch.no_grad():
            a, _ = ours()
            b, _ = theirs()
            sf, lc = [], []
            for _ in range(repeats):
                sf.append(ours()[1])
                lc.append(theirs()[1])
        del llm
    row = {"model": name, "gguf": gguf_type, "new_tokens": new_tokens, "sf_decode": statistics.median(sf),
           "llama_decode": statistics.median(lc), "same_tokens": sum(x == y for x, y in zip(a, b)) / len(a),
           "llama_cpp": llama_cpp.__version__, "compiled": compile}
    row["ratio"] = row["sf_decode"] / row["llama_decode"]
    log(f"{name} vs llama.cpp {gguf_type}: {row['sf_decode']:.1f} vs {row['llama_decode']:.1f} tok/s "
        f"(x{row['ratio']:.2f}); greedy tokens equal: {row['same_tokens']:.0%}")
    return row


def run_decode_bench(presets: Sequence[str] = ("tiny", "small"), model_dirs: Sequence[str | Path] = (),
                     batch_sizes: Sequence[int] = (1, 8), prompt_lens: Sequence[int] = (32, 512),
                     new_tokens: int = 64, repeats: int = 3, dtype: str = "fp32", threads: int | None = None,
                     prompt_text: str | None = None, out_md: str | Path | None = None,
                     log: Callable[[str], None] = print, draft_counts: Sequence[int | None] = (None,),
                     llama_cpp: bool = True, compile: bool = False,
                     overrides: dict[str, Any] | None = None, product_form: str | bool | None = "auto") -> dict[str, Any]:
    """Run the decode benchmark; returns {"rows", "kv", "speculative", "llama_cpp", "bandwidth", "settings"}
    and writes markdown. For model directories: speculative decoding with `draft_counts` drafts per step and,
    with `llama_cpp` (and llama-cpp-python installed), batch-1 decoding against llama.cpp on the F32 GGUF
    export. `compile`: also the compiled decoding step. `overrides`: config fields changed in every preset
    (e.g. {"n_routed_experts": 16, "num_experts_per_tok": 4}, a held-out-like MoE). `product_form`: the
    few-row product form of seekformer's steps ("auto": measured per model, as the CLI does)."""
    _require_transformers()
    if dtype not in DTYPES:
        raise SeekformerError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if new_tokens < 1 or repeats < 1 or not batch_sizes or min(batch_sizes) < 1 or not prompt_lens \
            or min(prompt_lens) < 1:
        raise SeekformerError("--new-tokens, --repeats, batch sizes and prompt lengths must be >= 1")
    if threads:
        torch.set_num_threads(threads)
    from .. import runtime

    runtime.set_product_form(product_form)  # as the CLI decodes: measured per model ("auto")
    torch_dtype = DTYPES[dtype]
    machine = Machine()
    rows, kv, spec, lcpp, bw = [], {}, [], [], []
    overrides = dict(overrides or {})
    suffix = " (" + ", ".join(f"{k}={v}" for k, v in overrides.items()) + ")" if overrides else ""
    bandwidth = read_bandwidth()
    log(f"measured read bandwidth: {bandwidth / 1e9:.1f} GB/s ({torch.get_num_threads()} threads)")
    models = [(p + suffix, p, None) for p in presets] + [(Path(d).name, None, d) for d in model_dirs]
    for name, preset, directory in models:
        if directory is None:
            model, hf = build_pair(SeekConfig.from_preset(preset, **overrides), seed=0)
            model, hf = model.to(torch_dtype), hf.to(torch_dtype)
        else:
            model, hf = load_pair(directory, torch_dtype)
        mine = bench_model(name, model, hf, batch_sizes, prompt_lens, new_tokens, repeats, log, compile)
        rows += mine
        for r in mine:
            if r["batch"] == 1:
                need = bytes_per_token(model, r["prompt_len"] + new_tokens // 2, compiled="sfc_decode" in r)
                best = max(r["sf_decode"], r.get("sfc_decode", 0.0))
                bw.append({"model": name, "prompt_len": r["prompt_len"], "bytes": need["total"],
                           "weights": need["weights"], "cache": need["cache"], "bandwidth": bandwidth,
                           "ceiling": bandwidth / need["total"], "best": best,
                           "of_ceiling": best * need["total"] / bandwidth})
        probe = torch.randint(3, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
        kv[name] = kv_bytes_per_token(model, hf, probe)
        if directory is not None and len(model.mtp):
            ids = probe
            if prompt_text:
                from ..tokenizer import SeekTokenizer

                ids = torch.tensor([SeekTokenizer.load(directory).encode(prompt_text, add_bos=True)])
            spec += bench_speculative(name, model, ids, max(new_tokens, 128), repeats, log, draft_counts, compile)
        if directory is not None and llama_cpp and torch_dtype == torch.float32:
            ids = torch.randint(3, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1))
            r = bench_llama_cpp(name, directory, model, ids, new_tokens, repeats, log, compile=compile)
            if r:
                lcpp.append(r)
        del model, hf
    settings = {"threads": torch.get_num_threads(), "dtype": dtype, "repeats": repeats, "new_tokens": new_tokens,
                "machine": machine.line(), "compile": compile}
    result = {"rows": rows, "kv": kv, "speculative": spec, "llama_cpp": lcpp, "bandwidth": bw, "settings": settings}
    if out_md:
        log(f"wrote {write_report(out_md, to_markdown(result, command_line('decode')))}")
    return result


def to_markdown(result: dict[str, Any], command: str = "seekformer bench decode") -> str:
    """The benchmarks/results/decode.md report of `run_decode_bench`'s result."""
    import transformers

    s = result["settings"]
    lines = header("Decoding: seekformer vs transformers", command, s.get("machine", "n/a"))
    lines += [
        f"{s['dtype']}, transformers {transformers.__version__}. Greedy decoding of {s['new_tokens']} tokens per row "
        f"from random prompts (eos off); median of {s['repeats']} interleaved runs. Random weights for the presets "
        "(same weights on both sides).",
        "",
        "Decode tok/s excludes the prefill (batch x (new - 1) tokens over the time beyond the first token); "
        "first token = prefill time; end-to-end tok/s = batch x new tokens over the whole generate() call.",
        "",
    ]
    lines += table(["model", "prompt", "batch", "decode tok/s seekformer", "decode tok/s transformers",
                    "decode speedup", "first token ms (sf / hf)", "end-to-end tok/s (sf / hf)", "identical rows"],
                   [[r["model"], r["prompt_len"], r["batch"], f"{r['sf_decode']:.1f}", f"{r['hf_decode']:.1f}",
                     f"**{r['speedup']:.2f}x**", f"{1e3 * r['sf_ttft']:.0f} / {1e3 * r['hf_ttft']:.0f}",
                     f"{r['sf_e2e']:.1f} / {r['hf_e2e']:.1f}", f"{r['identical']:.0%}"] for r in result["rows"]])
    if s.get("compile"):
        lines += ["", "Compiled decoding step (`compile=True`: torch.compile, CPU inductor, of the model's "
                  "static_decode_step), interleaved with the eager runs above; first compiled run = compilation "
                  "(or inductor's on-disk cache) plus one run. Rows whose batch x top-k exceeds the routed experts "
                  "run the eager step.", ""]
        lines += table(["model", "prompt", "batch", "eager tok/s", "compiled tok/s", "compiled / eager",
                        "compiled / transformers", "first compiled run s", "identical to eager"],
                       [[r["model"], r["prompt_len"], r["batch"], f"{r['sf_decode']:.1f}", f"{r['sfc_decode']:.1f}",
                         f"**{r['compiled_vs_eager']:.2f}x**", f"**{r['compiled_vs_hf']:.2f}x**",
                         f"{r['compile_warmup_s']:.1f}", f"{r['identical_compiled']:.0%}"]
                        for r in result["rows"] if "sfc_decode" in r])
    forms = [r for r in result["rows"] if "few_row_form" in r]
    if forms:
        lines += ["", "Few-row product form of seekformer's decoding steps, chosen by measurement when the model "
                  "first decodes (its batch-1 step timed both ways, interleaved, median of 7): W @ X^T (`few_rows`) "
                  "or F.linear.", ""]
        seen = {}
        for r in forms:
            seen.setdefault(r["model"], r)
        lines += table(["model", "chosen", "step ms with W @ X^T", "step ms with F.linear"],
                       [[m, "W @ X^T" if r["few_row_form"] else "F.linear", f"{r['form_ms'][True]:.2f}",
                         f"{r['form_ms'][False]:.2f}"] for m, r in seen.items()])
    if result.get("bandwidth"):
        lines += ["", "Bytes one batch-1 step reads (the weights it multiplies by -- attention as the step runs "
                  "it, K of E routed experts -- and the latent cache at prompt + new/2 tokens; with --compile those "
                  "of the compiled step) against the measured "
                  "read bandwidth (sum over a 512 MiB tensor): the ceiling a bandwidth-bound decoder could reach. "
                  "Small models fit in the CPU caches, so their ceiling is higher than this.", ""]
        lines += table(["model", "prompt", "MB / token (weights + cache)", "bandwidth GB/s", "ceiling tok/s",
                        "best seekformer tok/s", "of ceiling"],
                       [[r["model"], r["prompt_len"], f"{r['bytes'] / 1e6:.1f} ({r['weights'] / 1e6:.1f} + "
                         f"{r['cache'] / 1e6:.2f})", f"{r['bandwidth'] / 1e9:.1f}", f"{r['ceiling']:.0f}",
                         f"{r['best']:.1f}", f"{r['of_ceiling']:.0%}"] for r in result["bandwidth"]])
    lines += ["", "KV cache, bytes per token (all decoder layers). transformers 5 caches the same compressed latent "
              "(and re-expands all of it through kv_b_proj at every step); the per-head column is the K/V a "
              "standard cache would hold for the same model (seekformer's `naive` mode).", ""]
    lines += table(["model", "seekformer (latent)", "transformers", "per-head K/V", "per-head / seekformer"],
                   [[name, f"{k['seekformer']:.0f}", f"{k['transformers']:.0f}", f"{k['per_head']:.0f}",
                     f"{k['per_head'] / k['seekformer']:.1f}x"] for name, k in result["kv"].items()])
    if result["speculative"]:
        lines += ["", "MTP self-speculative decoding (batch 1, greedy, trained model, prompt from --prompt): K "
                  "drafts per step from the model's MTP modules (past the MTP depth the last module chains on its "
                  "own output), verified in one forward of K+1 tokens by the main model (output identical to "
                  "greedy). Greedy and every K interleaved in each repeat; speedup = ratio of median times.", ""]
        lines += table(["model", "MTP depth", "drafts K", "tokens", "acceptance", "tokens / forward", "greedy tok/s",
                        "speculative tok/s", "speedup", "identical"],
                       [[r["model"], r.get("mtp_depth", ""), r.get("drafts", ""), r["new_tokens"],
                         f"{r['acceptance_rate']:.1%}", f"{r['tokens_per_forward']:.2f}",
                         f"{r['greedy_tokens_per_s']:.1f}", f"{r['speculative_tokens_per_s']:.1f}",
                         f"**{r['speedup']:.2f}x**", r["identical"]] for r in result["speculative"]],
                       align="lrrrrrrrrl")
        comp = [r for r in result["speculative"] if "compiled_speedup" in r]
        if comp:
            lines += ["", "Compiled (`--compile`): greedy through the compiled decoding step; speculative with one "
                      "compiled graph per step (MTP drafts, then the main model on the K+1 tokens), timed in the "
                      "same rounds as the table above. Two ratios: over the compiled greedy step (the same engine "
                      "without speculation) and over eager greedy decoding; identical = the tokens of eager "
                      "greedy decoding.", ""]
            lines += table(["model", "drafts K", "acceptance", "compiled greedy tok/s", "compiled speculative tok/s",
                            "over compiled greedy", "over eager greedy", "first run s (greedy / speculative)",
                            "identical"],
                           [[r["model"], r["drafts"], f"{r['compiled_acceptance_rate']:.1%}",
                             f"{r['compiled_greedy_tokens_per_s']:.1f}", f"{r['compiled_speculative_tokens_per_s']:.1f}",
                             f"**{r['compiled_speedup']:.2f}x**", f"**{r['compiled_vs_eager_greedy']:.2f}x**",
                             f"{r['compiled_greedy_first_run_s']:.1f} / {r['compiled_first_run_s']:.1f}",
                             r["compiled_identical"]] for r in comp], align="lrrrrrrrl")
    if result.get("llama_cpp"):
        lines += ["", "llama.cpp (llama-cpp-python, the model's GGUF export, same weights), batch 1, greedy, "
                  "random 32-token prompt, decode tokens/s without the prefill, interleaved.", ""]
        lines += table(["model", "GGUF", "llama_cpp", "seekformer step", "seekformer tok/s", "llama.cpp tok/s",
                        "seekformer / llama.cpp", "greedy tokens equal"],
                       [[r["model"], r["gguf"], r["llama_cpp"], "compiled" if r.get("compiled") else "eager",
                         f"{r['sf_decode']:.1f}", f"{r['llama_decode']:.1f}", f"**{r['ratio']:.2f}x**",
                         f"{r['same_tokens']:.0%}"] for r in result["llama_cpp"]],
                       align="llllrrrr")
    return render(lines)
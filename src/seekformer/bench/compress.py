"""`seekformer bench compress MODEL_DIR`: one table of the compressed variants of a model.

Rows: fp32, int8, int4 (compress/quantize.py), pruned to 50% of the routed experts (compress/prune.py,
when it is importable and the model has routed experts), a distilled student (`--distilled DIR`), and
llama.cpp on the f16 GGUF export (when `llama_cpp` is installed). Columns: weight file size, greedy decode
tokens/s at batch 1 and 8 (seekformer variants timed interleaved, round-robin, median of `repeats`;
decode = (time of N tokens - time of 1 token), so prefill is left out), held-out perplexity on the built-in
validation documents (text the quickstart model never trained on) and next-token top-1 accuracy on the
same text (the task).
"""

from __future__ import annotations

import datetime as _dt
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..runtime import loadavg


def decode_rates(models: dict[str, Any], vocab: int, batch_sizes=(1, 8), new_tokens: int = 32,
                 prompt_len: int = 16, repeats: int = 3) -> dict[str, dict[int, float]]:
    """{name: {batch: decode tokens/s}} of greedy decoding, the models timed round-robin."""
    rates: dict[str, dict[int, float]] = {n: {} for n in models}
    for b in batch_sizes:
        ids = torch.randint(3, vocab, (b, prompt_len), generator=torch.Generator().manual_seed(b))
        times = {n: ([], []) for n in models}
        with torch.no_grad():
            for m in models.values():  # warm-up (kernel build, caches)
                m.generate(ids, max_new_tokens=2, ignore_eos=True)
            for _ in range(repeats):
                for n, m in models.items():
                    t0 = time.perf_counter()
                    m.generate(ids, max_new_tokens=1, ignore_eos=True)
                    t1 = time.perf_counter()
                    m.generate(ids, max_new_tokens=new_tokens, ignore_eos=True)
                    t2 = time.perf_counter()
                    times[n][0].append(t1 - t0)
                    times[n][1].append(t2 - t1)
        for n, (one, many) in times.items():
            rates[n][b] = b * (new_tokens - 1) / max(statistics.median(many) - statistics.median(one), 1e-9)
    return rates


@torch.no_grad()
def heldout_scores(model, tokenizer, max_tokens: int = 4000, window: int = 256) -> dict[str, float]:
    """Perplexity and next-token top-1 accuracy on the built-in validation documents (windows of `window`)."""
    from ..evaluation.perplexity import builtin_validation_documents

    nll, correct, n = 0.0, 0, 0
    for doc in builtin_validation_documents():
        ids = [tokenizer.eos_token_id] + tokenizer.encode(doc)
        for s in range(0, len(ids) - 1, window):
            chunk = torch.tensor([ids[s:s + window + 1]])
            if chunk.shape[1] < 2:
                continue
            logits = model(chunk[:, :-1]).logits[0].float()
            target = chunk[0, 1:]
            nll += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
            correct += int((logits.argmax(-1) == target).sum())
            n += target.numel()
        if n >= max_tokens:
            break
    return {"ppl": math.exp(nll / max(n, 1)), "acc": correct / max(n, 1), "tokens": n}


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _llama_cpp_row(model_dir: Path, work: Path, tokenizer, max_tokens: int, new_tokens: int,
                   log: Callable[[str], None]) -> dict[str, Any] | None:
    try:
        import llama_cpp
    except ImportError:
        log("llama_cpp is not installed: no llama.cpp row")
        return None
    from ..compress.gguf import export_gguf

    path = export_gguf(model_dir, work / "model.gguf", "f16")
    llm = llama_cpp.Llama(str(path), n_ctx=512, n_threads=torch.get_num_threads(), logits_all=True, verbose=False)
    ids = [tokenizer.bos_token_id] + tokenizer.encode("The old man said that")
    times = []
    for _ in range(3):
        llm.reset()
        llm.eval(ids)
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            tok = int(llm.scores[llm.n_tokens - 1].argmax())
            llm.eval([tok])
        times.append((new_tokens - 1) / (time.perf_counter() - t1))
    return {"method": "llama.cpp f16 GGUF", "size": _size(path), "b1": statistics.median(times), "b8": None,
            "ppl": None, "acc": None}


def run_compress_bench(model_dir: str | Path, out_md: str | Path, distilled: str | Path | None = None,
                       max_tokens: int = 4000, new_tokens: int = 32, repeats: int = 3,
                       log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Build the variants in a temporary directory, measure them, write the markdown table to `out_md`."""
    from ..compress.common import load_with_tokenizer
    from ..compress.quantize import quantize_dir
    from ..models.causal_lm import SeekForCausalLM

    model_dir = Path(model_dir)
    base, tok, _ = load_with_tokenizer(model_dir)
    if tok is None:
        from ..errors import CheckpointError

        raise CheckpointError(f"{model_dir} has no tokenizer.json; the benchmark scores held-out text")
    rows, models = [], {"fp32": base}
    sizes = {"fp32": _size(model_dir)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for bits in (8, 4):
            d = quantize_dir(model_dir, work / f"int{bits}", bits)
            models[f"int{bits}"] = SeekForCausalLM.from_pretrained(d)
            sizes[f"int{bits}"] = _size(d)
        if base.config.n_routed_experts >= 4:
            try:
                from ..compress.prune import prune_dir
            except ImportError:
                prune_dir = None
            if prune_dir is not None:
                for name, merge in (("pruned 50% (routing)", False), ("pruned 50% (routing + merge)", True)):
                    d = prune_dir(model_dir, work / name.replace(" ", "_"), keep=0.5, calibration="builtin",
                                  merge=merge, log=log)
                    models[name] = SeekForCausalLM.from_pretrained(d)
                    sizes[name] = _size(d)
        if distilled is not None:
            models["distilled student"] = SeekForCausalLM.from_pretrained(distilled)
            sizes["distilled student"] = _size(Path(distilled))
        log(f"timing {', '.join(models)} (round-robin, {repeats} repeats)")
        rates = decode_rates(models, base.config.vocab_size, new_tokens=new_tokens, repeats=repeats)
        for name, m in models.items():
            s = heldout_scores(m, tok, max_tokens)
            rows.append({"method": name, "size": sizes[name], "b1": rates[name][1], "b8": rates[name][8],
                         "ppl": s["ppl"], "acc": s["acc"]})
            log(f"{name}: {rows[-1]}")
        row = _llama_cpp_row(model_dir, work, tok, max_tokens, new_tokens, log)
        if row is not None:
            rows.append(row)
    Path(out_md).parent.mkdir(parents=True, exist_ok=True)
    Path(out_md).write_text(to_markdown(rows, model_dir, max_tokens))
    return rows


def to_markdown(rows: list[dict[str, Any]], model_dir: Path, max_tokens: int) -> str:
    fp = rows[0]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = [
        "# Compression: size, speed and quality",
        "",
        f"Model `{model_dir}`; measured {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{torch.get_num_threads()} thread(s), load average {loadavg() or 0:.1f} (shared machine: compare ratios "
        "within the table, the variants were timed round-robin in one run).",
        f"Held-out perplexity / next-token accuracy: built-in validation documents, ~{max_tokens} tokens, "
        "windows of 256.",
        "",
        "| method | file size | x fp32 | decode tok/s b=1 | x fp32 | decode tok/s b=8 | held-out ppl | ppl change "
        "| next-token acc |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ppl_change = None if r["ppl"] is None else 100 * (r["ppl"] / fp["ppl"] - 1)
        lines.append(
            f"| {r['method']} | {r['size'] / 2**20:.1f} MiB | {r['size'] / fp['size']:.2f} | {f(r['b1'], '.1f')} | "
            f"{f(None if r['b1'] is None else r['b1'] / fp['b1'], '.2f')} | {f(r['b8'], '.1f')} | "
            f"{f(r['ppl'], '.2f')} | {f(ppl_change, '+.2f')}{'' if ppl_change is None else '%'} | "
            f"{f(r['acc'], '.3f')} |")
    return "\n".join(lines) + "\n"


def run_preset_speed(preset: str, out_md: str | Path, new_tokens: int = 32, repeats: int = 3, seed: int = 0,
                     log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Size and decode speed of fp32 / int8 / int4 on a random-weight `preset` model (no tokenizer, so no
    quality columns): the acceptance measurement of the issue (`base`)."""
    from ..config import SeekConfig
    from ..compress.quantize import quantize_dir
    from ..models.causal_lm import SeekForCausalLM

    cfg = SeekConfig.from_preset(preset)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        SeekForCausalLM(cfg).save_pretrained(work / "fp32")
        models, sizes = {}, {}
        for name in ("fp32", "int8", "int4"):
            d = work / name
            if name != "fp32":
                quantize_dir(work / "fp32", d, int(name[3:]))
            sizes[name] = _size(d)
        for name in ("fp32", "int8", "int4"):
            models[name] = SeekForCausalLM.from_pretrained(work / name)
        log(f"{preset}: sizes {sizes}; timing round-robin")
        rates = decode_rates(models, cfg.vocab_size, new_tokens=new_tokens, repeats=repeats)
    rows = [{"method": n, "size": sizes[n], "b1": rates[n][1], "b8": rates[n][8], "ppl": None, "acc": None}
            for n in models]
    for r in rows:
        log(f"{r['method']}: {r['size'] / 2**20:.1f} MiB, b1 {r['b1']:.2f} tok/s, b8 {r['b8']:.2f} tok/s")
    Path(out_md).parent.mkdir(parents=True, exist_ok=True)
    Path(out_md).write_text(to_markdown(rows, Path(f"preset:{preset} (random weights)"), 0))
    return rows

"""A/B decode timing of two seekformer source trees (e.g. before/after a refactor) and transformers, in one process.

    cp -r OLD_CHECKOUT/src/seekformer /tmp/base/seekformer_base
    python benchmarks/ab_decode.py --base /tmp/base --preset tiny --batch 1 --rounds 15

The old tree is imported under the package name `seekformer_base` (its imports are relative), gets the same
weights as the current model, and the three decoders (current, base, transformers) are timed in rotating
order within each round on the same prompt: decode time = generate(n + 1 tokens) - generate(1 token).
Per-round ratios are reported as medians (robust on a shared machine).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, help="directory holding the package `seekformer_base`")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    sys.path.insert(0, a.base)
    from seekformer_base.config import SeekConfig as OldConfig
    from seekformer_base.models.causal_lm import SeekForCausalLM as Old

    from seekformer.bench.train import build_pair
    from seekformer.config import SeekConfig

    new, hf = build_pair(SeekConfig.from_preset(a.preset), seed=0)
    old = Old(OldConfig.from_preset(a.preset))
    old.load_state_dict(new.state_dict())
    for m in (new, old, hf):
        m.eval()
    hf.generation_config.eos_token_id = None
    ids = torch.randint(3, new.config.vocab_size, (a.batch, a.prompt_len), generator=torch.Generator().manual_seed(0))
    am = torch.ones_like(ids)
    gens = {"new": lambda n: new.generate(ids, max_new_tokens=n, ignore_eos=True),
            "base": lambda n: old.generate(ids, max_new_tokens=n, ignore_eos=True),
            "hf": lambda n: hf.generate(ids, attention_mask=am, max_new_tokens=n, do_sample=False, pad_token_id=0)}
    with torch.no_grad():
        outs = {k: g(a.new_tokens + 1)[:, a.prompt_len:] for k, g in gens.items()}
        same = {k: bool(torch.equal(outs[k], outs["hf"])) for k in ("new", "base")}
        ratios: dict[str, list[float]] = {"new/base": [], "new/hf": [], "base/hf": []}
        names = list(gens)
        for r in range(a.rounds):
            t = {}
            for k in names[r % 3:] + names[:r % 3]:
                t0 = time.perf_counter()
                gens[k](1)
                t1 = time.perf_counter()
                gens[k](a.new_tokens + 1)
                t[k] = max(time.perf_counter() - t1 - (t1 - t0), 1e-9)
            ratios["new/base"].append(t["base"] / t["new"])
            ratios["new/hf"].append(t["hf"] / t["new"])
            ratios["base/hf"].append(t["hf"] / t["base"])
    med = {k: statistics.median(v) for k, v in ratios.items()}
    print(f"{a.preset} prompt {a.prompt_len} batch {a.batch} threads {a.threads}: decode speed ratio new/base "
          f"x{med['new/base']:.2f}, new/transformers x{med['new/hf']:.2f}, base/transformers x{med['base/hf']:.2f} "
          f"(median of {a.rounds} rounds; identical greedy tokens to transformers: {same})")


if __name__ == "__main__":
    main()

"""Speculative decoding in the serving engine: plain vs speculative `Engine` on a trained model with MTP.

    python benchmarks/spec_engine.py MODEL_DIR [--drafts 1 3] [--new-tokens 96] [--rounds 3] [--threads 1] [--compile]

Batch 1, greedy, eos off; several real-text prompts; in each round every prompt runs through every engine
(plain first, then each number of drafts), so a busy machine slows them alike. Prints acceptance, tokens
per main-model forward, the speed-up (ratio of median times) and whether the tokens equal plain decoding.
With --compile every engine runs compiled steps (plain: the compiled decoding step; speculative: one
compiled graph per step), so the speed-up is over the compiled plain engine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from seekformer.inference.engine import Engine
from seekformer.models.causal_lm import SeekForCausalLM
from seekformer.runtime import loadavg
from seekformer.tokenizer import SeekTokenizer

PROMPTS = ["The United States", "In 1905, the scientist", "She opened the door and", "The river flows"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--drafts", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compile", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = SeekForCausalLM.from_pretrained(a.model_dir).eval()
    tok = SeekTokenizer.load(a.model_dir)
    kw = dict(max_new_tokens=a.new_tokens, ignore_eos=True)
    engines = {0: Engine(model, max_batch_size=1, max_length=512, speculative=False, compile=a.compile)}
    for k in a.drafts:
        engines[k] = Engine(model, max_batch_size=1, max_length=512, speculative=True, num_speculative_tokens=k,
                            compile=a.compile)
    times = {k: [] for k in engines}
    outs: dict[int, list[list[int]]] = {k: [] for k in engines}
    load = loadavg()
    for rnd in range(a.rounds + 1):  # round 0 warms up (and gives the tokens)
        for p in PROMPTS:
            ids = tok.encode(p, add_bos=True)
            for k, engine in engines.items():
                t0 = time.perf_counter()
                got = engine.generate([ids], **kw)[0].token_ids
                if rnd:
                    times[k].append(time.perf_counter() - t0)
                else:
                    outs[k].append(got)
    base = statistics.median(times[0])
    print(f"threads {a.threads}, load {load} -> {loadavg()}, plain {a.new_tokens / base:.1f} tok/s")
    print("| drafts K | acceptance | tokens / forward | speed-up | identical |")
    print("|---:|---:|---:|---:|---|")
    for k in a.drafts:
        s = engines[k].batch.spec_stats
        n_runs = (a.rounds + 1) * len(PROMPTS)
        tpf = n_runs * a.new_tokens / (s["forwards"] + n_runs)  # + the prefill forward of each run
        print(f"| {k} | {s['accepted'] / s['proposed']:.1%} | {tpf:.2f} | **{base / statistics.median(times[k]):.2f}x**"
              f" | {outs[k] == outs[0]} |")


if __name__ == "__main__":
    main()

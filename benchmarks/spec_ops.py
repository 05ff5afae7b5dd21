"""Aten ops of one plain decoding step vs one speculative step (K drafts + verification), batch 1: a
load-independent measure of what speculation costs on a model whose step is bound by per-op overhead.

    python benchmarks/spec_ops.py MODEL_DIR [K]
"""

from __future__ import annotations

import collections
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from seekformer.inference.decoding import DecodeBatch, Row, new_cache
from seekformer.inference.sampling import SamplingParams
from seekformer.inference.speculative import MTPDrafter
from seekformer.inference.stopping import SequenceState
from seekformer.models.causal_lm import SeekForCausalLM


class Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def batch(model, k: int | None) -> DecodeBatch:
    params = SamplingParams(max_new_tokens=200, ignore_eos=True)
    b = DecodeBatch(model, new_cache(model, 1, 300 + (k or 0)), drafter=MTPDrafter(model, 1, 300, k) if k else None)
    b.admit([Row(SequenceState(params, set()))])
    ids = torch.randint(5, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    b.choose(b.prefill(0, 1, ids, torch.ones_like(ids)), 0, 1)
    return b


def main() -> None:
    model = SeekForCausalLM.from_pretrained(sys.argv[1]).eval()
    k = int(sys.argv[2]) if len(sys.argv) > 2 else len(model.mtp)
    with torch.no_grad():
        plain = batch(model, None)
        for _ in range(3):
            plain.choose(plain.decode())
        with Count() as c:
            plain.choose(plain.decode())
        spec = batch(model, k)
        for _ in range(3):
            spec.speculate([True])
        with Count() as s:
            spec.speculate([True])
        with Count() as d:
            spec.drafter.draft([spec._tokens(0)])
    print(f"plain step {c.ops} ops; speculative step with K={k}: {s.ops} ops ({s.ops / c.ops:.2f} plain steps), "
          f"of which drafting {d.ops}")


if __name__ == "__main__":
    main()

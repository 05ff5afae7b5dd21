"""Compiled decoding step, folded vs per-head attention (and gathered vs bmm experts): tokens/s of one variant.

Usage: V=fold|nofold|bmm|nofold_bmm python benchmarks/compiled_fold_ab.py tiny|small   (16 experts, top-4, 1 thread)
Run the variants one after the other (each process compiles its own graph). Figures: nn/mla_decode.py
STATIC_FOLD_MAX_GROWTH and benchmarks/results/decode.md.
"""
import time, sys, os, statistics, torch
import torch.nn.functional as F
from seekformer.models.causal_lm import SeekForCausalLM
from seekformer.config import SeekConfig
from seekformer.inference.compiled import CompiledStep
from seekformer.inference.decoding import new_cache
import seekformer.nn.static_decode as sd
from seekformer.nn import few_rows
torch.set_num_threads(1)
torch.manual_seed(0)
model = SeekForCausalLM(SeekConfig.from_preset(sys.argv[1], n_routed_experts=16, num_experts_per_tok=4)).eval()
variant = os.environ.get("V", "")
if "nofold" in variant:  # per-head attention (base: as the step decides: per-head since STATIC_FOLD_MAX_GROWTH)
    for l in model.model.layers: l.self_attn.decode_fold = False
elif "fold" in variant:  # folded W_UK / W_UV (the eager step's choice for these shapes)
    for l in model.model.layers: l.self_attn.decode_fold = True
if "bmm" in variant:
    def b(experts, x, indices, weights):
        w_gu, w_down = experts.local_weights()
        n, k = indices.shape
        gu = torch.bmm(w_gu[indices.reshape(-1)], x.repeat_interleave(k, 0)[:, :, None]).squeeze(-1)  # [N*K,2F]
        g, u = gu.chunk(2, -1)
        act = F.silu(g) * u * weights.reshape(-1, 1).to(x.dtype)
        return torch.bmm(w_down[indices.reshape(-1)], act[:, :, None]).squeeze(-1).view(n, k, -1).sum(1)
    sd.gathered_experts = b
ids = torch.randint(3, 4000, (1, 32), generator=torch.Generator().manual_seed(0))
step = CompiledStep(model)
def run(n=32):
    cache = new_cache(model, 1, 32 + n + 1)
    with torch.no_grad(), few_rows.use(False):
        logits = model(ids, cache=cache, logits_to_keep=1).logits[:, -1]
        toks = []
        t0 = time.perf_counter()
        for i in range(n):
            tok = logits.argmax(-1, keepdim=True); toks.append(int(tok))
            logits = step(tok, cache)
        return toks, time.perf_counter() - t0
t0 = time.perf_counter(); run(4); print(variant, "compile", round(time.perf_counter() - t0, 1), flush=True)
r = [32 / run()[1] for _ in range(5)]
print(f"{variant}: compiled {statistics.median(r):.1f} tok/s {[round(x,1) for x in r]}", flush=True)

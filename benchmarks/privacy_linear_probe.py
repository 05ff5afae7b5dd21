"""How far can a frozen trunk go? Logistic-regression probes (no DP) on a model's pooled hidden states.

For the two-class task that `seekformer.training.privacy.tasks.write_two_class_task` writes: every decoder
layer's output (L0..L{n-1}) and the final normed hidden state ("final", what a classification head reads),
pooled by the mean over real tokens or the last real token (the heads' `pooling: mean | last`), standardised,
then sklearn's LogisticRegression at a few inverse regularisation strengths C. The best of these is an upper
estimate of what `train.method: frozen` (a linear head on those features) can reach without DP, so a frozen
DP run cannot be expected to beat it.

    python benchmarks/privacy_linear_probe.py MODEL_DIR TASK_DIR

Prints one line per feature: the mean feature norm and the test accuracy at each C.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch


def pooled_features(lm, tok, records: list[dict], batch: int = 32) -> dict[str, np.ndarray]:
    """{"L{i}_{mean|last}" / "final_{mean|last}": [n, D]} for the records' texts (BOS text EOS, <= 128 tokens)."""
    caps: dict[int, torch.Tensor] = {}
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: caps.__setitem__(i, o[0] if isinstance(o, tuple) else o))
             for i, layer in enumerate(lm.model.layers)]
    out: dict[str, list[torch.Tensor]] = {}
    try:
        for j in range(0, len(records), batch):
            ids = [[tok.bos_token_id, *tok.encode(r["text"])[:126], tok.eos_token_id] for r in records[j: j + batch]]
            t = max(map(len, ids))
            x = torch.tensor([s + [tok.pad_token_id] * (t - len(s)) for s in ids])
            mask = torch.tensor([[1] * len(s) + [0] * (t - len(s)) for s in ids]).bool()
            with torch.no_grad():
                final = lm.model(x, mask)
            m = mask.float().unsqueeze(-1)
            last = mask.sum(1) - 1
            for name, h in [*((f"L{i}", caps[i]) for i in sorted(caps)), ("final", final)]:
                out.setdefault(f"{name}_mean", []).append((h * m).sum(1) / m.sum(1))
                out.setdefault(f"{name}_last", []).append(h[torch.arange(len(ids)), last])
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def main(model_dir: str, task_dir: str) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from seekformer.models import SeekForCausalLM
    from seekformer.tokenizer import SeekTokenizer

    torch.set_num_threads(2)
    tok, lm = SeekTokenizer.from_pretrained(model_dir), SeekForCausalLM.from_pretrained(model_dir).eval()
    split = {s: [json.loads(line) for line in open(f"{task_dir}/{s}.jsonl", encoding="utf-8")] for s in ("train", "test")}
    labels = sorted({r["label"] for r in split["train"]})
    y = {s: np.array([labels.index(r["label"]) for r in recs]) for s, recs in split.items()}
    feats = {s: pooled_features(lm, tok, recs) for s, recs in split.items()}
    for key in feats["train"]:
        scaler = StandardScaler().fit(feats["train"][key])
        a, b = scaler.transform(feats["train"][key]), scaler.transform(feats["test"][key])
        accs = [LogisticRegression(C=c, max_iter=2000).fit(a, y["train"]).score(b, y["test"]) for c in (0.01, 0.1, 1.0)]
        norm = float(np.linalg.norm(feats["train"][key], axis=1).mean())
        print(f"{key:12s} |x| {norm:6.1f}  " + "  ".join(f"C={c:g}: {acc:.3f}" for c, acc in zip((0.01, 0.1, 1.0), accs)),
              flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])

"""Choose DP settings for a frozen-trunk classification head fast: DP-SGD simulated on cached features.

With `train.method: frozen` the trunk never changes, so a DP run is DP-SGD on a linear head over fixed
pooled features (that is also what the trainer does: it caches the head's pooled input once). This script
computes those features exactly as the head does (models/multitask.py: the task's `features` and `pooling`),
then runs the same mechanism on them for several train/test splits: Poisson sampling at q = B / n, per-example
gradients of the head clipped to C = 1 (closed form for a linear softmax head), Gaussian noise with the
multiplier Opacus calibrates for (epsilon, delta, q, steps), the sum divided by the expected batch, AdamW
(weight decay 0) with the trainer's cosine schedule (to 0.1 x lr). It reports test accuracy on the given
split and its mean (sd) over random re-splits of train + test, which one 150-example test split cannot
give (one standard error there is ~0.035). Used to pick DP_TRAIN_DEFAULTS / DP_TASK_DEFAULTS.

    python benchmarks/privacy_dp_sim.py MODEL_DIR TASK_DIR [--features layers+tokens] [--pooling mean]
        [--lr 0.005] [--batch 512] [--steps 400] [--epsilon 8] [--delta 1e-5] [--splits 6] [--no-dp]

TASK_DIR holds train.jsonl and test.jsonl ({text, label}), e.g. from
`seekformer.training.privacy.tasks.write_two_class_task`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from seekformer.training.optim import build_scheduler


def features(model_dir: str, task_dir: Path, feats: str, pooling: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(pooled head inputs [N, P] for train then test records, labels [N], the number of train records)."""
    from seekformer import SeekForCausalLM
    from seekformer.data.tasks import Encoder, TaskRecipe, collate
    from seekformer.models.multitask import SeekForMultiTask
    from seekformer.tokenizer import SeekTokenizer

    rows = {s: [json.loads(line) for line in (task_dir / f"{s}.jsonl").read_text().splitlines() if line.strip()]
            for s in ("train", "test")}
    labels = sorted({r["label"] for r in rows["train"]})
    task = TaskRecipe(name="t", type="classification", train=str(task_dir / "train.jsonl"), labels=labels,
                      features=feats, pooling=pooling, dropout=0.0)
    tok = SeekTokenizer.from_pretrained(model_dir)
    enc = Encoder(task, tok, labels)
    lm = SeekForCausalLM.from_pretrained(model_dir).eval()
    mt = SeekForMultiTask(lm, [{"name": "t", "type": "classification", "labels": labels, "features": feats,
                                "pooling": pooling, "dropout": 0.0}]).eval()
    head = mt.heads["t"]
    xs, ys = [], []
    for split in ("train", "test"):
        ex = enc.encode(rows[split], split, training=False)
        for i in range(0, len(ex), 64):
            b = collate(ex[i: i + 64], "classification", tok.pad_token_id)
            with torch.no_grad():
                h = mt.trunk_states("t", b["input_ids"], b["attention_mask"])
                xs.append(head.pool(h, b["attention_mask"], b["input_ids"]))
            ys.append(b["labels"])
    return torch.cat(xs), torch.cat(ys), len(rows["train"])


def dp_train(x: torch.Tensor, y: torch.Tensor, classes: int, lr: float, batch: int, steps: int, sigma: float,
             seed: int) -> torch.nn.Linear:
    """DP-SGD (sigma 0: plain Poisson-batched SGD) of a zero-initialised linear head; clipping C = 1."""
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    q = batch / n
    head = torch.nn.Linear(x.shape[1], classes)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    sched = build_scheduler(opt, 0, steps, 0.1)  # the trainer's schedule (min_lr_ratio 0.1, no warm-up)
    for _ in range(steps):
        idx = torch.nonzero(torch.rand(n, generator=g) < q).flatten()
        xb, yb = x[idx], y[idx]
        with torch.no_grad():
            err = F.softmax(head(xb), -1) - F.one_hot(yb, classes).to(x.dtype)  # dL/dlogits per example [b, C]
            norm = err.norm(dim=-1) * (xb.pow(2).sum(-1) + 1).sqrt()  # ||(err x^T, err)||_F per example
            scale = (1.0 / norm.clamp_min(1e-12)).clamp(max=1.0)[:, None]  # clip to C = 1
            gw = (err * scale).T @ xb
            gb = (err * scale).sum(0)
            gw += sigma * torch.randn(gw.shape, generator=g)
            gb += sigma * torch.randn(gb.shape, generator=g)
            head.weight.grad, head.bias.grad = gw / (q * n), gb / (q * n)
        opt.step()
        sched.step()
    return head


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("task_dir", type=Path)
    ap.add_argument("--features", default="layers+tokens")
    ap.add_argument("--pooling", default="mean")
    ap.add_argument("--lr", type=float, default=0.005)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--splits", type=int, default=6, help="random re-splits of train + test besides the given one")
    ap.add_argument("--no-dp", action="store_true", help="sigma 0 (clipping and sampling kept)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    x, y, n_train = features(a.model_dir, a.task_dir, a.features, a.pooling)
    classes = int(y.max()) + 1
    sigma = 0.0
    if not a.no_dp:
        from seekformer.training.privacy.accounting import calibrate

        sigma = calibrate("rdp", a.epsilon, a.delta, a.batch / n_train, a.steps)
    print(f"features {a.features} / {a.pooling}: {x.shape[1]} per example, {n_train} train / {len(y) - n_train} test; "
          f"{'no DP' if a.no_dp else f'epsilon {a.epsilon:g}, sigma {sigma:.3f}'}, batch {a.batch}, {a.steps} steps, "
          f"lr {a.lr:g} ({time.perf_counter() - t0:.0f} s to encode)")
    accs = []
    for s in range(a.splits + 1):
        order = torch.arange(len(y)) if s == 0 else torch.randperm(len(y), generator=torch.Generator().manual_seed(s))
        tr, te = order[:n_train], order[n_train:]
        head = dp_train(x[tr], y[tr], classes, a.lr, a.batch, a.steps, sigma, seed=s)
        with torch.no_grad():
            accs.append(float((head(x[te]).argmax(-1) == y[te]).float().mean()))
    rnd = torch.tensor(accs[1:])
    print(f"given split {accs[0]:.3f}" + (f"; {a.splits} random splits mean {rnd.mean():.3f} (sd {rnd.std():.3f})"
                                          if a.splits else ""))


if __name__ == "__main__":
    main()

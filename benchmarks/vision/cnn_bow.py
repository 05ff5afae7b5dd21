"""The VQA peer the acceptance names: a small CNN on the image + a bag of words of the question, a classifier
over the answer vocabulary, trained the same steps x batch as the VLM recipe and scored by the same normalized
exact match on the test split.

    python benchmarks/vision/cnn_bow.py DATA/shapes [--steps 3000] [--batch-size 32] [--threads 1] [--seed 0]

DATA/shapes is `python -m seekformer.data.shapes DATA/shapes --images 3600 --seed 0` (train/validation/test
jsonl + images/). Prints one JSON line per question type and one for all: {"type", "examples", "exact_match"},
then {"steps", "seconds", "cpu_seconds"}. Pure torch + Pillow; images are decoded once.

Model (the "plain CNN + bag-of-words" baseline of VQA papers, sized for 32x32 scenes):
    pixels [B,3,32,32] -> conv3x3(32) ReLU -> conv3x3 s2 (64) ReLU -> conv3x3 s2 (64) ReLU -> [B,64,8,8]
                       -> flatten -> Linear 256                                       (spatial layout kept)
    question words -> EmbeddingBag(mean, 64) -> Linear 256
    concat -> ReLU -> Linear 256 -> ReLU -> Linear |answers|                          cross-entropy
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from per_type import TYPES, question_type  # noqa: E402


def words(question: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", question.lower())


def load(data: Path, split: str) -> list[dict[str, str]]:
    return [json.loads(line) for line in (data / f"{split}.jsonl").read_text(encoding="utf-8").splitlines() if line]


def pixels_of(data: Path, records: list[dict[str, str]], cache: dict[str, torch.Tensor]) -> torch.Tensor:
    """[N,3,S,S] in [-1,1], each PNG decoded once."""
    from PIL import Image
    import numpy as np

    out = []
    for r in records:
        if r["image"] not in cache:
            arr = np.asarray(Image.open(data / r["image"]).convert("RGB"), dtype=np.float32)
            cache[r["image"]] = torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0
        out.append(cache[r["image"]])
    return torch.stack(out)


class CnnBow(nn.Module):
    def __init__(self, n_words: int, n_answers: int, size: int = 32) -> None:
        super().__init__()
        self.cnn = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
                                 nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU())
        self.img = nn.Linear(64 * (size // 4) ** 2, 256)
        self.bow = nn.EmbeddingBag(n_words, 64, mode="mean")
        self.q = nn.Linear(64, 256)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, n_answers))

    def forward(self, pixels_BCSS: torch.Tensor, words_BL: torch.Tensor) -> torch.Tensor:
        img = self.img(self.cnn(pixels_BCSS).flatten(1))
        return self.head(torch.cat([img, self.q(self.bow(words_BL))], dim=-1))


def main(argv: list[str] | None = None) -> None:
    from seekformer.evaluation.metrics import normalize_answer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    data = Path(a.data)
    t0, c0 = time.time(), resource.getrusage(resource.RUSAGE_SELF)

    train, test = load(data, "train"), load(data, "test")
    vocab = {w: i + 1 for i, w in enumerate(sorted({w for r in train for w in words(r["question"])}))}
    answers = sorted({normalize_answer(r["answer"]) for r in train})
    a_id = {ans: i for i, ans in enumerate(answers)}
    cache: dict[str, torch.Tensor] = {}

    def batch_words(recs):
        ids = [[vocab.get(w, 0) for w in words(r["question"])] for r in recs]
        n = max(len(x) for x in ids)
        return torch.tensor([x + [0] * (n - len(x)) for x in ids])  # 0 = unknown/pad (averaged in; harmless)

    x_train = pixels_of(data, train, cache)
    w_train = batch_words(train)
    y_train = torch.tensor([a_id[normalize_answer(r["answer"])] for r in train])
    model = CnnBow(len(vocab) + 1, len(answers), x_train.shape[-1])
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + torch.cos(torch.tensor(s / a.steps * 3.14159)).item()))
    gen = torch.Generator().manual_seed(a.seed)
    perm, pos = torch.randperm(len(train), generator=gen), 0
    model.train()
    for step in range(a.steps):
        if pos + a.batch_size > len(perm):
            perm, pos = torch.randperm(len(train), generator=gen), 0
        idx = perm[pos: pos + a.batch_size]
        pos += a.batch_size
        loss = F.cross_entropy(model(x_train[idx], w_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 500 == 0:
            print(json.dumps({"step": step + 1, "loss": round(loss.item(), 4)}), file=sys.stderr)

    model.eval()
    with torch.no_grad():
        pred = model(pixels_of(data, test, cache), batch_words(test)).argmax(-1).tolist()
    rows: dict[str, list[bool]] = {}
    for r, k in zip(test, pred):
        hit = answers[k] == normalize_answer(r["answer"])
        rows.setdefault(question_type(r["question"]), []).append(hit)
        rows.setdefault("all", []).append(hit)
    for name in [t for t, _ in TYPES if t in rows] + ["all"]:
        print(json.dumps({"type": name, "examples": len(rows[name]),
                          "exact_match": round(sum(rows[name]) / len(rows[name]), 4)}))
    c1 = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"steps": a.steps, "batch_size": a.batch_size, "seconds": round(time.time() - t0, 1),
                      "cpu_seconds": round(c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime, 1)}))


if __name__ == "__main__":
    main()

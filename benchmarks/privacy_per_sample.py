"""Per-example clipped gradient sums: `hooks` (one batched pass per length-sorted chunk) vs `loop` (one backward
per example), same model, same examples, interleaved, on the two-class task that
`seekformer.training.privacy.tasks.write_two_class_task` writes.

    python benchmarks/privacy_per_sample.py MODEL_DIR TASK_DIR [--examples 64] [--rounds 2] [--threads 1]

For train.method lora (the DP default's adapters) and full: seconds per example gradient for each strategy,
the ratio loop/hooks, and the largest difference between the two clipped sums (they must agree).
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    from seekformer.data.tasks import collate
    from seekformer.models.causal_lm import SeekForCausalLM
    from seekformer.models.multitask import SeekForMultiTask
    from seekformer.tokenizer import SeekTokenizer
    from seekformer.training.privacy.per_sample import PerSampleClipper

    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("task")
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tok = SeekTokenizer.load(a.model)
    rows = [json.loads(line) for line in open(f"{a.task}/train.jsonl", encoding="utf-8")][: a.examples]
    labels = sorted({r["label"] for r in rows})
    ex = [{"input_ids": tok.encode(r["text"])[:128], "label": labels.index(r["label"])} for r in rows]
    batch = collate(ex, "classification", tok.pad_token_id)
    print(f"{len(ex)} examples, {int(batch['attention_mask'].sum())} tokens (padded batch {tuple(batch['input_ids'].shape)}),"
          f" {a.threads} thread(s)")
    print("| method | trainable | loop s/example | hooks s/example | loop / hooks | max abs diff |")
    print("| --- | --- | --- | --- | --- | --- |")
    for method in ("lora", "full"):
        model = SeekForMultiTask(SeekForCausalLM.from_pretrained(a.model),
                                 [{"name": "c", "type": "classification", "labels": labels}])
        model.train()
        if method == "lora":
            model.add_lora()
        params = [p for p in model.parameters() if p.requires_grad]
        moe = [m for n, m in model.lm.moe_layers() if not n.startswith("mtp.")]

        def loss_of(b):
            out = model("c", **b)
            return out.loss + out.aux_loss if out.aux_loss is not None else out.loss

        times: dict[str, float] = {"loop": 0.0, "hooks": 0.0}
        sums = {}
        for _ in range(a.rounds):
            for strategy in ("loop", "hooks"):
                clipper = PerSampleClipper(model, params, 1.0, moe, strategy, loss_sums_examples=True)
                t = time.perf_counter()
                sums[strategy], _, _ = clipper.clipped_sum(batch, loss_of)
                times[strategy] += time.perf_counter() - t
        n = a.rounds * len(ex)
        diff = max(float((x - y).abs().max()) for x, y in zip(sums["loop"], sums["hooks"]))
        print(f"| {method} | {sum(p.numel() for p in params):,} | {times['loop'] / n:.4f} | {times['hooks'] / n:.4f} | "
              f"{times['loop'] / times['hooks']:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()

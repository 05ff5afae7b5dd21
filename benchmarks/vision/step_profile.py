"""Time and profile the training step of a fine-tuning recipe (e.g. benchmarks/vision/shapes_vqa.yaml).

    python benchmarks/vision/step_profile.py RECIPE [--threads 1] [--steps 10] [overrides ...]

Builds the recipe's trainer (output to a temporary directory), runs 3 warm-up steps, then prints CPU seconds
and wall seconds per step over `--steps` steps and a torch.profiler table (self CPU time) of 3 more.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    a, overrides = ap.parse_known_args()
    from torch.profiler import ProfilerActivity, profile

    from seekformer.training.multitask import MultiTaskTrainer
    from seekformer.training.multitask_recipe import load_finetune_recipe

    with tempfile.TemporaryDirectory() as out:
        r = load_finetune_recipe(a.recipe, ["--train.threads", str(a.threads), "--out", out, *overrides])
        tr = MultiTaskTrainer(r)
        tr.prepare()
        for _ in range(3):
            tr.train_step()
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(a.steps):
            tr.train_step()
        print(f"CPU-s per step {(time.process_time() - cpu) / a.steps:.3f}, "
              f"wall s per step {(time.perf_counter() - wall) / a.steps:.3f}")
        with profile(activities=[ProfilerActivity.CPU]) as p:
            for _ in range(3):
                tr.train_step()
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


if __name__ == "__main__":
    main()

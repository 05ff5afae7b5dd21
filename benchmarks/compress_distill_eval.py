"""Distilled vs plain student of the quickstart model at equal steps; held-out perplexity. Usage:
   python benchmarks/compress_distill_eval.py TEACHER_DIR WORK_DIR STEPS [KD_WEIGHT [TEMPERATURE]]
Trains the student (the teacher's config with 2 of its 4 layers) twice on `builtin` with the same data,
steps and seed: --kd-weight W (distilled) and --kd-weight 0 (the baseline), then scores teacher and both
students on the built-in validation documents (held out from the teacher's and the students' training).
Equivalent CLI: seekformer compress distill TEACHER --student TEACHER/config.json --set num_hidden_layers=2
                --data builtin --steps STEPS --kd-weight W --threads 1 --out DIR"""
import json
import sys
from pathlib import Path

import torch

from seekformer.bench.compress import heldout_scores
from seekformer.compress.common import load_with_tokenizer
from seekformer.compress.distill import distill_dir

teacher_dir, work, steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
w = float(sys.argv[4]) if len(sys.argv) > 4 else 0.5
temp = float(sys.argv[5]) if len(sys.argv) > 5 else 1.0
torch.set_num_threads(1)
results = {}
for name, kd in ((f"distilled W={w} T={temp}", w), ("baseline W=0", 0.0)):
    out = work / name.split()[0]
    if not (out / "distill.json").is_file():
        distill_dir(teacher_dir, str(teacher_dir / "config.json"), ["builtin"], steps, out, kd_weight=kd,
                    temperature=temp, overrides={"num_hidden_layers": 2}, train={"threads": 1, "progress": False})
    m, tok, _ = load_with_tokenizer(out)
    results[name] = heldout_scores(m, tok, 6000)
    print(name, results[name], flush=True)
m, tok, _ = load_with_tokenizer(teacher_dir)
results["teacher"] = heldout_scores(m, tok, 6000)
print("teacher", results["teacher"], flush=True)
print(json.dumps(results, indent=1))

"""Expert pruning of the quickstart model to 50%: routing saliency vs random, with and without merging and a
short recovery; held-out perplexity. Usage:
   python benchmarks/compress_prune_eval.py [RECOVER_STEPS]   (figures in docs/compress.md)
CLI equivalent of one row: seekformer compress prune /work/wt/models/quickstart --keep 0.5 --calibration builtin
   --max-tokens 8000 [--method random --seed S] [--merge] [--recover-steps N] --out DIR"""
import sys

import torch

from seekformer.bench.compress import heldout_scores
from seekformer.compress.common import load_with_tokenizer
from seekformer.compress.prune import prune_dir

torch.set_num_threads(1)
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 60
src = '/work/wt/models/quickstart'
m, tok, _ = load_with_tokenizer(src)
print('unpruned', heldout_scores(m, tok, 6000), flush=True)
rows = [('routing', 0, False, 0), ('random', 0, False, 0), ('random', 1, False, 0), ('routing', 0, True, 0),
        ('random', 0, True, 0), ('routing', 0, False, steps), ('routing', 0, True, steps)]
for method, seed, merge, rec in rows:
    name = f'{method}{seed}{"-merge" if merge else ""}{f"-rec{rec}" if rec else ""}'
    d = prune_dir(src, f'/tmp/prune_eval/{name}', '0.5', 'builtin', method, seed, 8000, merge=merge,
                  recover_steps=rec)
    p, _, _ = load_with_tokenizer(d)
    print(name, heldout_scores(p, tok, 6000), flush=True)

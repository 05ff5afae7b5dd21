"""Routing-saliency vs random expert pruning (50%) of the quickstart model, held-out perplexity. Usage:
   python benchmarks/compress_prune_eval.py   (figures in docs/compress.md)"""
import torch, sys
torch.set_num_threads(1)
from seekformer.compress.prune import prune_dir
from seekformer.bench.compress import heldout_scores
from seekformer.compress.common import load_with_tokenizer
m,tok,_=load_with_tokenizer('/work/wt/models/quickstart')
print('fp32', heldout_scores(m,tok,3000), flush=True)
for method,seed in [('routing',0),('random',0),('random',1)]:
    d=prune_dir('/work/wt/models/quickstart', f'/tmp/prune_eval/{method}{seed}', '0.5', 'builtin', method, seed, 8000)
    p,_,_=load_with_tokenizer(d)
    print(method, seed, heldout_scores(p,tok,3000), flush=True)

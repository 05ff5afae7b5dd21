"""Held-out perplexity of the quickstart model: fp32 vs int8 and int4 (group 32/64/128). Usage:
   python benchmarks/compress_quality.py [MAX_TOKENS]   (figures in docs/compress.md)"""
import torch, copy, time, sys
torch.set_num_threads(1)
from seekformer.compress.common import load_with_tokenizer
from seekformer.compress.quantize import quantize_model
from seekformer.evaluation.perplexity import evaluate_perplexity, builtin_validation_documents
m,tok,_=load_with_tokenizer('/work/wt/models/quickstart')
docs=builtin_validation_documents()
N=int(sys.argv[1]) if len(sys.argv)>1 else 6000
def ppl(model): return evaluate_perplexity(model,tok,docs,window=256,max_tokens=N).perplexity
t=time.time(); base=ppl(m); print('fp32',base, time.time()-t, flush=True)
for bits,g,emb in [(8,0,True),(4,32,True),(4,64,True),(4,128,True)]:
    q=quantize_model(copy.deepcopy(m),bits,g or 64, embeddings=emb)
    p=ppl(q); print(bits,g,emb,p, f"{100*(p/base-1):+.2f}%", flush=True)

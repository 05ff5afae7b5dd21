"""seekformer int8 (compress quantize, per-channel) vs llama.cpp Q8_0 on the same weights, batch 1.

    python benchmarks/decode_int8_q8.py [THREADS]      # needs /work/wt/models/small16x4 (decode.md, session 8)

Rows: int8 eager, int8 with compile requested (int8 layers are not compiled: it falls back to eager), fp32
compiled; each interleaved with llama.cpp on the Q8_0 GGUF export of the fp32 directory (bench_llama_cpp).
"""
import sys, torch
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
from pathlib import Path
from seekformer.compress.quantize import quantize_dir
from seekformer.compress.common import load_with_tokenizer
from seekformer.bench.decode import bench_llama_cpp
src = Path("/work/wt/models/small16x4"); q = Path("/work/wt/models/small16x4-int8")
if not q.exists():
    quantize_dir(src, q, 8)
fp, tok, _ = load_with_tokenizer(src)
i8, _, _ = load_with_tokenizer(q)
g = torch.Generator().manual_seed(0)
prompt = torch.randint(3, fp.config.vocab_size, (1, 32), generator=g)
for name, model, gg, comp in (("int8 eager", i8, "q8_0", False), ("int8 compiled", i8, "q8_0", True),
                              ("fp32 compiled", fp, "q8_0", True)):
    try:
        bench_llama_cpp(name, src, model, prompt, 64, 5, print, gguf_type=gg, compile=comp)
    except Exception as e:
        print(name, "failed:", type(e).__name__, str(e)[:200])

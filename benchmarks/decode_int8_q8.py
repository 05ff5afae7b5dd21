"""seekformer int8 (compress quantize, per-channel) vs llama.cpp Q8_0 on the same weights, batch 1.

    python benchmarks/decode_int8_q8.py MODEL_DIR [--threads 1]

MODEL_DIR (a float model directory with a tokenizer) is written first when missing: a random `small` preset
with 16 routed experts, top-4 (the held-out-like config; `build_demo_model_dir`). Its int8 copy goes to
MODEL_DIR-int8. Rows: int8 eager, int8 with compile requested (int8 layers are not compiled: the step falls
back to eager, with a warning), fp32 compiled; each interleaved with llama.cpp on the Q8_0 GGUF export of the
fp32 directory (`bench.decode.bench_llama_cpp`, 64 new tokens, median of 5). Needs llama-cpp-python.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from seekformer.bench.decode import bench_llama_cpp
    from seekformer.compress.common import load_with_tokenizer
    from seekformer.compress.quantize import quantize_dir
    from seekformer.serving.demo import build_demo_model_dir

    src, q = a.model_dir, a.model_dir.with_name(a.model_dir.name + "-int8")
    if not src.exists():
        build_demo_model_dir(src, vocab_size=16384, preset="small", n_routed_experts=16, num_experts_per_tok=4)
    if not q.exists():
        quantize_dir(src, q, 8)
    fp, _, _ = load_with_tokenizer(src)
    i8, _, _ = load_with_tokenizer(q)
    prompt = torch.randint(3, fp.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    for name, model, compile in (("int8 eager", i8, False), ("int8 compiled", i8, True), ("fp32 compiled", fp, True)):
        bench_llama_cpp(name, src, model, prompt, 64, 5, print, gguf_type="q8_0", compile=compile)


if __name__ == "__main__":
    main()

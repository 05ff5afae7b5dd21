"""int4 few-row kernel, before (float conversions, git revision REV) vs now (int8 activations + maddubs), with
fp32 and int8 for scale: best of 60 interleaved runs of one product, 1 thread. Usage:
   OMP_NUM_THREADS=1 python benchmarks/compress_int4_ab.py [REV]   (REV default e8294fa, the kernel before)"""
import subprocess, time, types, torch, sys
torch.set_num_threads(1)
REV = sys.argv[1] if len(sys.argv) > 1 else "e8294fa"
from seekformer.nn import quant, quant_kernels as new
from seekformer.nn.few_rows import few_rows_linear
src = subprocess.run(["git", "show", f"{REV}:src/seekformer/nn/quant_kernels.py"], capture_output=True, text=True).stdout
old = types.ModuleType("old_qk"); exec(compile(src, "old_qk", "exec"), old.__dict__)
lo, ln = old.kernels(), new.kernels()
torch.manual_seed(0)
for (O, I) in [(4096, 1024), (1024, 4096)]:
    W = torch.randn(O, I) * 0.02
    q8 = quant.QuantLinear(W, None, 8); q4 = quant.QuantLinear(W, None, 4, 64)
    for M in (1, 8):
        x = torch.randn(M, I); best = {}
        fs = {"fp32": lambda: few_rows_linear(x, W), "int8": lambda: q8(x),
              "int4 old": lambda: old.int4_linear(lo, x, q4.qweight, q4.scales, q4.mins),
              "int4 new": lambda: new.int4_linear(ln, x, q4.qweight, q4.scales, q4.mins)}
        with torch.no_grad():
            for _ in range(60):
                for k, f in fs.items():
                    t = time.perf_counter(); f(); d = time.perf_counter() - t
                    best[k] = min(best.get(k, 9), d)
        print(f"| {O} x {I} | {M} | " + " | ".join(f"{best[k]*1e3:.2f} ms" for k in fs) +
              " | " + " | ".join(f"{best['fp32']/best[k]:.2f}x" for k in ("int8", "int4 old", "int4 new")) + " |", flush=True)

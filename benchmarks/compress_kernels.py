"""Best-of-60 interleaved times of one product: fp32 (few_rows_linear) vs QuantLinear int8 / int4 (group 64),
1 thread. Usage: OMP_NUM_THREADS=1 python benchmarks/compress_kernels.py   (figures in docs/compress.md)"""
import time, torch
torch.set_num_threads(1)
from seekformer.nn import quant
from seekformer.nn.few_rows import few_rows_linear
torch.manual_seed(0)
for (O,I) in [(4096,1024),(1024,4096)]:
    W=torch.randn(O,I)*0.02
    q8=quant.QuantLinear(W,None,8); q4=quant.QuantLinear(W,None,4,64)
    for M in (1,8):
        x=torch.randn(M,I); best={}
        fs={"fp32":lambda: few_rows_linear(x,W),"int8":lambda: q8(x),"int4":lambda: q4(x)}
        with torch.no_grad():
            for _ in range(60):
                for k,f in fs.items():
                    t=time.perf_counter(); f(); d=time.perf_counter()-t
                    best[k]=min(best.get(k,9),d)
        print(O,I,M,{k:f"{v*1e3:.3f}ms" for k,v in best.items()}, "int8 x%.2f int4 x%.2f"%(best['fp32']/best['int8'],best['fp32']/best['int4']), flush=True)

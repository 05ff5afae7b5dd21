"""Aten ops issued by one batch-1 decode step of the current tree vs an older tree (`seekformer_base`, see
ab_decode.py): a load-independent check that a refactor kept the decode step's work unchanged.

    python benchmarks/decode_ops.py /tmp/base      # directory holding the package seekformer_base
"""
import sys, torch
from collections import Counter
from torch.utils._python_dispatch import TorchDispatchMode
sys.path.insert(0, sys.argv[1])
from seekformer_base.config import SeekConfig as OC
from seekformer_base.models.causal_lm import SeekForCausalLM as Old
from seekformer_base.nn.kv_cache import KVCache as OK
try:  # a tree from before the house refactor (issue 11): decode in inference/runner.py
    from seekformer_base.inference.runner import decode_forward
except ImportError:  # a later tree: the model owns its decode step
    def decode_forward(model, tok, cache):
        return model.decode_step(tok, cache)
from seekformer.config import SeekConfig
from seekformer.models.causal_lm import SeekForCausalLM
from seekformer.nn.kv_cache import KVCache
class Count(TorchDispatchMode):
    def __init__(s): super().__init__(); s.c = Counter()
    def __torch_dispatch__(s, func, types, args=(), kwargs=None):
        s.c[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))
for preset in ("tiny", "small"):
    torch.manual_seed(0)
    new = SeekForCausalLM(SeekConfig.from_preset(preset)).eval()
    old = Old(OC.from_preset(preset)).eval(); old.load_state_dict(new.state_dict())
    ids = torch.randint(3, 1000, (1, 32))
    cn, co = KVCache(new.config, 1, 64), OK(old.config, 1, 64)
    with torch.no_grad():
        new(ids, cache=cn); old(ids, cache=co)
        tok = ids[:, -1:]
        with Count() as a: new.decode_step(tok, cn)
        with Count() as b: decode_forward(old, tok, co)
    print(preset, "ops new", sum(a.c.values()), "base", sum(b.c.values()), "diff", (a.c - b.c), (b.c - a.c))

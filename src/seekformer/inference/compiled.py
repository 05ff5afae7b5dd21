"""The decoding step captured by `torch.compile` (CPU inductor): one generated kernel program per step
instead of ~500 eager op dispatches.

Shapes: B rows, S cached slots (the cache is preallocated: `KVCache` storage [B, S_max, R+P] per layer),
D hidden, V vocabulary, E routed experts, K experts per token.

    step = compiled_step(model)          # None when compiling is off or impossible for this model
    logits = step(input_ids [B,1], cache)   # == model.decode_step(input_ids, cache) (same values)
    logits, hidden = step(input_ids, cache, return_hidden=True)     # what MTP drafting reads

What is captured: the model-owned `SeekForCausalLM.static_decode_step`, a plain decoding step of one token
per row on the latent cache -- embedding, rope, every layer's absorbed attention (the eager step's code,
writing the new latent into the preallocated cache in place), the FFN, the final norm and the output head.
It differs from the eager `SeekModel.step` only where that one reads data back into Python:
  * routed experts: the eager step asks the router which experts were chosen (`.tolist()`) and runs each;
    the static step gathers the chosen experts' weights by index inside the graph
    (`nn.static_decode.gathered_experts`): the generated kernel reads those K experts' rows in place;
  * the cache pointer arithmetic (`KVCache.prepare`/`commit`, a few integer ops) stays outside the graph.
The number of cached slots S varies per step: it is marked dynamic, so one compiled graph serves every
length (no recompilation per token). Batch 1 has its own graph; larger batches share one with a dynamic
batch dimension.

Speculative decoding of a single row has its own graph (`CompiledSpeculation`, the model's
`static_speculate_step`: the MTP module's catch-up and K drafts, then the main model on the K+1 tokens;
`speculative.MTPDrafter.fused` builds its inputs and keeps the caches), so a speculative step is one call.

Compiling takes seconds to minutes (printed once per process, `compile_report()`); inductor keeps its
generated code in its on-disk cache (`TORCHINDUCTOR_CACHE_DIR`, by default under /tmp), so a later
process with the same model shapes compiles much faster. Anything that fails to compile (a quantized
model, a missing C compiler, an unsupported torch) falls back to the eager step with one warning line.
"""

from __future__ import annotations

import sys
import threading
import time
import warnings

import torch

from ..nn.kv_cache import KVCache

_enabled = False
_lock = threading.Lock()
# (seconds the first compiled step took, including compilation; number of graphs) per model, for reports
_report: dict[int, dict] = {}


def set_compile(on: bool) -> None:
    """Process-wide default of whether decoding steps are compiled (`--compile` on the CLI)."""
    global _enabled
    _enabled = bool(on)


def compile_enabled() -> bool:
    return _enabled


class _Captured:
    """A model-owned static function (`graph_fn`, a method name) through `torch.compile`, made on first use;
    `failed` says why it cannot run (then callers take the eager path)."""

    graph_fn = ""
    what = ""  # "compiled {what} unavailable" warnings
    label = ""  # "{label}: first call ..." line
    memo = ""  # the model.__dict__ key of the model's instance
    # products of at least this many rows inside the graph take the W @ X^T form (the model's
    # `decode_products`); None: as set
    from_rows: int | None = None

    def __init__(self, model) -> None:
        self.model = model
        self.failed: str | None = model.static_step_blocker()
        self.first_seconds: float | None = None  # the first call, compilation included
        self.calls = 0
        self._fn = None

    def _compiled(self):
        if self._fn is None:
            self._fn = torch.compile(getattr(self.model, self.graph_fn), dynamic=False, fullgraph=True,
                                     options={"cpp_wrapper": True})  # C++ calls the kernels: ~1.2x a step
        return self._fn

    def _run(self, *args):
        """The graph's outputs, or None (one warning; eager from now on) when compiling or running it failed."""
        self.model.static_step_prepare()
        t0 = time.perf_counter()
        try:
            with self.model.decode_products(None, self.from_rows):
                out = self._compiled()(*args)
        except Exception as exc:  # compilation or the generated code failed: eager from now on
            self.failed = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
            warnings.warn(f"compiled {self.what} unavailable, using the eager step ({self.failed})", stacklevel=3)
            return None
        self.calls += 1
        if self.first_seconds is None:
            self.first_seconds = time.perf_counter() - t0
            _report.setdefault(id(self.model), {})[f"{self.graph_fn}_s"] = self.first_seconds
            if self.graph_fn == "static_decode_step":
                _report[id(self.model)]["compile_s"] = self.first_seconds
            print(f"{self.label}: first call (compilation and warm-up) {self.first_seconds:.1f} s",
                  file=sys.stderr)
        return out


def _dynamic(t: torch.Tensor, dim: int) -> torch.Tensor:
    torch._dynamo.maybe_mark_dynamic(t, dim)
    return t


class CompiledStep(_Captured):
    """`model.decode_step(input_ids [B,1], cache)` through the compiled graph; falls back to the eager step
    (one warning line) when compiling or running the graph fails."""

    graph_fn, what, label, memo = "static_decode_step", "decoding", "compiled decode step", "_compiled_step"

    def applies(self, input_ids: torch.Tensor, cache: KVCache) -> bool:
        """Whether this step can take the call: one token per row on a latent cache covering only the main
        layers' slots it needs, few enough rows that gathering experts pays (B*K <= E), no gradients."""
        if self.failed is not None or cache.mode != "latent" or input_ids.shape[1] != 1 or torch.is_grad_enabled():
            return False
        cfg = self.model.config
        return cache.first_layer == 0 and input_ids.shape[0] * cfg.num_experts_per_tok <= max(cfg.n_routed_experts, 1)

    def __call__(self, input_ids: torch.Tensor, cache: KVCache, return_hidden: bool = False):
        """Logits [B,V] of one step (with return_hidden: (logits, final-normed hidden [B,1,D]), as
        `decode_step`), or None when the caller must run the eager step (nothing was committed)."""
        if not self.applies(input_ids, cache):
            return None
        n_layers = self.model.config.num_hidden_layers
        slots, positions, mask = cache.prepare(torch.ones_like(input_ids))
        hidden_mask = _dynamic(~mask, 3)
        k = [_dynamic(buf, 1) for buf in cache.k[:n_layers]]
        if input_ids.shape[0] > 1:  # one graph for every batch size > 1 (batch 1 keeps its own, specialised)
            for t in (input_ids, positions, slots, hidden_mask, *k):
                torch._dynamo.maybe_mark_dynamic(t, 0)
        out = self._run(input_ids, positions, slots, hidden_mask, k)
        if out is None:
            cache._pending = cache._start = None  # prepare() reserved nothing yet: no commit
            return None
        cache.commit()
        logits, hidden = out
        return (logits, hidden) if return_hidden else logits


class CompiledSpeculation(_Captured):
    """`SeekForCausalLM.static_speculate_step` through the compiled graph: the MTP drafts and the verification
    of one row in one call (`speculative.MTPDrafter.fused` prepares the inputs and keeps the caches)."""

    graph_fn, what, label, memo = ("static_speculate_step", "speculative decoding", "compiled speculative step",
                                   "_compiled_speculation")
    from_rows = 3  # the K+1 verified tokens (measured on the quickstart model, K=3: see docs/speed.md)

    def __init__(self, model) -> None:
        super().__init__(model)
        if self.failed is None and not len(getattr(model, "mtp", ())):
            self.failed = "the model has no MTP modules"

    def __call__(self, bonus_ids, h_pend, next_ids, last, mtp_positions, mtp_slots, mtp_hidden, k_mtp,
                 positions, slots, hidden_mask, k):
        """(drafts [1,K], logits [1,K+1,V], hidden [1,K+1,D]) or None (see `_Captured._run`); the argument
        shapes are `static_speculate_step`'s. The cache lengths (S, S_m) are dynamic dimensions."""
        return self._run(bonus_ids, h_pend, next_ids, last, mtp_positions, mtp_slots, _dynamic(mtp_hidden, 3),
                         [_dynamic(b, 1) for b in k_mtp], positions, slots, _dynamic(hidden_mask, 3),
                         [_dynamic(b, 1) for b in k])


def _made(model, cls, force: bool | None):
    """The model's `cls` instance (made once per model and class), or None when compiling is off (`force`,
    else the process default `set_compile`) or failed for this model."""
    on = _enabled if force is None else force
    if not on:
        return None
    with _lock:
        step = model.__dict__.get(cls.memo)
        if step is None:
            step = cls(model)
            model.__dict__[cls.memo] = step
            if step.failed is not None:
                warnings.warn(f"compiled {cls.what} unavailable, using the eager step ({step.failed})", stacklevel=3)
    return None if step.failed is not None else step


def compiled_step(model, force: bool | None = None) -> CompiledStep | None:
    """The model's CompiledStep (made once per model), or None when compiling is off (`force`, else the
    process default `set_compile`) or failed for this model."""
    return _made(model, CompiledStep, force)


def compiled_speculation(model, force: bool | None = None) -> CompiledSpeculation | None:
    """The model's CompiledSpeculation (as `compiled_step`)."""
    return _made(model, CompiledSpeculation, force)


def compile_report(model) -> dict | None:
    """{"compile_s": seconds of the first compiled decoding step, "<graph fn>_s": of each graph's first call}
    once a compiled graph of the model has run, else None."""
    return _report.get(id(model))

"""Preallocated KV cache for Multi-head Latent Attention.

Two layouts, one interface:
  * ``latent`` ("absorb"): per token and layer only the normalised latent c_kv and the rotated shared
    rope key, ``kv_lora_rank + qk_rope_head_dim`` numbers, as DeepSeek-V2/V3 serve.
  * ``naive``: per-head keys and values, ``H * (qk_head_dim + v_head_dim)`` numbers, for comparison.

Rows are independent sequences. Each row has its own write pointer (``lengths``), so rows of different
lengths share one batch (batched prompts, continuous batching); slots that hold padding are marked
invalid and never attended to. Nothing is reallocated per step: writes go into preallocated storage.
`rows(start, end)` is a view of a row range that shares the storage (a continuous-batching engine
prefills new rows and decodes the running ones through views); `move_row` compacts rows.

A cache covers the layers `first_layer .. first_layer + num_layers - 1` (by default the main layers and
the MTP layers); speculative decoding gives each MTP depth its own one-layer cache, because an MTP
module's cache trails the main model's by the tokens it has not seen yet.
"""

from __future__ import annotations

import torch

CACHE_MODES = ("latent", "naive")


class KVCache:
    """Cache for `num_layers` attention layers, `batch_size` rows, up to `max_length` slots per row."""

    def __init__(self, config, batch_size: int, max_length: int, mode: str = "latent",
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 num_layers: int | None = None, first_layer: int = 0) -> None:
        if mode not in CACHE_MODES:
            raise ValueError(f"cache mode must be one of {CACHE_MODES}, got {mode!r}")
        self.mode = mode
        self.config = config
        self.max_length = max_length
        self.first_layer = first_layer
        n_layers = num_layers if num_layers is not None else config.num_hidden_layers + config.num_nextn_predict_layers
        h = config.num_attention_heads
        if mode == "latent":
            width = config.kv_lora_rank + config.qk_rope_head_dim
            self.k = [torch.zeros(batch_size, max_length, width, dtype=dtype, device=device) for _ in range(n_layers)]
            self.v: list[torch.Tensor] | None = None
        else:
            self.k = [torch.zeros(batch_size, max_length, h, config.qk_head_dim, dtype=dtype, device=device)
                      for _ in range(n_layers)]
            self.v = [torch.zeros(batch_size, max_length, h, config.v_head_dim, dtype=dtype, device=device)
                      for _ in range(n_layers)]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # slots written per row
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)  # real tokens per row
        self.valid = torch.zeros(batch_size, max_length, dtype=torch.bool, device=device)
        self._pending = None
        self._start: int | None = None

    # ------------------------------------------------------------------ bookkeeping
    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    def bytes_per_token(self) -> int:
        """Bytes one cached token costs across all layers."""
        per = sum(t[0, 0].numel() * t.element_size() for t in self.k)
        if self.v is not None:
            per += sum(t[0, 0].numel() * t.element_size() for t in self.v)
        return per

    def prepare(self, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reserve slots for T new tokens per row; returns (slots [B,T], positions [B,T], mask [B,1,T,S]).

        `attention_mask` [B, T] marks real (1) and padding (0) new tokens. The returned boolean mask lets
        a query see every valid slot up to its own; a padding query sees only itself (no NaN rows).
        The common decoding case (no padding, every row at the same length) takes a shortcut of a few ops.
        """
        b, t = attention_mask.shape
        lo, hi = int(self.lengths.min()), int(self.lengths.max())
        s = hi + t
        if s > self.max_length:
            raise ValueError(f"KV cache is full: {s} > max_length {self.max_length}")
        ar = torch.arange(t, device=self.lengths.device)
        all_real = bool(attention_mask.all())
        self._start = lo if lo == hi else None  # every row writes slots [lo, lo+T): a plain slice
        self._pending = (t, None if all_real else attention_mask.to(torch.bool))
        if all_real:
            positions = self.next_position[:, None] + ar
            if lo == hi:
                self.valid[:, lo:s] = True
                slots = (lo + ar).expand(b, t)
                if t == 1:
                    return slots, positions, self.valid[:, None, None, :s]
                causal = ar[:, None] + lo >= torch.arange(s, device=ar.device)  # [T,S]
                return slots, positions, (self.valid[:, None, :s] & causal)[:, None]
        mask = attention_mask.to(torch.bool)
        slots = self.lengths[:, None] + ar  # [B, T]
        if not all_real:
            positions = (self.next_position[:, None] + mask.long().cumsum(1) - 1).clamp_min(0)
        self.valid.scatter_(1, slots, mask)
        key_idx = torch.arange(s, device=mask.device)
        visible = (key_idx[None, None, :] <= slots[:, :, None]) & self.valid[:, None, :s]
        visible |= key_idx[None, None, :] == slots[:, :, None]
        return slots, positions, visible[:, None]

    def commit(self) -> None:
        """Advance the write pointers after every layer has written its T new tokens."""
        t, mask = self._pending
        self.lengths += t
        self.next_position += t if mask is None else mask.long().sum(1)
        self._pending = self._start = None

    def rollback(self, n: torch.Tensor | int) -> None:
        """Forget the last `n` slots of each row (rejected speculative tokens); n is an int, or per row a [B]
        tensor or a list of B ints."""
        if isinstance(n, int):
            ks = [n] * self.batch_size
        elif isinstance(n, (list, tuple)):
            ks = list(n)
        else:
            ks = torch.as_tensor(n, device=self.lengths.device).expand_as(self.lengths).tolist()
        for b, k in enumerate(ks):
            if k <= 0:
                continue
            end = int(self.lengths[b])
            start = max(0, end - k)
            self.next_position[b] -= int(self.valid[b, start:end].sum())
            self.valid[b, start:end] = False
            self.lengths[b] = start

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` [B'] in that order (beam search reordering; dropping finished rows).

        With B' == B the rows are permuted in place (only the used slots are copied); otherwise the
        storage is rebuilt with B' rows.
        """
        if index.numel() == self.batch_size:
            s = int(self.lengths.max())
            for t in self.k + (self.v or []):
                t[:, :s] = t[:, :s].index_select(0, index)
            for t in (self.lengths, self.next_position, self.valid):
                t.copy_(t.index_select(0, index))
            return
        self.k = [t.index_select(0, index) for t in self.k]
        if self.v is not None:
            self.v = [t.index_select(0, index) for t in self.v]
        self.lengths = self.lengths.index_select(0, index)
        self.next_position = self.next_position.index_select(0, index)
        self.valid = self.valid.index_select(0, index)

    def reset_rows(self, rows: list[int]) -> None:
        """Empty the given rows so new sequences can use them (continuous batching)."""
        for r in rows:
            self.lengths[r] = 0
            self.next_position[r] = 0
            self.valid[r] = False

    def move_row(self, src: int, dst: int) -> None:
        """Copy row `src` (its used slots and pointers) into row `dst`; `src` is left as is."""
        n = int(self.lengths[src])
        for t in self.k + (self.v or []):
            t[dst, :n] = t[src, :n]
        self.lengths[dst] = self.lengths[src]
        self.next_position[dst] = self.next_position[src]
        self.valid[dst] = self.valid[src]

    def rows(self, start: int, end: int) -> KVCache:
        """A view of rows [start, end) sharing this cache's storage (writes and pointer moves go through)."""
        view = object.__new__(KVCache)
        view.__dict__.update(self.__dict__)
        view.k = [t[start:end] for t in self.k]
        view.v = [t[start:end] for t in self.v] if self.v is not None else None
        view.lengths = self.lengths[start:end]
        view.next_position = self.next_position[start:end]
        view.valid = self.valid[start:end]
        view._pending = view._start = None
        return view

    # ------------------------------------------------------------------ per-layer storage
    def write(self, layer: int, slots: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor | None = None) -> None:
        """Store new entries [B, T, ...] at `slots` [B, T] of `layer`."""
        i = layer - self.first_layer
        b, t = slots.shape
        s0 = getattr(self, "_start", None)
        if s0 is not None:  # all rows write the same slots (set by prepare): a slice, no scatter
            self.k[i][:, s0:s0 + t] = k_new.to(self.k[i].dtype)
            if v_new is not None and self.v is not None:
                self.v[i][:, s0:s0 + t] = v_new.to(self.v[i].dtype)
            return
        rows = torch.arange(b, device=slots.device)[:, None].expand(b, t)
        self.k[i][rows, slots] = k_new.to(self.k[i].dtype)
        if v_new is not None and self.v is not None:
            self.v[i][rows, slots] = v_new.to(self.v[i].dtype)

    def read(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The first `length` slots of `layer`: latent [B,S,R+P] (and None), or k [B,S,H,Dqk], v [B,S,H,Dv]."""
        i = layer - self.first_layer
        k = self.k[i][:, :length]
        v = self.v[i][:, :length] if self.v is not None else None
        return k, v

"""Preallocated KV cache for Multi-head Latent Attention.

Two layouts, one interface:
  * ``latent`` ("absorb"): per token and layer only the normalised latent c_kv and the rotated shared
    rope key, ``kv_lora_rank + qk_rope_head_dim`` numbers, as DeepSeek-V2/V3 serve.
  * ``naive``: per-head keys and values, ``H * (qk_head_dim + v_head_dim)`` numbers, for comparison.

Rows are independent sequences. Each row has its own write pointer (``lengths``), so rows of different
lengths share one batch (batched prompts, continuous batching); slots that hold padding are marked
invalid and never attended to. Nothing is reallocated per step: writes go into preallocated storage.
"""

from __future__ import annotations

import torch

CACHE_MODES = ("latent", "naive")


class KVCache:
    """Cache for `num_layers` attention layers, `batch_size` rows, up to `max_length` slots per row."""

    def __init__(self, config, batch_size: int, max_length: int, mode: str = "latent",
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 num_layers: int | None = None) -> None:
        if mode not in CACHE_MODES:
            raise ValueError(f"cache mode must be one of {CACHE_MODES}, got {mode!r}")
        self.mode = mode
        self.config = config
        self.max_length = max_length
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
        """
        b, t = attention_mask.shape
        mask = attention_mask.to(torch.bool)
        ar = torch.arange(t, device=mask.device)
        slots = self.lengths[:, None] + ar  # [B, T]
        if int(slots.max()) >= self.max_length:
            raise ValueError(f"KV cache is full: {int(slots.max()) + 1} > max_length {self.max_length}")
        positions = self.next_position[:, None] + mask.long().cumsum(1) - 1
        positions = positions.clamp_min(0)
        rows = torch.arange(b, device=mask.device)[:, None].expand(b, t)
        self.valid[rows, slots] = mask
        s = int(self.lengths.max()) + t
        key_idx = torch.arange(s, device=mask.device)
        visible = (key_idx[None, None, :] <= slots[:, :, None]) & self.valid[:, None, :s]
        visible |= key_idx[None, None, :] == slots[:, :, None]
        self._pending = (slots, mask)
        return slots, positions, visible[:, None]

    def commit(self) -> None:
        """Advance the write pointers after every layer has written its T new tokens."""
        slots, mask = self._pending
        self.lengths += slots.shape[1]
        self.next_position += mask.long().sum(1)
        self._pending = None

    def rollback(self, n: torch.Tensor | int) -> None:
        """Forget the last `n` slots of each row (rejected speculative tokens); n is an int or a [B] tensor."""
        n_t = torch.as_tensor(n, device=self.lengths.device).expand_as(self.lengths)
        for b in range(self.batch_size):
            k = int(n_t[b])
            if k <= 0:
                continue
            end = int(self.lengths[b])
            start = end - k
            self.next_position[b] -= int(self.valid[b, start:end].sum())
            self.valid[b, start:end] = False
            self.lengths[b] = start

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (beam search reordering, dropping finished rows)."""
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

    # ------------------------------------------------------------------ per-layer storage
    def write(self, layer: int, slots: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor | None = None) -> None:
        """Store new entries [B, T, ...] at `slots` [B, T] of `layer`."""
        b, t = slots.shape
        rows = torch.arange(b, device=slots.device)[:, None].expand(b, t)
        self.k[layer][rows, slots] = k_new.to(self.k[layer].dtype)
        if v_new is not None and self.v is not None:
            self.v[layer][rows, slots] = v_new.to(self.v[layer].dtype)

    def read(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The first `length` slots of `layer`: latent [B,S,R+P] (and None), or k [B,S,H,Dqk], v [B,S,H,Dv]."""
        k = self.k[layer][:, :length]
        v = self.v[layer][:, :length] if self.v is not None else None
        return k, v

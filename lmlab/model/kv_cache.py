"""A preallocated key/value cache for incremental decoding, with StreamingLLM attention sinks.

Plain mode: slot i holds the key/value of the i-th token fed (prompt then generated), keys already
rotated by their true position. Streaming mode (config.sink_tokens > 0, Xiao et al. 2023, "Efficient
Streaming Language Models with Attention Sinks"): the cache holds at most sink_tokens + window slots;
when it is full the oldest non-sink slots are dropped, and keys are stored *un-rotated* so that RoPE can
use slot indices as positions. Relative distances then never exceed what the model was trained on, which
is what lets generation run past the trained context.

Left-padded batches: `key_mask` marks real tokens; `next_pos` counts each row's real tokens so position
ids start at 0 at each row's first real token.
"""

from __future__ import annotations

import torch

from lmlab.model.config import ModelConfig


class KVCache:
    """Keys and values of every layer: (n_layers, B, n_kv_heads, capacity, head_dim)."""

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        capacity: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.streaming = config.sink_tokens > 0
        self.sinks = config.sink_tokens
        if self.streaming:
            capacity = min(capacity, config.sink_tokens + config.window)
        self.capacity = capacity
        shape = (config.n_layers, batch_size, config.n_kv_heads, capacity, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.key_mask = torch.ones(batch_size, capacity, dtype=torch.bool, device=device)
        self.slot_pos = torch.zeros(batch_size, capacity, dtype=torch.long, device=device)
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = 0  # filled slots
        self.has_padding = False

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def begin(self, mask: torch.Tensor) -> tuple[int, torch.Tensor]:
        """Reserve slots for T new tokens (mask: (B, T) bool, True = real token).

        Returns the first slot and the new tokens' position ids (B, T). In streaming mode the oldest
        non-sink slots are evicted first when the new tokens would not fit.
        """
        T = mask.shape[1]
        if self.length + T > self.capacity:
            if not self.streaming or T > self.capacity - self.sinks:
                raise ValueError(
                    f"KV cache full: {self.length} + {T} tokens > capacity {self.capacity}"
                )
            self._evict(self.length + T - self.capacity)
        start = self.length
        positions = (self.next_pos[:, None] + mask.long().cumsum(1) - 1).clamp_min(0)
        self.key_mask[:, start : start + T] = mask
        self.slot_pos[:, start : start + T] = positions
        self.next_pos += mask.long().sum(1)
        self.has_padding = self.has_padding or not bool(mask.all())
        self.length = start + T
        return start, positions

    def advance(self) -> tuple[int, torch.Tensor]:
        """begin() for one real token per row, the decoding step, in three tensor calls instead of ~15:
        the slot's key_mask is already True. Returns the slot and the positions (B,)."""
        if self.streaming or self.length >= self.capacity:  # eviction, or begin's cache-full error
            start, positions = self.begin(torch.ones(self.batch_size, 1, dtype=torch.bool, device=self.k.device))
            return start, positions[:, 0]
        start, positions = self.length, self.next_pos.clone()
        self.slot_pos[:, start] = positions
        self.next_pos += 1
        self.length = start + 1
        return start, positions

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, Hkv, T, D) at `start` and return this layer's filled keys/values."""
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def _evict(self, n_drop: int) -> None:
        """Drop the n_drop oldest slots after the sinks, shifting the rest down."""
        s, L = self.sinks, self.length
        keep = slice(s + n_drop, L)
        dest = slice(s, L - n_drop)
        self.k[:, :, :, dest] = self.k[:, :, :, keep].clone()
        self.v[:, :, :, dest] = self.v[:, :, :, keep].clone()
        self.key_mask[:, dest] = self.key_mask[:, keep].clone()
        self.slot_pos[:, dest] = self.slot_pos[:, keep].clone()
        self.length = L - n_drop

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` of the batch (e.g. after some sequences finished)."""
        self.k = self.k[:, index]
        self.v = self.v[:, index]
        self.key_mask = self.key_mask[index]
        self.slot_pos = self.slot_pos[index]
        self.next_pos = self.next_pos[index]

"""A preallocated key/value cache for incremental decoding, with StreamingLLM attention sinks.

Plain mode: slot i holds the key/value of the i-th token fed (prompt then generated), keys already
rotated by their true position. Streaming mode (config.sink_tokens > 0, Xiao et al. 2023, "Efficient
Streaming Language Models with Attention Sinks"): the cache holds at most sink_tokens + window slots;
when it is full the oldest non-sink slots are dropped, and keys are stored *un-rotated* so that RoPE can
use slot indices as positions. Relative distances then never exceed what the model was trained on, which
is what lets generation run past the trained context.

Left-padded batches: `key_mask` marks real tokens; `next_pos` counts each row's real tokens so position
ids start at 0 at each row's first real token.

Rows as slots (continuous batching, lmlab/serve/engine.py; speculative decoding, lmlab/generation/
speculative.py): a forward over B rows uses the cache's first B rows, so a server keeps its live sequences in
rows 0..B-1 and the rest free. `attach` copies a separately prefilled sequence into a row, right-aligned to the
shared fill `length` like every other row; `move_row` fills the gap a finished sequence leaves; `discard`
turns rejected draft tokens into masked holes. `k`, `v`, `key_mask`, `slot_pos` are views into one storage:
dropping the empty leading slots (`drop_front`) only moves the views, and the live slots are copied back to
the start of the storage only when the view runs out of room (`make_room`).
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
        self._storage = (self.k, self.v, self.key_mask, self.slot_pos)  # the views start at _offset
        self._offset = 0

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def begin(self, mask: torch.Tensor) -> tuple[int, torch.Tensor]:
        """Reserve slots for T new tokens (mask: (B, T) bool, True = real token).

        Returns the first slot and the new tokens' position ids (B, T). In streaming mode the oldest
        non-sink slots are evicted first when the new tokens would not fit.
        """
        B, T = mask.shape  # B may be fewer rows than the cache holds: the first B
        if self.length + T > self.capacity:
            if not self.streaming or T > self.capacity - self.sinks:
                raise ValueError(
                    f"KV cache full: {self.length} + {T} tokens > capacity {self.capacity}"
                )
            self._evict(self.length + T - self.capacity)
        start = self.length
        positions = (self.next_pos[:B, None] + mask.long().cumsum(1) - 1).clamp_min(0)
        self.key_mask[:B, start : start + T] = mask
        self.slot_pos[:B, start : start + T] = positions
        self.next_pos[:B] += mask.long().sum(1)
        self.has_padding = self.has_padding or not bool(mask.all())
        self.length = start + T
        return start, positions

    def advance(self, rows: int | None = None) -> tuple[int, torch.Tensor]:
        """begin() for one real token in each of the first `rows` rows (all by default), the decoding step,
        in four tensor calls instead of ~15. Returns the slot and the positions (rows,)."""
        B = self.batch_size if rows is None else rows
        if self.streaming or self.length >= self.capacity:  # eviction, or begin's cache-full error
            start, positions = self.begin(torch.ones(B, 1, dtype=torch.bool, device=self.k.device))
            return start, positions[:, 0]
        start, positions = self.length, self.next_pos[:B].clone()
        self.key_mask[:B, start] = True  # a discarded draft may have left a hole in this slot
        self.slot_pos[:B, start] = positions
        self.next_pos[:B] += 1
        self.length = start + 1
        return start, positions

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, Hkv, T, D) at `start` into the first B rows; return their filled keys/values."""
        B, end = k.shape[0], start + k.shape[2]
        self.k[layer, :B, :, start:end] = k
        self.v[layer, :B, :, start:end] = v
        return self.k[layer, :B, :, :end], self.v[layer, :B, :, :end]

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
        self._storage, self._offset = (self.k, self.v, self.key_mask, self.slot_pos), 0

    # ---- rows as slots: sequences join and leave between steps (see the module docstring)

    def _plain(self, what: str) -> None:
        if self.streaming:
            raise ValueError(f"KVCache.{what}: rows as slots need a plain cache, not attention sinks")

    def _view(self, offset: int, length: int) -> None:
        k, v, key_mask, slot_pos = self._storage
        self.k, self.v = k[:, :, :, offset:], v[:, :, :, offset:]
        self.key_mask, self.slot_pos = key_mask[:, offset:], slot_pos[:, offset:]
        self._offset, self.length, self.capacity = offset, length, k.shape[3] - offset

    def drop_front(self, rows: int) -> None:
        """Drop the leading slots that none of the first `rows` rows uses (no copy: the views move)."""
        used = self.key_mask[:rows, : self.length].any(0)
        first = int(used.int().argmax()) if bool(used.any()) else self.length
        if first:
            self._view(self._offset + first, self.length - first)

    def make_room(self, n: int, rows: int, front: int = 0) -> None:
        """Make `n` more slots fit after `length`, and `front` empty slots before slot 0, in the first `rows`
        rows (after `drop_front`: the caller drops first when `front` depends on `length`). Moving the views
        costs nothing; only when they lack the room are the live slots repacked (`compact`) at the start of
        the storage."""
        self._plain("make_room")
        self.drop_front(rows)
        if front <= self._offset and self.length + n <= self.capacity:
            if front:
                self._view(self._offset - front, self.length + front)
                self.key_mask[:rows, :front] = False
            return
        self.compact(rows, front)
        if self.length + n > self.capacity:
            raise ValueError(f"KV cache full: {self.length} + {n} slots > capacity {self.capacity}")

    def attach(self, row: int, other: KVCache, other_row: int, rows: int) -> None:
        """Copy sequence `other_row` of `other` (e.g. a prefill batch) into `row`, right-aligned so its next
        token takes slot `length` as every row's does; `rows` = rows in use besides it (kept aligned)."""
        self._plain("attach")
        n = other.length
        self.drop_front(rows)
        if n > self.length:
            self.make_room(0, rows, front=n - self.length)
        a = self.length - n
        self.key_mask[row, :a] = False
        self.k[:, row, :, a : self.length] = other.k[:, other_row, :, :n]
        self.v[:, row, :, a : self.length] = other.v[:, other_row, :, :n]
        self.key_mask[row, a : self.length] = other.key_mask[other_row, :n]
        self.slot_pos[row, a : self.length] = other.slot_pos[other_row, :n]
        self.next_pos[row] = other.next_pos[other_row]
        self.has_padding = self.has_padding or a > 0 or other.has_padding

    def move_row(self, src: int, dst: int) -> None:
        """Copy row `src` into row `dst` (a finished sequence's row is taken by the last live one)."""
        L = self.length
        self.k[:, dst, :, :L] = self.k[:, src, :, :L]
        self.v[:, dst, :, :L] = self.v[:, src, :, :L]
        self.key_mask[dst, :L] = self.key_mask[src, :L]
        self.slot_pos[dst, :L] = self.slot_pos[src, :L]
        self.next_pos[dst] = self.next_pos[src]

    def discard(self, keep: torch.Tensor, T: int) -> None:
        """Of the last T slots, row r keeps its first keep[r] (B = len(keep) rows): the rest (rejected draft
        tokens) become masked holes, and trailing slots no row keeps are freed."""
        self._plain("discard")
        B, L = keep.shape[0], self.length
        drop = torch.arange(T, device=keep.device)[None] >= keep[:, None]  # (B, T)
        recent = self.key_mask[:B, L - T : L]
        self.next_pos[:B] -= (recent & drop).sum(1)
        recent &= ~drop
        used = recent.any(0)
        self.length = L - T + (int(used.nonzero().max()) + 1 if bool(used.any()) else 0)
        self.has_padding = self.has_padding or not bool(self.key_mask[:B, : self.length].all())

    def compact(self, rows: int, front: int = 0) -> None:
        """Squeeze out padding and holes: each of the first `rows` rows' real slots right-aligned, in order,
        after `front` empty slots at the start of the storage; `length` becomes front + the longest row's
        count. One copy of the live slots."""
        self._plain("compact")
        L = self.length
        mask = self.key_mask[:rows, :L]
        n = int(mask.sum(1).max()) if rows else 0
        if front + n > self._storage[0].shape[3]:
            raise ValueError(f"KV cache full: {front} + {n} slots > capacity {self._storage[0].shape[3]}")
        order = torch.sort(mask.int(), dim=1, stable=True).indices[:, L - n :]  # (rows, n): real slots last
        idx = order[None, :, None, :, None].expand(self.k.shape[0], rows, self.k.shape[2], n, self.k.shape[4])
        k, v = self.k[:, :rows, :, :L].gather(3, idx), self.v[:, :rows, :, :L].gather(3, idx)
        key_mask, slot_pos = mask.gather(1, order), self.slot_pos[:rows, :L].gather(1, order)
        self._view(0, front + n)
        live = slice(front, front + n)
        self.k[:, :rows, :, live], self.v[:, :rows, :, live] = k, v
        self.key_mask[:rows, :front] = False
        self.key_mask[:rows, live], self.slot_pos[:rows, live] = key_mask, slot_pos

"""Each batch row's exact document tokens, on a model with sliding-window layers.

On such a model the sink tokens cannot sit in the shared local cache, as they do for SmolLM2: a sliding
layer must not see them, and it must see its own window's tail of the document instead. So the exact
tokens ride with each row, as `bound(..., sinks=)` binds them for one request: `prepend` puts each
row's sinks in front of its local keys in a global layer, and `tail` attends each row to the last
tokens of its own document in a sliding layer, masked by position as `WindowTail` masks one row.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from ..providers.attention import ExactContext
from ..providers.kernels import exact_attention


class RowSinks:
    """The `sinks` of a batch whose row i reads the exact tokens `rows[i]` (set with `select`)."""

    def __init__(self, windows: list[int | None]):
        self.windows = windows
        self.rows: list[ExactContext] = []
        self._stacks: dict[int, tuple[Tensor, Tensor, Tensor | None]] = {}
        self.ends = torch.zeros(0, dtype=torch.long)  # [b]: each row's document length

    def select(self, rows: Sequence[ExactContext]) -> None:
        rows = list(rows)
        if [id(r) for r in rows] != [id(r) for r in self.rows]:
            self._stacks.clear()
            self.ends = torch.tensor([r.end for r in rows])  # made when the batch changes, not every step
        self.rows = rows

    def slides(self, layer: int) -> bool:
        return self.windows[layer] is not None

    def tail(self, layer: int) -> "RowTails":
        return RowTails(self, layer)

    def prepend(self, layer: int, key: Tensor, value: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Each row's sink tokens in front of its local keys [b, Hkv, s, d], as `ExactContext.prepend` does for one."""
        keys, values, bias = self.stacked(layer)
        if keys.shape[-2] == 0:
            return key, value, mask
        key, value = torch.cat([keys.to(key.dtype), key], dim=2), torch.cat([values.to(value.dtype), value], dim=2)
        if mask is not None:
            mask = F.pad(mask, (keys.shape[-2], 0))  # 0: every local query sees them
        if bias is not None:  # rows keep unequal numbers: the missing ones are masked, per row
            bias = F.pad(bias, (0, value.shape[2] - keys.shape[2]))[:, None, None, :].to(key.dtype)
            mask = bias if mask is None else mask + bias
        return key, value, mask

    def stacked(self, layer: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """The rows' tokens of `layer` stacked [b, Hkv, t, d], left-padded to the longest, and a bias [b, t]
        that is -inf on the padding (None when every row keeps as many)."""
        if layer not in self._stacks:
            keys, values = zip(*(self._tokens(row, layer) for row in self.rows))
            t = max(k.shape[-2] for k in keys)
            bias = None
            if any(k.shape[-2] != t for k in keys):
                bias = torch.stack([F.pad(torch.zeros(k.shape[-2], device=k.device), (t - k.shape[-2], 0),
                                          value=float("-inf")) for k in keys])
            pad = [(0, 0, t - k.shape[-2], 0) for k in keys]
            self._stacks[layer] = (torch.stack([F.pad(k, p) for k, p in zip(keys, pad)]),
                                   torch.stack([F.pad(v, p) for v, p in zip(values, pad)]), bias)
        return self._stacks[layer]

    def _tokens(self, row: ExactContext, layer: int) -> tuple[Tensor, Tensor]:
        """A row's exact tokens in `layer`: its window's tail on a sliding layer, its sinks on a global one."""
        part = row.tail(layer) if self.slides(layer) else None
        bias = part.bias if part is not None else row.layer_bias(layer)
        if bias is not None:
            raise ValueError("exact tokens with a per-head bias are served beside the modules, not as sinks")
        return (part.keys, part.values) if part is not None else (row.keys[layer], row.values[layer])


class RowTails:
    """A sliding layer's document part for a batch: row i attends to the last tokens of its own document,
    key j at position end_i - t + j seen by a query at position p when p - (end_i - t + j) < window."""

    def __init__(self, sinks: RowSinks, layer: int):
        self.sinks, self.layer, self.window = sinks, layer, sinks.windows[layer]

    def __call__(self, q: Tensor, scaling: float, positions: Tensor) -> tuple[Tensor, Tensor]:
        """q [b, kv_heads, groups * L, d] (grouped as in `nectar_attention`), positions [b, L]."""
        keys, values, bias = self.sinks.stacked(self.layer)
        b, h, rows, d = q.shape
        t = keys.shape[-2]
        if t == 0:
            return q.new_zeros(q.shape, dtype=torch.float32), q.new_full(q.shape[:-1], float("-inf"), dtype=torch.float32)
        groups = rows // positions.shape[-1]
        query_pos = positions.to(q.device).expand(b, -1).unsqueeze(1).expand(b, groups, -1).reshape(b, rows)
        key_pos = self.sinks.ends.to(q.device)[:, None] - t + torch.arange(t, device=q.device)
        seen = query_pos[:, :, None] - key_pos[:, None, :] < self.window  # [b, rows, t]
        if bias is not None:
            seen = seen & torch.isfinite(bias.to(q.device))[:, None, :]
        mask = torch.zeros(seen.shape, device=q.device).masked_fill_(~seen, float("-inf"))[:, None]
        o, lse = exact_attention(q, keys.to(q.dtype), values.to(q.dtype), scaling, mask)
        # A query past the window sees no key; the kernels return lse 0 for such a row, not -inf.
        blind = ~seen.any(-1)[:, None]
        return o.masked_fill(blind.unsqueeze(-1), 0.0), lse.masked_fill(blind, float("-inf"))

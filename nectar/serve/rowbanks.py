"""Several compiled documents in one decode batch: each row reads its own document's modules.

A serving batch mixes questions about different documents. Rather than one module call per document
in the batch, the rows' weights are gathered into one stack, [rows * kv_heads, fan_in, fan_out], and
the whole batch runs in the same depth + 1 batched matmuls a single document's step costs. The gather
is redone only when the batch's make-up changes (a row joins or leaves), not at every step.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..providers.fused import FusedBank, FusedLayer
from ..providers.modules import slot


class RowBanks:
    """A context provider whose batch row i is served by `providers[i]` (set with `select`)."""

    graphable = False  # the stack changes with the batch; captured graphs would hold stale weights

    def __init__(self):
        self.providers: list = []
        self._stacks: dict[int, list[tuple[Tensor, FusedLayer]]] = {}

    def select(self, providers: Sequence) -> None:
        """The provider of each batch row, in row order."""
        providers = list(providers)
        if [id(p) for p in providers] != [id(p) for p in self.providers]:
            self._stacks.clear()
        self.providers = providers

    def __call__(self, layer: int, q: Tensor, scaling: float = 1.0) -> tuple[Tensor, Tensor]:
        b, h, m, d = q.shape
        if b != len(self.providers):
            raise ValueError(f"a batch of {b} rows, but {len(self.providers)} providers were selected")
        first = self.providers[0]
        if all(p is first for p in self.providers):
            return first(layer, q, scaling)  # one document: exactly its own call
        stacks = self._stacked(layer)
        if len(stacks) == 1 and len(stacks[0][0]) == b:  # one shape for all rows: no scatter
            o, lse = stacks[0][1](q.reshape(b * h, m, d))
            return o.view(b, h, m, d), lse.view(b, h, m)
        o = q.new_empty(b, h, m, d, dtype=torch.float32)
        lse = q.new_empty(b, h, m, dtype=torch.float32)
        for rows, stack in stacks:
            o_g, lse_g = stack(q[rows].reshape(len(rows) * h, m, d))
            o[rows], lse[rows] = o_g.view(len(rows), h, m, d), lse_g.view(len(rows), h, m)
        for row, provider in enumerate(self.providers):
            if not isinstance(provider, FusedBank):
                o[row:row + 1], lse[row:row + 1] = provider(layer, q[row:row + 1], scaling)
        return o, lse

    def _stacked(self, layer: int) -> list[tuple[Tensor, FusedLayer]]:
        """Rows grouped by their weights' shapes (documents of one length and config share them), each
        group's weights stacked in row order."""
        if layer not in self._stacks:
            groups: dict[tuple, list[int]] = {}
            for row, p in enumerate(self.providers):
                if isinstance(p, FusedBank):
                    groups.setdefault(p.layers[slot(p, layer)].shape(), []).append(row)
            stacks = []
            for rows in groups.values():
                stack = FusedLayer.cat([self.providers[r].layers[slot(self.providers[r], layer)] for r in rows])
                stacks.append((torch.tensor(rows, device=stack.biases[0].device), stack))
            self._stacks[layer] = stacks
        return self._stacks[layer]

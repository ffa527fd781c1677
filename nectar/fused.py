"""The inference form of a module bank: the same function as an MLPBank in fewer, larger ops."""
from __future__ import annotations

import torch
from torch import Tensor

from .graphs import forget
from .modules import MLPBank, gelu, slot


class FusedBank:
    """The inference form of an MLPBank, numerically the same function with fewer, larger ops.

    Input standardisation and output scaling are folded into the first and last weights, the target
    and score networks of a module run as one block-diagonal MLP (the score skip rides along as one
    extra output of the first layer), and each layer's weights are split off once, up front, so a
    decode step costs depth + 1 batched matmuls and depth GELUs per layer.
    """

    graphable = True  # on a GPU its decode step runs as a CUDA graph (nectar.graphs)

    def __init__(self, bank: MLPBank, dtype: torch.dtype = torch.float32):
        self.head_dim, self.kv_heads, self.model_layers = bank.head_dim, bank.kv_heads, bank.model_layers
        self.weights: list[list[Tensor]] = []
        self.biases: list[list[Tensor]] = []
        with torch.no_grad():
            for layer in range(bank.layers):
                w, b = _fuse_layer(bank, layer)
                # GELU runs over the whole first output, skip column included (a strided slice costs
                # ~40% more); a zero input row in the next weight drops that column again.
                w[1] = torch.cat([w[1], w[1].new_zeros(w[1].shape[0], 1, w[1].shape[2])], 1)
                self.weights.append([t.to(dtype).contiguous() for t in w])
                self.biases.append([t.to(dtype).contiguous() for t in b])

    def to(self, device: torch.device | str) -> "FusedBank":
        """Move the weights (in place); any CUDA graphs captured with the old ones are dropped."""
        forget(self)
        self.weights = [[t.to(device) for t in layer] for layer in self.weights]
        self.biases = [[t.to(device) for t in layer] for layer in self.biases]
        return self

    def __call__(self, layer: int, q: Tensor, scaling: float = 1.0) -> tuple[Tensor, Tensor]:
        b, h, m, d = q.shape
        # Batch 1 (the common decode) needs no transposes: each view or cast here costs a microsecond.
        x = q[0] if b == 1 else q.transpose(0, 1).reshape(h, b * m, d)
        index = slot(self, layer)
        o, lse = fused_mlp(self.weights[index], self.biases[index], x)
        if b == 1:
            return o[None], lse[None]
        return o.view(h, b, m, d).transpose(0, 1), lse.view(h, b, m).transpose(0, 1)


def fused_mlp(weights: list[Tensor], biases: list[Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """A FusedBank layer's computation on x [modules, N, d] -> (o [modules, N, d], lse [modules, N]), fp32."""
    d = x.shape[-1]
    z = torch.baddbmm(biases[0], x.to(weights[0].dtype), weights[0])
    skip, x = z[..., -1], gelu(z)
    for w, bias in zip(weights[1:-1], biases[1:-1]):
        x = gelu(torch.baddbmm(bias, x, w))
    out = torch.baddbmm(biases[-1], x, weights[-1])
    if out.dtype != torch.float32:
        out, skip = out.float(), skip.float()
    return out[..., :d], out[..., d] + skip


def _block_diag(a: Tensor, b: Tensor) -> Tensor:
    """Per-module block-diagonal [M, a_in + b_in, a_out + b_out] from [M, a_in, a_out] and [M, b_in, b_out]."""
    out = a.new_zeros(a.shape[0], a.shape[1] + b.shape[1], a.shape[2] + b.shape[2])
    out[:, : a.shape[1], : a.shape[2]] = a
    out[:, a.shape[1]:, a.shape[2]:] = b
    return out


def _fuse_layer(bank: MLPBank, layer: int) -> tuple[list[Tensor], list[Tensor]]:
    rows = bank.rows(layer)
    (target_w, target_b), (score_w, score_b) = bank.layer_weights(layer)
    mean, std = bank.in_mean[rows], bank.in_std[rows]  # [kv, 1, d]
    lse_scale = bank.lse_scale[rows].unsqueeze(-1)  # [kv, 1, 1]

    def standardised_input(w: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
        # ((q - mean) / std) @ w + bias == q @ (w / std^T) + (bias - (mean / std) @ w)
        return w / std.transpose(1, 2), bias - (mean / std) @ w

    wt, bt = standardised_input(target_w[0], target_b[0])
    ws, bs = standardised_input(score_w[0], score_b[0])
    wk, bk = standardised_input(bank.score_skip[rows] * lse_scale, torch.zeros_like(lse_scale))
    weights, biases = [torch.cat([wt, ws, wk], -1)], [torch.cat([bt, bs, bk], -1)]
    for i in range(1, len(target_w) - 1):
        weights.append(_block_diag(target_w[i], score_w[i]))
        biases.append(torch.cat([target_b[i], score_b[i]], -1))
    o_scale = bank.o_scale[rows]
    weights.append(_block_diag(target_w[-1] * o_scale, score_w[-1] * lse_scale))
    biases.append(torch.cat([target_b[-1] * o_scale + bank.o_mean[rows],
                             score_b[-1] * lse_scale + bank.lse_mean[rows].unsqueeze(-1)], -1))
    return weights, biases

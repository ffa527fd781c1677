"""The module bank: one target network and one score network per (layer, KV head), stacked.

Every weight is a [M, fan_in, fan_out] tensor (M = layers * kv_heads) so that all modules train and
run in batched matmuls; a layer's modules are the slice [layer * kv_heads, (layer + 1) * kv_heads).
Inputs are standardised per module; outputs are predicted in standardised units and mapped back,
and the score network carries a linear skip fitted by least squares, its first-order baseline.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def gelu(x: Tensor) -> Tensor:
    # The tanh form: the same smooth curve to ~1e-3, and 3x cheaper than erf on small CPU tensors.
    return F.gelu(x, approximate="tanh")


class MLPStack(nn.Module):
    """M independent MLPs: d_in -> width (x depth, GELU) -> d_out, as batched matmuls."""

    def __init__(self, M: int, d_in: int, width: int, d_out: int, depth: int):
        super().__init__()
        dims = [d_in] + [width] * depth + [d_out]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.randn(M, a, b) / math.sqrt(a)) for a, b in zip(dims[:-1], dims[1:])
        )
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(M, 1, b)) for b in dims[1:])
        with torch.no_grad():
            self.weights[-1].mul_(0.1)  # start near the mean prediction

    def forward(self, x: Tensor, rows: slice) -> Tensor:
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(b[rows], x, w[rows])
            if i < last:
                x = gelu(x)
        return x

    @staticmethod
    def num_params(d_in: int, width: int, d_out: int, depth: int) -> int:
        dims = [d_in] + [width] * depth + [d_out]
        return sum(a * b + b for a, b in zip(dims[:-1], dims[1:]))


def width_for(params: int, d_in: int, d_out: int, depth: int) -> int:
    """The largest width whose MLP fits in `params` (at least 1)."""
    width = 1
    while MLPStack.num_params(d_in, width + 1, d_out, depth) <= params:
        width += 1
    return width


class MLPBank(nn.Module):
    def __init__(self, layers: int, kv_heads: int, head_dim: int, target_width: int, score_width: int, depth: int):
        super().__init__()
        self.layers, self.kv_heads, self.head_dim, self.depth = layers, kv_heads, head_dim, depth
        M, d = layers * kv_heads, head_dim
        self.target = MLPStack(M, d, target_width, d, depth)
        self.score = MLPStack(M, d, score_width, 1, depth)
        self.score_skip = nn.Parameter(torch.zeros(M, d, 1))
        for name, shape in (("in_mean", (M, 1, d)), ("in_std", (M, 1, d)), ("o_mean", (M, 1, d)),
                            ("o_scale", (M, 1, 1)), ("lse_mean", (M, 1)), ("lse_scale", (M, 1))):
            self.register_buffer(name, torch.zeros(shape) if "mean" in name else torch.ones(shape))

    @classmethod
    def for_budget(cls, layers: int, kv_heads: int, head_dim: int, params_per_module: int, depth: int,
                   score_share: float) -> "MLPBank":
        d = head_dim
        fixed = 4 * d + 2 + d  # normalisation stats and the score skip
        free = max(0, params_per_module - fixed)
        score_width = width_for(int(free * score_share), d, 1, depth)
        target_width = width_for(free - MLPStack.num_params(d, score_width, 1, depth), d, d, depth)
        return cls(layers, kv_heads, head_dim, target_width, score_width, depth)

    @property
    def widths(self) -> tuple[int, int]:
        return self.target.weights[0].shape[-1], self.score.weights[0].shape[-1]

    def num_params(self) -> int:
        return sum(t.numel() for t in self.state_dict().values())

    def predict(self, q: Tensor, rows: slice = slice(None)) -> tuple[Tensor, Tensor]:
        """q [m, N, d] (raw post-RoPE queries of modules `rows`) -> (o [m, N, d], lse [m, N]), fp32."""
        x = (q.float() - self.in_mean[rows]) / self.in_std[rows]
        o = self.o_mean[rows] + self.o_scale[rows] * self.target(x, rows)
        lse_n = self.score(x, rows).squeeze(-1) + torch.bmm(x, self.score_skip[rows]).squeeze(-1)
        return o, self.lse_mean[rows] + self.lse_scale[rows] * lse_n

    def forward(self, layer: int, q: Tensor, scaling: float = 1.0) -> tuple[Tensor, Tensor]:
        """Context-provider interface: q [b, kv_heads, m, d] -> (out [b, kv_heads, m, d], lse [b, kv_heads, m])."""
        b, h, m, d = q.shape
        rows = slice(layer * h, (layer + 1) * h)
        o, lse = self.predict(q.transpose(0, 1).reshape(h, b * m, d), rows)
        return o.view(h, b, m, d).transpose(0, 1), lse.view(h, b, m).transpose(0, 1)

    @torch.no_grad()
    def standardise(self, q: Tensor, o_ctx: Tensor, lse_ctx: Tensor, ridge: float = 1e-2) -> None:
        """Set normalisation from training data and fit the score skip by ridge regression."""
        q, o = q.float(), o_ctx.float()
        self.in_mean.copy_(q.mean(1, keepdim=True))
        self.in_std.copy_(q.std(1, keepdim=True).clamp_min(1e-4))
        self.o_mean.copy_(o.mean(1, keepdim=True))
        self.o_scale.copy_((o - self.o_mean).pow(2).mean((1, 2), keepdim=True).sqrt().clamp_min(1e-4))
        self.lse_mean.copy_(lse_ctx.mean(1, keepdim=True))
        self.lse_scale.copy_(lse_ctx.std(1, keepdim=True).clamp_min(1e-4))
        x = (q - self.in_mean) / self.in_std
        y = ((lse_ctx - self.lse_mean) / self.lse_scale).unsqueeze(-1)
        gram = x.transpose(1, 2) @ x / x.shape[1] + ridge * torch.eye(x.shape[-1])
        self.score_skip.copy_(torch.linalg.solve(gram, x.transpose(1, 2) @ y / x.shape[1]))


class FusedBank(nn.Module):
    """The inference form of an MLPBank, numerically the same function with fewer, larger ops.

    Input standardisation and output scaling are folded into the first and last weights, the target
    and score networks of a module run as one block-diagonal MLP (the score skip rides along as one
    extra output of the first layer), and each layer's weights are split off once, up front, so a
    decode step costs depth + 1 batched matmuls per layer and no slicing.
    """

    def __init__(self, bank: MLPBank, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.head_dim, self.kv_heads = bank.head_dim, bank.kv_heads
        self.weights: list[list[Tensor]] = []
        self.biases: list[list[Tensor]] = []
        with torch.no_grad():
            for layer in range(bank.layers):
                w, b = _fuse_layer(bank, slice(layer * bank.kv_heads, (layer + 1) * bank.kv_heads))
                self.weights.append([t.to(dtype).contiguous() for t in w])
                self.biases.append([t.to(dtype).contiguous() for t in b])

    def _apply(self, fn, recurse=True):
        self.weights = [[fn(t) for t in layer] for layer in self.weights]
        self.biases = [[fn(t) for t in layer] for layer in self.biases]
        return self

    def forward(self, layer: int, q: Tensor, scaling: float = 1.0) -> tuple[Tensor, Tensor]:
        b, h, m, d = q.shape
        weights, biases = self.weights[layer], self.biases[layer]
        x = q.transpose(0, 1).reshape(h, b * m, d).to(weights[0].dtype)
        z = torch.baddbmm(biases[0], x, weights[0])
        skip, x = z[..., -1], gelu(z[..., :-1])
        for w, bias in zip(weights[1:-1], biases[1:-1]):
            x = gelu(torch.baddbmm(bias, x, w))
        out = torch.baddbmm(biases[-1], x, weights[-1]).float()
        o, lse = out[..., :d], out[..., d] + skip.float()
        return o.view(h, b, m, d).transpose(0, 1), lse.view(h, b, m).transpose(0, 1)


def _block_diag(a: Tensor, b: Tensor) -> Tensor:
    """Per-module block-diagonal [M, a_in + b_in, a_out + b_out] from [M, a_in, a_out] and [M, b_in, b_out]."""
    out = a.new_zeros(a.shape[0], a.shape[1] + b.shape[1], a.shape[2] + b.shape[2])
    out[:, : a.shape[1], : a.shape[2]] = a
    out[:, a.shape[1]:, a.shape[2]:] = b
    return out


def _fuse_layer(bank: MLPBank, rows: slice) -> tuple[list[Tensor], list[Tensor]]:
    mean, std = bank.in_mean[rows], bank.in_std[rows]  # [kv, 1, d]
    lse_scale = bank.lse_scale[rows].unsqueeze(-1)  # [kv, 1, 1]

    def standardised_input(w: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
        # ((q - mean) / std) @ w + bias == q @ (w / std^T) + (bias - (mean / std) @ w)
        return w / std.transpose(1, 2), bias - (mean / std) @ w

    wt, bt = standardised_input(bank.target.weights[0][rows], bank.target.biases[0][rows])
    ws, bs = standardised_input(bank.score.weights[0][rows], bank.score.biases[0][rows])
    wk, bk = standardised_input(bank.score_skip[rows] * lse_scale, torch.zeros_like(lse_scale))
    weights, biases = [torch.cat([wt, ws, wk], -1)], [torch.cat([bt, bs, bk], -1)]
    for i in range(1, len(bank.target.weights) - 1):
        weights.append(_block_diag(bank.target.weights[i][rows], bank.score.weights[i][rows]))
        biases.append(torch.cat([bank.target.biases[i][rows], bank.score.biases[i][rows]], -1))
    o_scale = bank.o_scale[rows]
    weights.append(_block_diag(bank.target.weights[-1][rows] * o_scale, bank.score.weights[-1][rows] * lse_scale))
    biases.append(torch.cat([bank.target.biases[-1][rows] * o_scale + bank.o_mean[rows],
                             bank.score.biases[-1][rows] * lse_scale + bank.lse_mean[rows].unsqueeze(-1)], -1))
    return weights, biases

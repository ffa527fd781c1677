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
                x = F.gelu(x)
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

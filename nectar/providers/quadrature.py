"""Nectar's quadrature variant: a learned compact KV cache of m (key, value, log-weight) nodes per module."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .modules import per_layer_call, slot


class QuadratureBank(nn.Module):
    """Nectar's quadrature variant: per module, m learned nodes (key kappa_j, value nu_j, log-weight w_j).

    lse(q) = logsumexp_j(s q.kappa_j + w_j) and o(q) = softmax_j(...) . nu: a compact, learned KV cache
    whose nodes start as k-means clusters of the document's keys (w_j = log cluster size, nu_j = mean
    value), which is already a fair approximation before any fitting.
    """

    variant = "quadrature"
    model_layers: list[int] | None = None

    def __init__(self, layers: int, kv_heads: int, head_dim: int, nodes: int, scaling: float):
        super().__init__()
        self.layers, self.kv_heads, self.head_dim, self.nodes, self.scaling = layers, kv_heads, head_dim, nodes, scaling
        M = layers * kv_heads
        self.keys = nn.Parameter(torch.zeros(M, nodes, head_dim))
        self.values = nn.Parameter(torch.zeros(M, nodes, head_dim))
        self.log_weights = nn.Parameter(torch.zeros(M, nodes))
        # Loss units only (set from the data in `standardise`); the prediction does not use them.
        self.register_buffer("o_scale", torch.ones(M, 1, 1), persistent=False)
        self.register_buffer("lse_scale", torch.ones(M, 1), persistent=False)

    @classmethod
    def for_budget(cls, layers: int, kv_heads: int, head_dim: int, params_per_module: int,
                   scaling: float) -> "QuadratureBank":
        return cls(layers, kv_heads, head_dim, max(1, params_per_module // (2 * head_dim + 1)), scaling)

    def sizes(self) -> dict:
        return {"nodes": self.nodes, "scaling": self.scaling}

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def predict(self, q: Tensor, rows: slice = slice(None)) -> tuple[Tensor, Tensor]:
        scores = self.scaling * torch.bmm(q.float(), self.keys[rows].transpose(1, 2)) + self.log_weights[rows].unsqueeze(1)
        lse = torch.logsumexp(scores, -1)
        return torch.bmm(torch.exp(scores - lse.unsqueeze(-1)), self.values[rows]), lse

    def forward(self, layer: int, q: Tensor, scaling: float = 1.0) -> tuple[Tensor, Tensor]:
        return per_layer_call(self.predict, slot(self, layer), q)

    # The fit's interface (see MLPBank): the nodes read raw queries, and the loss is in `standardise`'s units.
    def encode(self, q: Tensor, rows: slice = slice(None)) -> Tensor:
        return q.float()

    def units(self, o: Tensor, lse: Tensor, rows: slice = slice(None)) -> tuple[Tensor, Tensor]:
        return o.float() / self.o_scale[rows], lse / self.lse_scale[rows]

    def predict_units(self, x: Tensor, rows: slice = slice(None)) -> tuple[Tensor, Tensor]:
        return self.units(*self.predict(x, rows), rows)

    def round_weights(self) -> None:
        """Nodes are stored 16-bit: nothing to round."""

    def export(self) -> dict[str, Tensor]:
        return {"keys": self.keys, "values": self.values, "log_weights": self.log_weights}

    @classmethod
    def from_export(cls, model: dict, sizes: dict, tensors: dict[str, Tensor]) -> "QuadratureBank":
        bank = cls(model["layers"], model["kv_heads"], model["head_dim"], sizes["nodes"], sizes["scaling"])
        bank.load_state_dict(tensors)
        return bank

    @torch.no_grad()
    def init_from(self, keys: Tensor, values: Tensor, iters: int = 15, seed: int = 0) -> None:
        """k-means of each module's keys [M, n, d] (values [M, n, d]) into its nodes."""
        centres, assign, counts = kmeans(keys.float(), self.nodes, iters, seed)
        sums = torch.zeros_like(self.values).scatter_add_(1, assign.unsqueeze(-1).expand_as(values), values.float())
        self.keys.copy_(centres)
        self.values.copy_(sums / counts.clamp_min(1).unsqueeze(-1))
        self.log_weights.copy_(torch.where(counts > 0, counts.clamp_min(1).log(), torch.full_like(counts, -30.0)))

    @torch.no_grad()
    def standardise(self, q: Tensor, o_ctx: Tensor, lse_ctx: Tensor) -> None:
        o = o_ctx.float()
        self.o_scale.copy_((o - o.mean(1, keepdim=True)).pow(2).mean((1, 2), keepdim=True).sqrt().clamp_min(1e-4))
        self.lse_scale.copy_(lse_ctx.std(1, keepdim=True).clamp_min(1e-4))


def kmeans(x: Tensor, k: int, iters: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Lloyd's algorithm on every module at once: x [M, n, d] -> (centres [M, k, d], assign [M, n], counts [M, k])."""
    M, n, d = x.shape
    centres = _kmeans_pp(x, min(k, n), torch.Generator().manual_seed(seed))
    k = centres.shape[1]
    for _ in range(iters):
        assign = torch.cdist(x, centres).argmin(-1)
        counts = torch.zeros(M, k).scatter_add_(1, assign, torch.ones(M, n))
        sums = torch.zeros(M, k, d).scatter_add_(1, assign.unsqueeze(-1).expand(M, n, d), x)
        centres = torch.where(counts.unsqueeze(-1) > 0, sums / counts.clamp_min(1).unsqueeze(-1), centres)
    assign = torch.cdist(x, centres).argmin(-1)
    counts = torch.zeros(M, k).scatter_add_(1, assign, torch.ones(M, n))
    return centres, assign, counts


def _kmeans_pp(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding (each new centre drawn with probability ~ squared distance), for all modules."""
    M, n, d = x.shape
    pick = torch.randint(n, (M, 1), generator=generator)
    centres = [x.gather(1, pick.unsqueeze(-1).expand(M, 1, d))]
    dist = (x - centres[0]).pow(2).sum(-1)
    for _ in range(k - 1):
        pick = torch.multinomial(dist.clamp_min(1e-12), 1, generator=generator)
        centres.append(x.gather(1, pick.unsqueeze(-1).expand(M, 1, d)))
        dist = torch.minimum(dist, (x - centres[-1]).pow(2).sum(-1))
    return torch.cat(centres, 1)

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

from .quant import dequantize, quantize, round_to_grid_, weight_numbers

# Modules whose statistics `standardise` (and the fit's encoding, nectar.fit.rows_of) take at once: two modules'
# fp32 rows of a 4k document's capture stay near glibc's mmap threshold, where six were faulted in afresh.
STAT_BLOCK = 2
GROUPS = 3  # width groups a stack of unequal modules runs in: one matmul per group and layer

def gelu(x: Tensor) -> Tensor:
    # The tanh form: the same smooth curve to ~1e-3, and 3x cheaper than erf on small CPU tensors.
    return F.gelu(x, approximate="tanh")


def pseudo_attention(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """A softmax over the hidden units: attention over learned pseudo-keys (the first weights' columns),
    the shape of the function a target network stands in for. Masked units get no weight; the sqrt(width)
    keeps the next layer's inputs O(1) whatever the width."""
    if mask is None:
        return x.softmax(-1) * math.sqrt(x.shape[-1])
    return x.masked_fill(mask == 0, float("-inf")).softmax(-1) * mask.sum(-1, keepdim=True).sqrt()


class MLPStack(nn.Module):
    """M independent MLPs: d_in -> width (x depth, GELU) -> d_out, as batched matmuls.

    `widths` gives each module its own hidden width: all are stored at the largest one, and units past
    a module's width are masked to zero, so they neither compute nor learn anything.
    """

    def __init__(self, M: int, d_in: int, widths: list[int], d_out: int, depth: int, bits: int = 16,
                 softmax_first: bool = False):
        super().__init__()
        self.bits = bits  # how the weights are stored: 16-bit, or 8-bit with a scale per column (nectar.quant)
        self.softmax_first = softmax_first  # the first hidden layer is `pseudo_attention`, not a GELU
        width = max(widths)
        dims = [d_in] + [width] * depth + [d_out]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.randn(M, a, b) / math.sqrt(a)) for a, b in zip(dims[:-1], dims[1:])
        )
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(M, 1, b)) for b in dims[1:])
        self.widths = list(widths)
        mask = (torch.arange(width) < torch.tensor(widths).unsqueeze(1)).float().unsqueeze(1)
        self.register_buffer("mask", mask, persistent=False)  # [M, 1, width]
        self.uniform = min(widths) == width
        with torch.no_grad():
            self.weights[-1].mul_(0.1)  # start near the mean prediction

    def forward(self, x: Tensor, rows: slice) -> Tensor:
        if self.uniform:
            return self.masked(x, rows)
        widths = self.widths[rows]
        if len(set(widths)) == 1:  # one layer's modules: at their own width, nothing to mask
            return _mlp(x, *self.trimmed(rows, widths[0]), softmax_first=self.softmax_first)
        if len(widths) < len(self.widths):
            return self.masked(x, rows)
        # Widths vary by layer (up to 12x under the gap allocation): run each group of similar widths at
        # its own largest one, not every module at the widest's, which costs up to its square per module.
        groups = self.groups()
        parts = []
        for index, width in groups:
            mask = self.mask[index][..., :width]
            parts.append(_mlp(x[index], *_unit_masked(*self.trimmed(index, width), mask),
                              mask if self.softmax_first else None, self.softmax_first))
        return Interleave.apply([index for index, _ in groups], *parts)

    @torch.no_grad()
    def solve_last(self, x: Tensor, y: Tensor, w: Tensor | None = None, ridge: float = 1e-3) -> None:
        """Set the last layer (weights and bias) to the weighted ridge solution of `y` [M, N, d_out] on the hidden
        features of `x` [M, N, d_in]; `w` [M, N]: each row's weight. Masked units read 0 and get no weight."""
        h = self.features(x)
        solution = ridge_solve(torch.cat([h, torch.ones_like(h[..., :1])], -1), y, w, ridge)
        self.weights[-1].copy_(solution[:, :-1])
        self.biases[-1].copy_(solution[:, -1:])

    def features(self, x: Tensor) -> Tensor:
        """Every module's last hidden layer [M, N, width] (units past a module's width are 0)."""
        hidden = list(self.weights)[:-1], list(self.biases)[:-1]
        return _mlp(x, *hidden, None if self.uniform else self.mask, self.softmax_first, last_linear=False)

    def masked(self, x: Tensor, rows: slice, mask: Tensor | None = None) -> Tensor:
        """Every module at the stack's full width, units past its own masked: the reference path."""
        return _mlp(x, [w[rows] for w in self.weights], [b[rows] for b in self.biases],
                    None if self.uniform else self.mask[rows], self.softmax_first)

    def groups(self) -> list[tuple[Tensor, int]]:
        """Modules split into at most GROUPS sets of similar width: (their indices, the set's largest width)."""
        if not hasattr(self, "_groups") or self._groups[0][0].device != self.mask.device:
            self._groups = [(torch.tensor(index, device=self.mask.device), width)
                            for index, width in width_groups(self.widths, GROUPS)]
        return self._groups

    def trimmed(self, rows: slice | Tensor, width: int) -> tuple[list[Tensor], list[Tensor]]:
        """The weights of modules `rows` (all of hidden width `width`) without their masked units."""
        last = len(self.weights) - 1
        weights = [w[rows][:, : width if i else None, : width if i < last else None] for i, w in enumerate(self.weights)]
        biases = [b[rows][..., : width if i < last else None] for i, b in enumerate(self.biases)]
        return weights, biases

    def active_params(self) -> int:
        d_in, d_out = self.weights[0].shape[1], self.weights[-1].shape[2]
        return math.ceil(sum(self.num_params(d_in, w, d_out, len(self.weights) - 1, self.bits) for w in self.widths))

    @staticmethod
    def num_params(d_in: int, width: int, d_out: int, depth: int, bits: int = 16) -> float:
        """16-bit numbers one MLP takes in storage: weights (as `bits` stores them) and biases."""
        dims = [d_in] + [width] * depth + [d_out]
        return sum(weight_numbers(a, b, bits) + b for a, b in zip(dims[:-1], dims[1:]))


class Interleave(torch.autograd.Function):
    """Groups of modules' outputs written back into module order, each part's gradient a plain gather:
    autograd's own index_copy or indexing reads the gradient back through slow strided or accumulating paths."""

    @staticmethod
    def forward(ctx, indices: list[Tensor], *parts: Tensor) -> Tensor:
        ctx.indices = indices
        out = parts[0].new_empty(sum(len(i) for i in indices), *parts[0].shape[1:])
        for index, part in zip(indices, parts):
            out.index_copy_(0, index, part)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        return (None, *(grad[index] for index in ctx.indices))


def _unit_masked(weights: list[Tensor], biases: list[Tensor], mask: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Hidden layers whose masked units (`mask` [M, 1, width]) have no weights in and no bias: such a unit reads
    exactly 0 after GELU and its weights get no gradient, the numbers of masking its activations, for a pass
    over the weights instead of one over the activations [M, rows, width]. The pseudo-keys' softmax still
    needs the mask itself, or a masked unit's exp(0) would take a share."""
    last = len(weights) - 1
    return ([w * mask if i < last else w for i, w in enumerate(weights)],
            [b * mask if i < last else b for i, b in enumerate(biases)])


def _mlp(x: Tensor, weights: list[Tensor], biases: list[Tensor], mask: Tensor | None = None,
         softmax_first: bool = False, last_linear: bool = True) -> Tensor:
    """The layers in turn; the last one linear (`last_linear`), or every one a hidden layer (`features`)."""
    last = len(weights) - 1 if last_linear else len(weights)
    for i, (w, b) in enumerate(zip(weights, biases)):
        x = torch.baddbmm(b, x, w)
        if i == 0 and softmax_first and last:
            x = pseudo_attention(x, mask)
        elif i < last:
            # The 0/1 mask in the activations' dtype: an fp32 mask would promote bf16 activations to fp32 and
            # back at every layer, for the same numbers.
            x = gelu(x) if mask is None else gelu(x) * mask.to(x.dtype)
    return x


def ridge_solve(x: Tensor, y: Tensor, w: Tensor | None = None, ridge: float = 1e-2) -> Tensor:
    """Per module, the B [d_in, d_out] minimising mean(w * |x B - y|^2) + ridge |B|^2, of x [M, N, d_in] and
    y [M, N, d_out]; `w` [M, N]: each row's weight (None: 1)."""
    xw = x if w is None else x * w.unsqueeze(-1)
    gram = xw.transpose(1, 2) @ x / x.shape[1] + ridge * torch.eye(x.shape[-1], device=x.device)
    return torch.linalg.solve(gram, xw.transpose(1, 2) @ y / x.shape[1])


def width_groups(widths: list[int], groups: int) -> list[tuple[list[int], int]]:
    """At most `groups` sets of module indices, by width, that minimise the hidden-layer cost (set size
    x its largest width squared) of running each set at its largest width."""
    order = sorted(range(len(widths)), key=widths.__getitem__)
    w = [widths[i] for i in order]
    n = len(w)
    # best[g][j]: least cost of the j narrowest modules in g sets; a set ending at j runs at width w[j-1].
    best = [[0.0] + [math.inf] * n for _ in range(groups + 1)]
    cut = [[0] * (n + 1) for _ in range(groups + 1)]
    for g in range(1, groups + 1):
        for j in range(1, n + 1):
            for i in range(j):
                cost = best[g - 1][i] + (j - i) * w[j - 1] ** 2
                if cost < best[g][j]:
                    best[g][j], cut[g][j] = cost, i
    sets, j, g = [], n, min(range(1, groups + 1), key=lambda k: best[k][n])
    while j:
        i = cut[g][j]
        sets.append(([order[k] for k in range(i, j)], w[j - 1]))
        j, g = i, g - 1
    return sets[::-1]


def width_for(params: float, d_in: int, d_out: int, depth: int, bits: int = 16) -> int:
    """The largest width whose MLP fits in `params` 16-bit numbers (at least 1)."""
    width = 1
    while MLPStack.num_params(d_in, width + 1, d_out, depth, bits) <= params:
        width += 1
    return width


def slot(bank, layer: int) -> int:
    """The bank's own index of model layer `layer`: a bank holds modules for the global layers only, in
    order (`model_layers`; None when every layer has modules, and the indices agree)."""
    return layer if bank.model_layers is None else bank.model_layers.index(layer)


class MLPBank(nn.Module):
    variant = "mlp"
    model_layers: list[int] | None = None

    def __init__(self, layers: int, kv_heads: int, head_dim: int, target_widths: int | list[int],
                 score_widths: int | list[int], depth: int, weight_bits: int = 16, target_softmax: bool = False):
        super().__init__()
        self.layers, self.kv_heads, self.head_dim, self.depth = layers, kv_heads, head_dim, depth
        self.target_widths = _per_layer(target_widths, layers)
        self.score_widths = _per_layer(score_widths, layers)
        M, d = layers * kv_heads, head_dim
        self.target = MLPStack(M, d, [w for w in self.target_widths for _ in range(kv_heads)], d, depth, weight_bits,
                               softmax_first=target_softmax)
        self.score = MLPStack(M, d, [w for w in self.score_widths for _ in range(kv_heads)], 1, depth, weight_bits)
        self.score_skip = nn.Parameter(torch.zeros(M, d, 1))
        for name, shape in (("in_mean", (M, 1, d)), ("in_std", (M, 1, d)), ("o_mean", (M, 1, d)),
                            ("o_scale", (M, 1, 1)), ("lse_mean", (M, 1)), ("lse_scale", (M, 1))):
            self.register_buffer(name, torch.zeros(shape) if "mean" in name else torch.ones(shape))

    @classmethod
    def for_budget(cls, layers: int, kv_heads: int, head_dim: int, params_per_module: int | list[int], depth: int,
                   score_share: float, weight_bits: int = 16, target_softmax: bool = False) -> "MLPBank":
        """The widest bank whose modules fit `params_per_module` 16-bit numbers (one count, or one per layer) each."""
        d, bits = head_dim, weight_bits
        fixed = 4 * d + 3 + d  # normalisation stats and the score skip
        target, score = [], []
        for params in _per_layer(params_per_module, layers):
            free = max(0, params - fixed)
            score.append(width_for(int(free * score_share), d, 1, depth, bits))
            target.append(width_for(free - MLPStack.num_params(d, score[-1], 1, depth, bits), d, d, depth, bits))
        return cls(layers, kv_heads, head_dim, target, score, depth, weight_bits, target_softmax)

    @property
    def weight_bits(self) -> int:
        return self.target.bits

    def sizes(self) -> dict:
        return {"depth": self.depth, "target_widths": self.target_widths, "score_widths": self.score_widths,
                "weight_bits": self.weight_bits, "target_softmax": self.target_softmax}

    @property
    def target_softmax(self) -> bool:
        return self.target.softmax_first

    def num_params(self) -> int:
        """16-bit numbers the modules take in storage (masked units excluded): what the byte budget counts."""
        fixed = self.score_skip.numel() + sum(b.numel() for b in self.buffers(recurse=False))
        return self.target.active_params() + self.score.active_params() + fixed

    def predict(self, q: Tensor, rows: slice = slice(None)) -> tuple[Tensor, Tensor]:
        """q [m, N, d] (raw post-RoPE queries of modules `rows`) -> (o [m, N, d], lse [m, N]), fp32."""
        o_n, lse_n = self.predict_units(self.encode(q, rows), rows)
        return self.o_mean[rows] + self.o_scale[rows] * o_n, self.lse_mean[rows] + self.lse_scale[rows] * lse_n

    # The fit works in the networks' own units: inputs standardised once, not at every step.
    def encode(self, q: Tensor, rows: slice = slice(None)) -> Tensor:
        """The networks' inputs: raw queries standardised per module."""
        return (q.float() - self.in_mean[rows]) / self.in_std[rows]

    def units(self, o: Tensor, lse: Tensor, rows: slice = slice(None)) -> tuple[Tensor, Tensor]:
        """Exact outputs in the networks' output units (standardised per module): the fit's targets."""
        return (o.float() - self.o_mean[rows]) / self.o_scale[rows], (lse - self.lse_mean[rows]) / self.lse_scale[rows]

    def predict_units(self, x: Tensor, rows: slice = slice(None)) -> tuple[Tensor, Tensor]:
        """Encoded inputs -> (o, lse) in output units."""
        return self.target(x, rows), self.score(x, rows).squeeze(-1) + torch.bmm(x, self.score_skip[rows]).squeeze(-1)

    def forward(self, layer: int, q: Tensor, scaling: float = 1.0) -> tuple[Tensor, Tensor]:
        """Context-provider interface: q [b, kv_heads, m, d] -> (out [b, kv_heads, m, d], lse [b, kv_heads, m])."""
        return per_layer_call(self.predict, slot(self, layer), q)

    def rows(self, layer: int) -> slice:
        return slice(layer * self.kv_heads, (layer + 1) * self.kv_heads)

    def layer_weights(self, layer: int) -> tuple[tuple[list[Tensor], list[Tensor]], tuple[list[Tensor], list[Tensor]]]:
        """((target weights, biases), (score weights, biases)) of one layer, masked units cut off."""
        rows = self.rows(layer)
        return self.target.trimmed(rows, self.target_widths[layer]), self.score.trimmed(rows, self.score_widths[layer])

    def export(self) -> dict[str, Tensor]:
        """Tensors to store, one set per layer at its own width: padding never reaches the file."""
        out = {}
        for layer in range(self.layers):
            rows = self.rows(layer)
            for net, (weights, biases) in zip(("target", "score"), self.layer_weights(layer)):
                for i, w in enumerate(weights):
                    if self.weight_bits == 16:
                        out[f"{layer}.{net}.w{i}"] = w
                    else:
                        out[f"{layer}.{net}.w{i}"], out[f"{layer}.{net}.w{i}.scale"] = quantize(w, self.weight_bits)
                out.update({f"{layer}.{net}.b{i}": b for i, b in enumerate(biases)})
            out[f"{layer}.score_skip"] = self.score_skip[rows]
            out.update({f"{layer}.{name}": buf[rows] for name, buf in self.named_buffers(recurse=False)})
        return out

    @classmethod
    def from_export(cls, model: dict, sizes: dict, tensors: dict[str, Tensor]) -> "MLPBank":
        bank = cls(model["layers"], model["kv_heads"], model["head_dim"], sizes["target_widths"],
                   sizes["score_widths"], sizes["depth"], sizes.get("weight_bits", 16),
                   sizes.get("target_softmax", False))  # artifacts from before it read as GELU banks
        with torch.no_grad():
            for layer in range(bank.layers):
                for net in (bank.target, bank.score):
                    name = "target" if net is bank.target else "score"
                    for i, (w, b) in enumerate(zip(*net.trimmed(bank.rows(layer), max(net.widths)))):
                        stored_w, stored_b = tensors[f"{layer}.{name}.w{i}"], tensors[f"{layer}.{name}.b{i}"]
                        if f"{layer}.{name}.w{i}.scale" in tensors:
                            stored_w = dequantize(stored_w, tensors[f"{layer}.{name}.w{i}.scale"])
                        w[:, : stored_w.shape[1], : stored_w.shape[2]] = stored_w
                        b[..., : stored_b.shape[-1]] = stored_b
                bank.score_skip[bank.rows(layer)] = tensors[f"{layer}.score_skip"]
                for name, buf in bank.named_buffers(recurse=False):
                    buf[bank.rows(layer)] = tensors[f"{layer}.{name}"]
        return bank

    @torch.no_grad()
    def round_weights(self) -> None:
        """Round every weight, in place, to what its stored form reads back as: what a compile evaluates and
        saves is then the function the artifact holds."""
        if self.weight_bits == 16:
            return
        for layer in range(self.layers):
            for weights, _ in self.layer_weights(layer):  # views: the units past a module's width stay out
                for w in weights:
                    round_to_grid_(w, self.weight_bits)

    @torch.no_grad()
    def standardise(self, q: Tensor, o_ctx: Tensor, lse_ctx: Tensor, ridge: float = 1e-2) -> None:
        """Set normalisation from training data and fit the score skip by ridge regression."""
        for first in range(0, q.shape[0], STAT_BLOCK):  # a few modules at a time: no fp32 copy of the whole store
            rows = slice(first, first + STAT_BLOCK)
            self._standardise(rows, q[rows].float(), o_ctx[rows].float(), lse_ctx[rows], ridge)

    @torch.no_grad()
    def solve_heads(self, x: Tensor, o: Tensor, lse: Tensor, w: Tensor) -> None:
        """Both networks' last layers solved by ridge regression on their (random) hidden features, in output
        units: the target's weighted by `w` as the fit weighs it, the score's on what its skip leaves. A fit
        then starts where its first features allow, not at the mean prediction."""
        self.target.solve_last(x, o, w)
        self.score.solve_last(x, (lse - torch.bmm(x, self.score_skip).squeeze(-1)).unsqueeze(-1))

    def _standardise(self, rows: slice, q: Tensor, o: Tensor, lse: Tensor, ridge: float) -> None:
        std_q, mean_q = torch.std_mean(q, 1, keepdim=True)
        self.in_mean[rows], self.in_std[rows] = mean_q, std_q.clamp_min(1e-4)
        self.o_mean[rows] = o.mean(1, keepdim=True)
        self.o_scale[rows] = (o - self.o_mean[rows]).pow(2).mean((1, 2), keepdim=True).sqrt().clamp_min(1e-4)
        std_lse, mean_lse = torch.std_mean(lse, 1, keepdim=True)
        self.lse_mean[rows], self.lse_scale[rows] = mean_lse, std_lse.clamp_min(1e-4)
        x = self.encode(q, rows)
        y = ((lse - self.lse_mean[rows]) / self.lse_scale[rows]).unsqueeze(-1)
        self.score_skip[rows] = ridge_solve(x, y, ridge=ridge)


def _per_layer(value: int | list[int], layers: int) -> list[int]:
    values = [int(value)] * layers if isinstance(value, (int, float)) else [int(v) for v in value]
    if len(values) != layers:
        raise ValueError(f"expected {layers} per-layer values, got {len(values)}")
    return values


def per_layer_call(predict, layer: int, q: Tensor) -> tuple[Tensor, Tensor]:
    """Run a [modules, N, d] predictor on one layer's provider-shaped queries [b, kv_heads, m, d]."""
    b, h, m, d = q.shape
    o, lse = predict(q.transpose(0, 1).reshape(h, b * m, d), slice(layer * h, (layer + 1) * h))
    return o.view(h, b, m, d).transpose(0, 1), lse.view(h, b, m).transpose(0, 1)

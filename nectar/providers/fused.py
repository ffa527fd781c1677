"""The inference form of a module bank: the same function as an MLPBank in fewer, larger ops.

An 8-bit bank stays 8-bit in memory: each weight is held as its int8 codes with one scale per output
column, as the file stores it, and read back to fp32 inside the call, one layer at a time. The document
then costs at run time about what its file does (MPL-2.0 at 2%: 6.25 MB of fp32 modules became 1.76 MB),
for one elementwise op per weight per step.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from .graphs import forget
from .modules import MLPBank, gelu, pseudo_attention, slot
from .quant import quantize


@dataclass
class FusedLayer:
    """One layer's modules as one block-diagonal MLP: target and score networks side by side.

    `weights[i]` is fp32, or int8 codes whose fp32 value is codes x `scales[i]` (one scale per output
    column). The input is standardised by `in_scale` / `in_shift` (a row scaling, which per-column codes
    cannot absorb), and the score's linear skip is its own small fp32 matmul, stored 16-bit as in the file.
    """

    weights: list[Tensor]
    scales: list[Tensor | None]
    biases: list[Tensor]
    in_scale: Tensor  # [modules, 1, d]
    in_shift: Tensor  # [modules, 1, d]
    skip: Tensor  # [modules, d, 1]
    softmax_units: int = 0  # the first hidden units, the target network's, that `pseudo_attention` reads

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [modules, N, d] -> (o [modules, N, d], lse [modules, N]), fp32."""
        d = x.shape[-1]
        x = torch.addcmul(self.in_shift, x.float(), self.in_scale)
        skip = torch.bmm(x, self.skip)[..., 0]
        last = len(self.weights) - 1
        for i, (w, scale, bias) in enumerate(zip(self.weights, self.scales, self.biases)):
            x = torch.baddbmm(bias, x, w if scale is None else w * scale)  # int8 x fp32 promotes to fp32
            if i == 0 and self.softmax_units and last:
                x = torch.cat([pseudo_attention(x[..., : self.softmax_units]), gelu(x[..., self.softmax_units:])], -1)
            elif i < last:
                x = gelu(x)
        return x[..., :d], x[..., d] + skip

    def tensors(self) -> list[Tensor]:
        return [t for name in _TENSOR_FIELDS for t in _flat(getattr(self, name))]

    def map(self, fn) -> "FusedLayer":
        return FusedLayer(**{name: _apply(fn, getattr(self, name)) for name in _TENSOR_FIELDS},
                          softmax_units=self.softmax_units)

    def shape(self) -> tuple:
        """What rows must share to run stacked: every tensor's shape past the modules axis, its dtype, and
        the activation."""
        return (*((tuple(t.shape[1:]), t.dtype) for t in self.tensors()), self.softmax_units)

    @staticmethod
    def cat(layers: list["FusedLayer"]) -> "FusedLayer":
        """Several documents' layers (of one shape) stacked along the modules axis."""
        def join(parts):
            if isinstance(parts[0], list):
                return [join([p[i] for p in parts]) for i in range(len(parts[0]))]
            return None if parts[0] is None else torch.cat(parts)
        return FusedLayer(**{name: join([getattr(layer, name) for layer in layers]) for name in _TENSOR_FIELDS},
                          softmax_units=layers[0].softmax_units)  # equal in layers of one shape


_TENSOR_FIELDS = tuple(f.name for f in fields(FusedLayer) if f.name != "softmax_units")


def _flat(value) -> list[Tensor]:
    return [t for t in value if t is not None] if isinstance(value, list) else [value]


def _apply(fn, value):
    return [None if t is None else fn(t) for t in value] if isinstance(value, list) else fn(value)


class FusedBank:
    """The inference form of an MLPBank, numerically the same function with fewer, larger ops.

    Output scaling is folded into the last weights (into the column scales of an 8-bit bank), the target
    and score networks of a module run as one block-diagonal MLP, and each layer's weights are split
    off once, up front, so a decode step costs depth + 2 batched matmuls and depth GELUs per layer.
    """

    graphable = True  # on a GPU its decode step runs as a CUDA graph (nectar.graphs)
    traceable = True  # ... and on a CPU as a traced graph

    def __init__(self, bank: MLPBank):
        self.head_dim, self.kv_heads, self.model_layers = bank.head_dim, bank.kv_heads, bank.model_layers
        with torch.no_grad():
            self.layers = [_fuse_layer(bank, layer) for layer in range(bank.layers)]

    def to(self, device: torch.device | str) -> "FusedBank":
        """Move the weights (in place); any CUDA graphs captured with the old ones are dropped."""
        forget(self)
        self.layers = [layer.map(lambda t: t.to(device)) for layer in self.layers]
        return self

    def __call__(self, layer: int, q: Tensor, scaling: float = 1.0) -> tuple[Tensor, Tensor]:
        b, h, m, d = q.shape
        # Batch 1 (the common decode) needs no transposes: each view or cast here costs a microsecond.
        x = q[0] if b == 1 else q.transpose(0, 1).reshape(h, b * m, d)
        o, lse = self.layers[slot(self, layer)](x)
        if b == 1:
            return o[None], lse[None]
        return o.view(h, b, m, d).transpose(0, 1), lse.view(h, b, m).transpose(0, 1)


def _block_diag(a: Tensor, b: Tensor) -> Tensor:
    """Per-module block-diagonal [M, a_in + b_in, a_out + b_out] from [M, a_in, a_out] and [M, b_in, b_out]."""
    out = a.new_zeros(a.shape[0], a.shape[1] + b.shape[1], a.shape[2] + b.shape[2])
    out[:, : a.shape[1], : a.shape[2]] = a
    out[:, a.shape[1]:, a.shape[2]:] = b
    return out


def _fuse_layer(bank: MLPBank, layer: int) -> FusedLayer:
    rows = bank.rows(layer)
    (target_w, target_b), (score_w, score_b) = bank.layer_weights(layer)
    mean, std = bank.in_mean[rows], bank.in_std[rows]  # [kv, 1, d]
    lse_scale = bank.lse_scale[rows].unsqueeze(-1)  # [kv, 1, 1]
    out_scale = torch.cat([bank.o_scale[rows].expand(-1, 1, target_w[-1].shape[-1]), lse_scale], -1)
    weights, biases = [torch.cat([target_w[0], score_w[0]], -1)], [torch.cat([target_b[0], score_b[0]], -1)]
    for i in range(1, len(target_w)):
        weights.append(_block_diag(target_w[i], score_w[i]))
        biases.append(torch.cat([target_b[i], score_b[i]], -1))
    biases[-1] = biases[-1] * out_scale + torch.cat([bank.o_mean[rows], bank.lse_mean[rows].unsqueeze(-1)], -1)
    if bank.weight_bits == 16:
        weights[-1], scales = weights[-1] * out_scale, [None] * len(weights)
    else:
        # The weights sit on their 8-bit grid: quantising them again gives back their stored codes.
        weights, scales = map(list, zip(*(quantize(w, bank.weight_bits) for w in weights)))
        scales = [s.float() for s in scales]
        scales[-1] = scales[-1] * out_scale
    return FusedLayer(weights, scales, [b.contiguous() for b in biases], (1 / std).contiguous(),
                      (-mean / std).contiguous(), (bank.score_skip[rows] * lse_scale).contiguous(),
                      target_w[0].shape[-1] if bank.target_softmax else 0)

"""Module weights stored as 8-bit integers, one 16-bit scale per output column: twice the numbers per byte.

A fitted module's error is capacity-bound (its training and held-out errors agree, and 4x the numbers
cut the output error 27% on the default model) while rounding its weights to 8 bits barely moves it
(merged error 0.0864 -> 0.0868), so at a fixed byte budget 8-bit weights buy about 1.6x the width.
4-bit weights would buy 1.5x more, but spend it on rounding: fitted through their rounding, with a scale
per 16 input rows, they only draw level with 8-bit (docs/decisions.md#weight-bits), so modules stop at 8 bits.
Biases and normalisation stay 16-bit. The exact tokens past the sinks quantise the same way, a scale per
channel of each (layer, head) as KV-cache quantisers do for keys: about twice the tokens per byte
(docs/decisions.md#exact-bits). The sinks, few and with the largest keys, stay 16-bit.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .attention import ExactContext
from .kernels import attend, empty_heads


def weight_numbers(fan_in: int, fan_out: int, bits: int) -> float:
    """16-bit numbers a [fan_in, fan_out] weight takes in storage, its scales included."""
    if bits == 16:
        return fan_in * fan_out
    return fan_in * fan_out * bits / 16 + fan_out


def quantize(w: Tensor, bits: int = 8) -> tuple[Tensor, Tensor]:
    """w [..., fan_in, fan_out] -> (int8 codes, fp16 scales [..., 1, fan_out]), each column by its largest |w|."""
    levels = 2 ** (bits - 1) - 1
    if w.shape[-2] == 0:  # nothing to scale (a layer with no exact tokens): unit scales keep the layout
        return w.to(torch.int8), torch.ones(*w.shape[:-2], 1, w.shape[-1], dtype=torch.float16)
    # The scale is rounded to fp16 before dividing, so that codes x stored scale is exactly the dequantised weight.
    scale = (w.detach().abs().amax(-2, keepdim=True).float() / levels).clamp_min(1e-7).half()
    codes = (w.detach().float() / scale.float()).round().clamp(-levels, levels).to(torch.int8)
    return codes, scale


def dequantize(codes: Tensor, scale: Tensor) -> Tensor:
    return codes.float() * scale.float()


def pack4(codes: Tensor) -> Tensor:
    """4-bit codes in [-7, 7] (int8, an even last dim) -> uint8, two to a byte: what a file stores."""
    nibbles = (codes + 8).to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack4(packed: Tensor) -> Tensor:
    """pack4's inverse: uint8 [..., d / 2] -> int8 codes [..., d]."""
    low, high = (packed & 15).to(torch.int8) - 8, (packed >> 4).to(torch.int8) - 8
    return torch.stack([low, high], -1).flatten(-2)


def unpacked(stored: Tensor) -> Tensor:
    """Integer codes as they are stored: int8, or 4-bit ones two to a byte (uint8)."""
    return unpack4(stored) if stored.dtype == torch.uint8 else stored


def rounded(w: Tensor, bits: int = 8) -> Tensor:
    """What w's stored form (codes and scales) reads back as, in w's dtype."""
    return dequantize(*quantize(w, bits)).to(w.dtype)


@torch.no_grad()
def round_to_grid_(w: Tensor, bits: int = 8) -> None:
    """Replace w, in place, by what its stored 8-bit form reads back as."""
    w.copy_(rounded(w, bits))


def per_token(bits: int, values: bool) -> bool:
    """Whether exact tokens at `bits` take a scale per token instead of per channel: values at 4 bits do
    (as KIVI quantises a KV cache). Keys keep per-channel scales, since a few channels carry their outliers.
    Values enter the output linearly, so their rounding averages out over the tokens a query reads: on MPL at
    2%, values re-rounded to 4 bits moved answer KL 0.0233 -> 0.0247 with a scale per channel, -> 0.0239 with one
    per token (keys at 4 bits: 0.065; docs/decisions.md#exact-value-bits)."""
    return values and bits == 4


def quantize_tokens(x: Tensor, bits: int, values: bool = False) -> tuple[Tensor, Tensor]:
    """x [..., tokens, d] -> (codes, scales): scales [..., 1, d] per channel, or [..., tokens, 1] per token."""
    if not per_token(bits, values):
        return quantize(x, bits)
    codes, scale = quantize(x.transpose(-1, -2), bits)
    return codes.transpose(-1, -2).contiguous(), scale.transpose(-1, -2)


def token_numbers(tokens: int, d: int, bits: int, values: bool = False) -> float:
    """16-bit numbers `tokens` keys (or values) of width d take in storage, their scales included."""
    if not per_token(bits, values):
        return weight_numbers(tokens, d, bits)
    return tokens * d * bits / 16 + tokens


def round_tokens(x: Tensor, skip: int, bits: int = 8, values: bool = False) -> Tensor:
    """x [kv_heads, tokens, d] with the tokens past `skip` replaced by what their stored form reads back as."""
    if bits == 16 or x.shape[-2] <= skip:
        return x
    return torch.cat([x[:, :skip], dequantize(*quantize_tokens(x[:, skip:], bits, values)).to(x.dtype)], 1)


def as_stored(exact: ExactContext, skip: int, bits: int, value_bits: int | None = None) -> ExactContext:
    """Exact tokens as an artifact reads them back: in global layers the first `skip` (the sinks) 16-bit and
    the rest at `bits` (values at `value_bits`, default the same); sliding layers' tails 16-bit."""
    value_bits = bits if value_bits is None else value_bits

    def at(layer: int, b: int) -> int:
        return 16 if exact.slides(layer) else b
    return replace(exact, keys=[round_tokens(k, skip, at(layer, bits)) for layer, k in enumerate(exact.keys)],
                   values=[round_tokens(v, skip, at(layer, value_bits), values=True)
                           for layer, v in enumerate(exact.values)])


ROWS_ABOVE = 0.25  # padding share above which a layer's exact tokens are held as rows (padded at each call)


@dataclass
class CodedTokens:
    """Exact tokens held in memory as integer codes with their scales, read back at each call: an attached
    document holds about the bytes its file does. 4-bit codes are held one to a byte, not two as the file packs
    them: unpacking them at every call cost 4% of decode speed (0.75 -> 0.78x no document at batch 1, 0.84 ->
    0.88x at 16, pydoc's 2% artifact) for 0.36 MB. Where the KV heads of a layer keep unequal
    numbers of tokens (one of MPL's keeps 1866, its neighbours 22), only each head's real rows are held, end
    to end, and the padding the attention call needs is made at read time, never kept."""

    # Per layer (codes, scales [kv_heads, 1, d]): codes [kv_heads, t, d] int8, or where padding would take
    # more than ROWS_ABOVE of the layer, each head's real rows end to end, [rows, d]. Values
    # at 4 bits have a scale per token instead: [kv_heads, t, 1], or [rows, 1].
    keys: list[tuple[Tensor, Tensor]]
    values: list[tuple[Tensor, Tensor]]
    bias: list[Tensor | None] | None = None  # per layer [kv_heads, t], -inf on the padding of heads that keep fewer

    def __post_init__(self):
        # Where each real row goes in the flattened [kv_heads * t] padding, for layers held as rows: found once.
        self.slots = [torch.isfinite(self.bias[layer]).flatten().nonzero().squeeze(1) if codes.dim() == 2 else None
                      for layer, (codes, _) in enumerate(self.keys)]
        self.empty = [None if b is None else empty_heads(b) for b in (self.bias or [None] * len(self.keys))]

    @classmethod
    def of(cls, exact: ExactContext, bits: int, value_bits: int | None = None) -> CodedTokens:
        """Tokens already on their grid (as_stored) coded again: the same codes the file holds."""
        def coded(x: Tensor, bias: Tensor | None, b: int, values: bool = False) -> tuple[Tensor, Tensor]:
            codes, scale = quantize_tokens(x.float(), b, values)
            if bias is not None and bias.isinf().float().mean() > ROWS_ABOVE:
                real = torch.isfinite(bias)
                codes, scale = codes[real], (scale[real] if per_token(b, values) else scale)  # head after head
            return codes, scale.float()
        bias, value_bits = exact.bias or [None] * len(exact.keys), bits if value_bits is None else value_bits
        return cls([coded(k, b, bits) for k, b in zip(exact.keys, bias)],
                   [coded(v, b, value_bits, True) for v, b in zip(exact.values, bias)], exact.bias)

    def to(self, device) -> CodedTokens:
        bias = None if self.bias is None else [None if b is None else b.to(device) for b in self.bias]
        return CodedTokens(*([(c.to(device), s.to(device)) for c, s in part] for part in (self.keys, self.values)),
                           bias)

    def layer_bias(self, layer: int) -> Tensor | None:
        return None if self.bias is None else self.bias[layer]

    def count(self, layer: int) -> int:
        return self.keys[layer][0].shape[-2] if self.slots[layer] is None else self.bias[layer].shape[-1]

    def tensors(self) -> list[Tensor]:
        return [t for part in (self.keys, self.values) for pair in part for t in pair] + [
            b for b in [*(self.bias or []), *self.slots] if b is not None]

    def __call__(self, layer: int, q: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
        """Attention over the layer's tokens with the per-channel scales folded into the query and the output
        (q . (c * s) = (q * s) . c): a decode step converts the codes once and never builds dequantised K, V.
        Values scaled per token are read back as values, since a token's own scale cannot leave the sum."""
        (k_codes, k_scale), (v_codes, v_scale) = self.keys[layer], self.values[layer]
        by_token = v_scale.shape[-1] == 1  # per-channel scales are [kv_heads, 1, d]
        k = self._codes(layer, k_codes, q.dtype)
        v = self._codes(layer, v_codes, q.dtype, v_scale if by_token else None)
        if q.shape[1] != k_scale.shape[0]:  # query heads grouped over the KV heads (the model passes KV rows)
            groups = q.shape[1] // k_scale.shape[0]
            k_scale = k_scale.repeat_interleave(groups, 0)
            v_scale = v_scale if by_token else v_scale.repeat_interleave(groups, 0)
        o, lse = attend(q * k_scale.to(q.dtype), k, v, scaling, self.layer_bias(layer), self.empty[layer])
        return (o if by_token else o * v_scale), lse

    def _codes(self, layer: int, codes: Tensor, dtype: torch.dtype, row_scale: Tensor | None = None) -> Tensor:
        """A layer's codes as [kv_heads, t, d] in `dtype` (exact: |code| <= 127), times their per-token scales
        where given; a layer held as rows padded with zeros."""
        codes, slots = codes.to(dtype), self.slots[layer]
        if row_scale is not None:
            codes = codes * row_scale.to(dtype)
        if slots is None:
            return codes
        flat = codes.new_zeros(self.bias[layer].numel(), codes.shape[-1]).index_copy_(0, slots, codes)
        return flat.view(*self.bias[layer].shape, -1)

"""Attention kernels that return the log-sum-exp beside the output, and the merge of two such results.

Split attention needs each part's lse to merge them (the split-KV merge of FlashDecoding): on CPU and CUDA
these are PyTorch's fused kernels, which return it without materialising the scores; `reference_attention`
writes the same out, for the tests to hold the kernels to and for gradients.
"""
from __future__ import annotations

import torch
from torch import Tensor


def merge(o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Combine attention over two disjoint key sets (the split-KV merge of FlashDecoding)."""
    lse = torch.logaddexp(lse_a, lse_b)
    # An all -inf pair (no keys on either side) would give nan; it contributes nothing instead.
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w_a = torch.exp(lse_a - safe).unsqueeze(-1)
    w_b = torch.exp(lse_b - safe).unsqueeze(-1)
    return w_a * o_a + w_b * o_b, lse


def merge_onto(o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """`merge` where lse_a is finite (a module's always is), in four ops instead of ten: `blend`, whose weight
    of b is 0 where b has no keys (lse_b = -inf), and the lse."""
    return blend(o_a, lse_a, o_b, lse_b), torch.logaddexp(lse_a, lse_b)


def blend(o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor) -> Tensor:
    """`merge`'s output alone, in three ops: the decode path needs no lse, and each op costs microseconds.

    exp(lse_a - lse) is sigmoid(lse_a - lse_b). One side may be -inf (no keys), not both: the local side
    always holds the query's own token, and fully masked rows get a finite lse from the kernel.
    """
    return torch.lerp(o_b, o_a, torch.sigmoid(lse_a - lse_b).unsqueeze(-1))


def exact_attention(
    q: Tensor, k: Tensor, v: Tensor, scaling: float, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Attention of q [b, H, m, d] over k, v [b, Hkv, s, d] (H a multiple of Hkv, GQA) -> fp32 (out, lse).

    mask, if given, is additive and broadcasts to [b, 1, m, s], or to [b, Hkv, m, s] (one per KV head).
    On CPU this is PyTorch's fused flash kernel, which handles GQA and returns the log-sum-exp too, without
    materialising the scores or copying the keys per query head.
    """
    # The fused kernels pass no gradient through their lse; refinement needs one.
    fusable = k.shape[0] == q.shape[0] and not (torch.is_grad_enabled() and q.requires_grad)
    if fusable and q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16):
        b, heads, m, d = q.shape
        kv = k.shape[1]
        if m == 1 and heads > kv:
            # A decode step: the query heads sharing a KV head become rows of one head. The kernel then
            # reads each key block once, not once per query head, with bitwise the same output.
            q = q.view(b, kv, heads // kv, d)
            mask = None if mask is None else mask.expand(b, mask.shape[1], heads // kv, mask.shape[-1])
        elif mask is not None and mask.shape[1] > 1 and heads > kv:
            mask = mask.repeat_interleave(heads // kv, dim=1)  # query head h reads KV head h // groups
        attn_mask = None if mask is None else mask.to(q.dtype)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=attn_mask, scale=scaling)[:2]
        return out.float().reshape(b, heads, m, d), lse.reshape(b, heads, m)
    b, heads, m, d = q.shape
    kv = k.shape[1]
    grouped = q.reshape(b, kv, heads // kv * m, d)  # query head h uses KV head h // groups, as repeat_kv
    mask = _grouped_mask(mask, heads // kv, m)
    if fusable and q.device.type == "cuda":
        out, lse = _cuda_attention(grouped, k, v, scaling, mask)
    else:
        out, lse = reference_attention(grouped, k, v, scaling, mask)
    return out.reshape(b, heads, m, d), lse.reshape(b, heads, m)


def _cuda_attention(q: Tensor, k: Tensor, v: Tensor, scaling: float, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """PyTorch's fused CUDA kernels, which return the lse too: flash when it applies (half precision, no
    mask), else memory-efficient attention with the mask as an additive bias. One launch instead of five."""
    if mask is None and q.dtype in (torch.float16, torch.bfloat16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scaling)[:2]
        return out.float(), lse
    bias = None
    if mask is not None:
        # The kernel wants the bias's rows 16-aligned in memory: pad a buffer, view the first s columns.
        # It also scales scores by log2(e) before exp2, so transformers' float minimum would overflow to
        # -inf and turn a fully masked row (a left pad) into zeros and an infinite lse; -1e30 stays finite.
        b, _, m, s = mask.shape
        bias = q.new_zeros(b, k.shape[1], m, -(-s // 16) * 16)[..., :s]
        bias.copy_(mask.expand(b, k.shape[1], m, s).clamp_min(-1e30))
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, False,
                                                                      scale=scaling)[:2]
    return out.float(), lse[..., : q.shape[2]]


def reference_attention(
    q: Tensor, k: Tensor, v: Tensor, scaling: float, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The same, written out: the path tests hold the fused kernels to, and the one used for gradients."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scaling
    if mask is not None:
        scores = scores + mask
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1))
    return torch.matmul(probs.to(v.dtype), v).float(), lse


def _grouped_mask(mask: Tensor | None, groups: int, length: int) -> Tensor | None:
    """[b, 1 or Hkv, L, s] -> [b, 1 or Hkv, groups * L, s], matching the grouped query layout."""
    if mask is None or groups == 1:
        return mask
    b, h, L, s = mask.shape
    return mask.float().unsqueeze(2).expand(b, h, groups, L, s).reshape(b, h, groups * L, s)


def attend(q: Tensor, k: Tensor, v: Tensor, scaling: float, bias: Tensor | None = None,
           empty: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Queries [b, kv_heads, m, d] over one set of keys and values [kv_heads, t, d] shared by every row,
    with an additive `bias` [kv_heads, t]; `empty` (from `empty_heads`) marks heads whose keys it masks all."""
    # Fold the batch into the query rows: a broadcast matmul would copy K once per batch row.
    b, h, m, d = q.shape
    rows = q.transpose(0, 1).reshape(1, h, b * m, d)
    o, lse = exact_attention(rows, k[None], v[None], scaling,
                             None if bias is None else bias.to(q.device)[None, :, None, :])
    lse = lse.view(h, b, m)
    if empty is not None:
        lse = lse + empty.to(q.device)  # the kernel gives a head with every key masked lse 0, not -inf
    return o.view(h, b, m, d).transpose(0, 1), lse.transpose(0, 1)


def empty_heads(bias: Tensor) -> Tensor | None:
    """[kv_heads, 1, 1]: -inf for a head whose keys `bias` [kv_heads, t] masks all (it keeps no tokens while
    its neighbours do), 0 for the others; None when there is no such head."""
    dead = ~torch.isfinite(bias).any(-1)
    return dead.float().masked_fill(dead, float("-inf"))[:, None, None] if dead.any() else None

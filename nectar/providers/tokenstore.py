"""How an artifact's exact tokens lie in its file: sinks, quantised exact tokens and sliding tails.

Parts stack when every layer keeps as many tokens, else go end to end with their lengths; heads that keep
unequal numbers of tokens store each head's real rows only, and read back padded, with a -inf bias on the
padding.
"""
from __future__ import annotations

import torch

from .attention import ExactContext
from .quant import dequantize, pack4, per_token, quantize_tokens, unpacked

STORE_DTYPE = torch.float16


def stored(name: str, keys: list, values: list, heads: list | None = None) -> dict[str, torch.Tensor]:
    """One part's 16-bit keys and values: stacked when every layer keeps as many tokens, else end to end;
    with `heads` (per layer, the tokens each KV head keeps), each head's real rows end to end."""
    if heads is not None:
        out = {f"{name}.keys": _rows(keys, heads), f"{name}.values": _rows(values, heads),
               f"{name}.heads": torch.tensor(heads, dtype=torch.int32)}
    elif len({k.shape[1] for k in keys}) == 1:
        out = {f"{name}.keys": torch.stack(keys), f"{name}.values": torch.stack(values)}
    else:
        out = {f"{name}.keys": torch.cat(keys, 1), f"{name}.values": torch.cat(values, 1),
               f"{name}.lengths": torch.tensor([k.shape[1] for k in keys], dtype=torch.int32)}
    return {k: (v.to(STORE_DTYPE) if v.is_floating_point() else v).contiguous() for k, v in out.items()}


def quantized(name: str, keys: list, values: list, bits: int, heads: list | None = None,
              value_bits: int | None = None) -> dict[str, torch.Tensor]:
    """One part's keys and values as integer codes end to end, with each layer's [kv_heads, 1, d] scales;
    with `heads`, each head's real rows end to end (its padding is zeros: it moves no scale). Values at
    `value_bits` (default `bits`) scaled per token keep one 16-bit scale per row, laid out as their codes
    (`.row_scale`)."""
    out = ({f"{name}.lengths": torch.tensor([k.shape[1] for k in keys], dtype=torch.int32)} if heads is None
           else {f"{name}.heads": torch.tensor(heads, dtype=torch.int32)})
    for part, tensors, b in (("keys", keys, bits), ("values", values, bits if value_bits is None else value_bits)):
        codes, scales = zip(*(quantize_tokens(x.float(), b, part == "values") for x in tensors))
        codes = torch.cat(codes, 1) if heads is None else _rows(codes, heads)
        out[f"{name}.{part}"] = pack4(codes) if b == 4 else codes
        if per_token(b, part == "values"):
            out[f"{name}.{part}.row_scale"] = torch.cat(scales, 1) if heads is None else _rows(scales, heads)
        else:
            out[f"{name}.{part}.scale"] = torch.stack(scales)
    return out


def _rows(xs: list[torch.Tensor], heads: list[list[int]]) -> torch.Tensor:
    """Per layer [kv_heads, t, d] -> [sum of real rows, d]: each head's first `heads[layer][h]` rows."""
    return torch.cat([x[h, :count] for x, counts in zip(xs, heads) for h, count in enumerate(counts)])


def _padded(rows: torch.Tensor, heads: list[list[int]]) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """`_rows`' inverse: per layer [kv_heads, most, d] with zero padding, and its bias (-inf on the padding;
    None for a layer whose heads keep as many)."""
    parts = iter(rows.split([c for counts in heads for c in counts]))
    out, bias = [], []
    for counts in heads:
        most = max(counts)
        x = rows.new_zeros(len(counts), most, rows.shape[-1])
        for h in range(len(counts)):
            x[h, : counts[h]] = next(parts)
        out.append(x)
        pad = torch.arange(most) >= torch.tensor(counts)[:, None]
        bias.append(torch.zeros(len(counts), most).masked_fill_(pad, float("-inf")) if pad.any() else None)
    return out, bias


def sinks_from(manifest: dict, tensors: dict) -> ExactContext:
    windows = manifest["model"].get("windows")
    keys, values, bias = _per_layer(tensors, "sinks") if "sinks.keys" in tensors else ([], [], [])
    if "exact.keys" in tensors:  # each global layer's quantised exact tokens after its sinks
        keys, values, bias = _exact_after(tensors, keys, values)
    if not windows:
        return ExactContext(keys, values, bias if any(b is not None for b in bias) else None)
    # Global layers' sinks (and exact tokens) and sliding layers' tails, back in model layer order.
    parts = {"sinks": iter(zip(keys, values, bias)), "tails": iter(zip(*_per_layer(tensors, "tails")))}
    keys, values, bias = zip(*(next(parts["sinks" if w is None else "tails"]) for w in windows))
    return ExactContext(list(keys), list(values), list(bias) if any(b is not None for b in bias) else None,
                        windows=windows, end=manifest["document"]["tokens"])


def _exact_after(tensors: dict, keys: list, values: list) -> tuple[list, list, list]:
    """The sinks with each layer's quantised exact tokens read back after them, and the padding's bias."""
    codes = {part: unpacked(tensors[f"exact.{part}"]) for part in ("keys", "values")}
    if "exact.heads" in tensors:
        heads = tensors["exact.heads"].tolist()
        (kc, bias), (vc, _) = _padded(codes["keys"], heads), _padded(codes["values"], heads)
    else:
        lengths = tensors["exact.lengths"].tolist()
        kc, vc, bias = codes["keys"].split(lengths, 1), codes["values"].split(lengths, 1), [None] * len(lengths)
    scales = {name: _row_scales(tensors, name) for name in ("keys", "values")}
    out = [[torch.cat([x, dequantize(c, scale)], 1) for x, c, scale in zip(sinks, part, scales[name])]
           for sinks, part, name in ((keys, kc, "keys"), (values, vc, "values"))]
    s = keys[0].shape[1]
    bias = [None if b is None else torch.cat([torch.zeros(b.shape[0], s), b], 1) for b in bias]
    return out[0], out[1], bias


def _row_scales(tensors: dict, part: str) -> list[torch.Tensor]:
    """Per layer, the scales of the exact tokens' keys or values: [kv_heads, 1, d] per channel, or per token
    [kv_heads, t, 1], padded as the codes are."""
    if f"exact.{part}.row_scale" not in tensors:
        return list(tensors[f"exact.{part}.scale"])
    rows = tensors[f"exact.{part}.row_scale"].float()
    if "exact.heads" in tensors:
        return _padded(rows, tensors["exact.heads"].tolist())[0]
    return list(rows.split(tensors["exact.lengths"].tolist(), 1))


def _per_layer(tensors: dict, name: str) -> tuple[list, list, list]:
    """A stored part's keys and values, one [kv_heads, tokens, d] per layer (stacked, end to end, or per
    head), and per layer the bias of a head's padding (None where heads keep as many)."""
    keys, values = tensors[f"{name}.keys"].float(), tensors[f"{name}.values"].float()
    if f"{name}.heads" in tensors:
        heads = tensors[f"{name}.heads"].tolist()
        (keys, bias), (values, _) = _padded(keys, heads), _padded(values, heads)
        return keys, values, bias
    if f"{name}.lengths" not in tensors:
        return list(keys.unbind(0)), list(values.unbind(0)), [None] * keys.shape[0]
    lengths = tensors[f"{name}.lengths"].tolist()
    return list(keys.split(lengths, 1)), list(values.split(lengths, 1)), [None] * len(lengths)

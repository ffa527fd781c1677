"""`nectar bench`: decode speed and memory against the full KV cache, side by side in one process.

Timings on a shared CPU are noisy, so every figure is min/median over repeats taken in the same run,
and the claims are ratios between methods measured back to back.
"""
from __future__ import annotations

import json
import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn import functional as F

from .attach import bound, positions_after, prefill
from .attention import ExactContext
from .errors import NectarError
from .modules import FusedBank


@dataclass
class BenchConfig:
    attention_n: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192, 16384, 32768])
    decode_n: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192])
    batches: list[int] = field(default_factory=lambda: [1, 16])
    new_tokens: int = 32
    repeats: int = 3

    def __post_init__(self):
        if not self.attention_n or not self.decode_n or min(self.attention_n + self.decode_n) < 16:
            raise NectarError("bench sizes must be >= 16 tokens")
        if not self.batches or min(self.batches) < 1 or self.new_tokens < 2 or self.repeats < 1:
            raise NectarError("batches, new_tokens (>= 2) and repeats must be positive")


def _timed(fn, repeats: int) -> dict:
    fn()  # warm-up: allocator, kernels, caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"min": min(times), "median": statistics.median(times)}


@torch.no_grad()
def attention_only(model, bank: FusedBank, sizes: list[int], repeats: int) -> list[dict]:
    """Per-token attention over the document for one layer, one decode query: SDPA over n keys vs the module."""
    cfg = model.config
    heads, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, bank.head_dim
    dtype = next(model.parameters()).dtype
    q = torch.randn(1, heads, 1, d, dtype=dtype)
    rows = []
    for n in sizes:
        k = torch.randn(1, kv, n, d, dtype=dtype)
        v = torch.randn(1, kv, n, d, dtype=dtype)
        sdpa = _timed(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), repeats * 20)
        module = _timed(lambda: bank(0, q.view(1, kv, heads // kv, d)), repeats * 20)
        rows.append({"n": n, "sdpa_ms": sdpa["median"] * 1e3, "module_ms": module["median"] * 1e3,
                     "speedup": sdpa["median"] / module["median"]})
    return rows


@torch.no_grad()
def greedy_decode(model, prompt: torch.Tensor, n: int, new_tokens: int) -> None:
    mask = torch.ones_like(prompt)
    model.generate(input_ids=prompt, attention_mask=mask, position_ids=positions_after(n, mask),
                   max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)


def decode(model, bank: FusedBank, kept: ExactContext, doc_ids: list[int], cfg: BenchConfig) -> list[dict]:
    """Greedy decode tokens/s: no document, full cache (shared by all rows), nectar."""
    rows = []
    prompt_len = 16
    for batch in cfg.batches:
        prompt = torch.randint(3, min(1000, model.config.vocab_size), (batch, prompt_len))
        base = _timed(lambda: greedy_decode(model, prompt, 0, cfg.new_tokens), cfg.repeats)
        rows.append({"method": "no_document", "n": 0, "batch": batch, **_rate(base, batch, cfg.new_tokens)})
        for n in cfg.decode_n:
            full = prefill(model, torch.tensor(doc_ids[:n]))
            with bound(model, full):
                t = _timed(lambda: greedy_decode(model, prompt, n, cfg.new_tokens), cfg.repeats)
            rows.append({"method": "full_cache", "n": n, "batch": batch, **_rate(t, batch, cfg.new_tokens)})
            del full
            with bound(model, bank, kept=kept):
                t = _timed(lambda: greedy_decode(model, prompt, n, cfg.new_tokens), cfg.repeats)
            rows.append({"method": "nectar", "n": n, "batch": batch, **_rate(t, batch, cfg.new_tokens)})
    return rows


def _rate(t: dict, batch: int, new_tokens: int) -> dict:
    return {"tok_s_median": batch * new_tokens / t["median"], "tok_s_best": batch * new_tokens / t["min"]}


def memory(model, artifact, sizes: list[int]) -> list[dict]:
    cfg = model.config
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * artifact.bank.head_dim * 2  # bf16 K and V
    nectar_bytes = artifact.nbytes()
    return [{"n": n, "full_cache_bytes": n * per_token, "nectar_bytes": nectar_bytes,
             "ratio": nectar_bytes / (n * per_token)} for n in sizes]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    rows = report["decode"]
    for batch in sorted({r["batch"] for r in rows}):
        base = next(r for r in rows if r["method"] == "no_document" and r["batch"] == batch)
        for method, style in (("full_cache", "o-"), ("nectar", "s-")):
            pts = [r for r in rows if r["method"] == method and r["batch"] == batch]
            ax1.plot([r["n"] for r in pts], [r["tok_s_median"] for r in pts], style, label=f"{method}, batch {batch}")
        ax1.axhline(base["tok_s_median"], ls=":", color="gray")
    ax1.set(xscale="log", xlabel="document tokens n", ylabel="decode tokens/s (median)",
            title="Greedy decode (dotted: no document)")
    ax1.legend(fontsize=8)
    att = report["attention"]
    ax2.plot([r["n"] for r in att], [r["sdpa_ms"] for r in att], "o-", label="SDPA over n keys")
    ax2.plot([r["n"] for r in att], [r["module_ms"] for r in att], "s-", label="nectar module")
    ax2.set(xscale="log", yscale="log", xlabel="document tokens n", ylabel="ms per decode token (one layer)",
            title="Attention over the document")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(model, artifact, doc_ids: list[int], cfg: BenchConfig, out: Path) -> dict:
    limit = model.config.max_position_embeddings - cfg.new_tokens - 16
    if max(cfg.decode_n) > limit:
        print(f"[nectar] decode sizes above {limit} tokens do not fit this model: capped")
        cfg.decode_n = sorted({min(n, limit) for n in cfg.decode_n})
    if len(doc_ids) < max(cfg.decode_n):
        raise NectarError(f"the bench document has {len(doc_ids)} tokens, fewer than n = {max(cfg.decode_n)}")
    bank, kept = artifact.providers(model)
    report = {"attention": attention_only(model, bank, cfg.attention_n, cfg.repeats)}
    report["decode"] = decode(model, bank, kept, doc_ids, cfg)
    report["memory"] = memory(model, artifact, cfg.decode_n)
    report["peak_rss_mb"] = peak_rss_mb()
    report["torch_threads"] = torch.get_num_threads()
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    plot(report, out / "bench.png")
    return report

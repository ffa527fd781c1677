"""`nectar bench`: decode speed and memory against the full KV cache, side by side in one process.

Timings on a shared CPU are noisy, so every figure is min/median over repeats taken in the same run,
and the claims are ratios between methods measured back to back.
"""
from __future__ import annotations

import resource
import statistics
import sys
import time
from dataclasses import dataclass, field, replace

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..runtime.binding import bound, cacheable, generation_inputs
from ..providers.attention import IMPLEMENTATION, ExactContext, WithExact
from ..errors import NectarError
from ..model.models import attn_implementation, cache_tokens
from ..providers.fused import FusedBank
from ..runtime.prefill import as_cache, prefill, prefix


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
            raise NectarError("--batch, --new-tokens (at least 2) and --repeats must be positive")


def _sync() -> None:
    """GPU work is queued: a clock read without this times the queueing, not the work."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _per_call(fn, inner: int = 50) -> float:
    """Seconds per call, the mean of `inner` back-to-back calls (one call is too short to time)."""
    _sync()
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    _sync()
    return (time.perf_counter() - start) / inner


@torch.no_grad()
def attention_only(model, provider, sizes: list[int], repeats: int) -> list[dict]:
    """Per-token attention over the document for one layer, one decode query: SDPA over n keys vs the module.

    Round-robin over n as for decode, so that the module, whose work is the same at every n, is timed
    under the same drift as SDPA; min and median of the rounds. A bank with exact tokens beside it (an
    `attention.WithExact`) is timed as its module alone: the exact tokens differ by layer, and the decode
    timings include them.
    """
    bank: FusedBank = provider.provider if isinstance(provider, WithExact) else provider
    heads, kv, d = model.config.num_attention_heads, model.config.num_key_value_heads, bank.head_dim
    like = dict(dtype=next(model.parameters()).dtype, device=model.device)
    q = torch.randn(1, heads, 1, d, **like)
    layer = 0 if bank.model_layers is None else bank.model_layers[0]  # a global layer: one with modules
    calls = {}
    for n in sizes:
        k, v = torch.randn(1, kv, n, d, **like), torch.randn(1, kv, n, d, **like)
        calls["sdpa", n] = lambda k=k, v=v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        calls["module", n] = lambda: bank(layer, q.view(1, kv, heads // kv, d))
    times = {key: [] for key in calls}
    for round_ in range(repeats * 5 + 1):
        for key, fn in calls.items():
            t = _per_call(fn)
            if round_:  # the first round warms up
                times[key].append(t)
    rows = []
    for n in sizes:
        sdpa, module = times["sdpa", n], times["module", n]
        rows.append({"n": n, "sdpa_ms": statistics.median(sdpa) * 1e3, "module_ms": statistics.median(module) * 1e3,
                     "sdpa_ms_min": min(sdpa) * 1e3, "module_ms_min": min(module) * 1e3,
                     "speedup": statistics.median(sdpa) / statistics.median(module)})
    return rows


@torch.no_grad()
def greedy_decode(model, prompt: torch.Tensor, n: int, new_tokens: int, sinks: ExactContext | None = None) -> None:
    model.generate(**generation_inputs(model, prompt, torch.ones_like(prompt), n, sinks),
                   max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)


def decode(model, bank: FusedBank, sinks: ExactContext, doc_ids: list[int], config: BenchConfig) -> list[dict]:
    """Greedy decode tokens/s: no document, the full cache at each n, nectar; each at every batch size.

    `no_document` is the stock model (transformers' SDPA); `no_document_nectar_kernel` the same through
    nectar's attention function with nothing bound, the reference for the modules' own cost.
    `full_cache` attends exactly to the document's keys, shared by all rows as a prefix cache would,
    through nectar's kernel; `full_cache_stock` (batch 1) is transformers' own path: a DynamicCache
    holding the document, read by SDPA. Round-robin: every repeat times each case once, back to back,
    so drift in the machine's speed hits all alike; `vs_*` are medians of per-round time ratios.
    """
    # One prefill of the longest prefix; each shorter document is a slice of it.
    print(f"[nectar] prefill of {max(config.decode_n)} tokens", flush=True)
    whole = prefill(model, torch.tensor(doc_ids[:max(config.decode_n)]), whole=True)
    fulls = {n: prefix(whole, n) for n in config.decode_n}
    rows = []
    for batch in config.batches:
        prompt = torch.randint(3, min(1000, model.config.vocab_size), (batch, 16), device=model.device)
        cases = {("no_document", 0): lambda: greedy_decode(model, prompt, 0, config.new_tokens),
                 ("no_document_nectar_kernel", 0): _plain_nectar_decode(model, prompt, config.new_tokens)}
        for n, full in fulls.items():
            cases["full_cache", n] = _bound_decode(model, prompt, n, config.new_tokens, full)
            if batch == 1:  # per-row caches: at batch 16 and 8k this path takes minutes a run
                cases["full_cache_stock", n] = _stock_decode(model, prompt, full, config.new_tokens)
        # The modules' cost does not depend on n; timing them at each n shows that it does not.
        for n in config.decode_n:
            cases["nectar", n] = _bound_decode(model, prompt, n, config.new_tokens, bank, sinks)
        times = _round_robin(cases, config.repeats, f"decode, batch {batch}")
        for (method, n), t in times.items():
            row = {"method": method, "n": n, "batch": batch, **_rate(t, batch, config.new_tokens)}
            if method == "nectar":
                for other, at in (("no_document", 0), ("no_document_nectar_kernel", 0), ("full_cache", n),
                                  ("full_cache_stock", n)):
                    if (other, at) in times:
                        row[f"vs_{other}"] = _paired(times[other, at], t)
            rows.append(row)
    return rows


def _bound_decode(model, prompt, n, new_tokens, context, sinks=None):
    cached = sinks if cacheable(model, sinks) else None

    def run():
        with bound(model, context, sinks=None if cached is not None else sinks):
            greedy_decode(model, prompt, n, new_tokens, cached)
    return run


def _plain_nectar_decode(model, prompt, new_tokens):
    def run():
        with attn_implementation(model, IMPLEMENTATION):
            greedy_decode(model, prompt, 0, new_tokens)
    return run


def _stock_decode(model, prompt, full: ExactContext, new_tokens):
    """(prepare, run): generate extends its cache in place, so each run gets a fresh one, made off the clock.
    `generate` feeds only the ids past the cache; the document's ids are placeholders."""
    n = full.end
    ids = torch.cat([prompt.new_zeros(prompt.shape[0], n), prompt], 1)

    def run(cache):
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return lambda: as_cache(model, full, prompt.shape[0]), run


def _round_robin(cases: dict, repeats: int, desc: str) -> dict:
    """Per case, `repeats` timings; a case is a function, or (prepare, run) with prepare off the clock."""
    def once(case) -> float:
        prepare, run = case if isinstance(case, tuple) else (None, case)
        args = () if prepare is None else (prepare(),)
        _sync()
        start = time.perf_counter()
        run(*args)
        _sync()
        return time.perf_counter() - start

    times = {key: [] for key in cases}
    with tqdm(total=(repeats + 1) * len(cases), desc=desc, leave=False) as bar:
        for round_ in range(repeats + 1):  # round 0 warms up: allocator, kernels, caches
            for key, case in cases.items():
                t = once(case)
                if round_:
                    times[key].append(t)
                bar.update()
    return times


def _paired(other: list[float], mine: list[float]) -> float:
    """Speed of `mine` over `other`: the median of ratios taken within one round."""
    return statistics.median(o / m for o, m in zip(other, mine))


def _rate(times: list[float], batch: int, new_tokens: int) -> dict:
    tokens = batch * new_tokens
    return {"tok_s_median": tokens / statistics.median(times), "tok_s_best": tokens / min(times)}


def memory(model, artifact, sizes: list[int]) -> list[dict]:
    """The model's own bf16 cache at each n (sliding layers hold their window only) against the artifact's
    file and against what its attached form holds in memory."""
    cfg = model.config
    per_token = 2 * cfg.num_key_value_heads * artifact.bank.head_dim * 2  # bf16 K and V, one layer
    stored, resident = artifact.nbytes(), artifact.resident_bytes(model)
    full = {n: cache_tokens(cfg, n) * per_token for n in sizes}
    return [{"n": n, "full_cache_bytes": full[n], "nectar_bytes": stored, "ratio": stored / full[n],
             "resident_bytes": resident, "resident_ratio": resident / full[n]} for n in sizes]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(model, artifact, doc_ids: list[int], config: BenchConfig) -> dict:
    """Every measurement of `nectar bench`, as one report (see bench_report for its table, plot and JSON)."""
    limit = model.config.max_position_embeddings - config.new_tokens - 16
    if max(config.decode_n) > limit:
        print(f"[nectar] decode sizes above {limit} tokens do not fit this model: capped", file=sys.stderr)
        config = replace(config, decode_n=sorted({min(n, limit) for n in config.decode_n}))
    if len(doc_ids) < max(config.decode_n):
        raise NectarError(f"the bench document has {len(doc_ids)} tokens, fewer than n = {max(config.decode_n)}")
    bank, sinks = artifact.providers(model)
    print("[nectar] one layer's attention alone, at each n", flush=True)
    report = {"attention": attention_only(model, bank, config.attention_n, config.repeats)}
    report["decode"] = decode(model, bank, sinks, doc_ids, config)
    report["memory"] = memory(model, artifact, config.decode_n)
    report["peak_rss_mb"] = peak_rss_mb()
    report["device"] = "cpu"
    if model.device.type == "cuda":
        report["device"] = torch.cuda.get_device_name(model.device)
        report["peak_gpu_mb"] = torch.cuda.max_memory_allocated(model.device) / 2**20
    report["torch_threads"] = torch.get_num_threads()
    return report

"""Where the KL is: the probe behind the `gap` allocation.

Modules fitted briefly at uniform width stand in for one layer at a time, every other layer on the exact
document, and the next-token KL on training questions says how much that layer costs the answer. In the
hardest layers each KV head is then measured alone: a layer's heads differ by orders of magnitude (on
MPL one head of layer 18 carried half the answer KL, its two others none), and exact tokens go by head.
"""
from __future__ import annotations

from dataclasses import replace

from .budget import params_per_module
from .capture import Store
from .config import CompileConfig
from .evaluate import QUESTION_KINDS, layer_gaps
from .fit import fit
from .models import modeled_layers
from .prefill import window_tails
from .timing import stage

SHORT_FIT_EVERY = 2  # the probe's and an on-policy refit's 150 steps visit every other sequence's rows often enough


def fit_probe(probe, config: CompileConfig, train_store: Store, val_store: Store):
    """A short fit at uniform width: its per-layer errors and KLs show where capacity is short."""
    steps = config.probe_steps
    fit(probe.to(train_store.q.device), train_store, val_store,
        replace(config.fit, steps=steps, eval_every=steps, warmup=steps // 10), seed=config.seed, progress=False)
    return probe.eval().requires_grad_(False)


def gap_key(config: CompileConfig) -> tuple:
    """What a probe depends on beyond the document: two compiles that agree on it share their gaps."""
    return (config.budget, config.probe_steps, config.probe_prompts, config.probe_recall, config.depth,
            config.score_share, config.weight_bits, config.target_softmax, config.seed, repr(config.fit))


def _spread(prompts: list, count: int) -> list[tuple]:
    """`count` prompts' (question, answer) ids, taken evenly through the list."""
    if not count:
        return []
    return [(p.question_ids, p.answer_ids) for p in prompts[:: max(1, len(prompts) // count)][:count]]


def mixed_gaps(measure, questions: list[tuple], recall: list[tuple]) -> list[float]:
    """Each cell's KL on the questions, or with recall prompts each set's share of its own total, averaged and
    scaled back to the questions' total: recall's KL runs 20-60x the questions', and would drown them unscaled."""
    on_questions = measure(questions)
    if not recall:
        return on_questions
    on_recall = measure(recall)
    total_q, total_r = sum(on_questions), sum(on_recall)
    if not total_q or not total_r:  # a set that costs nothing anywhere has no shares to give
        return on_questions
    return [total_q * (q / total_q + r / total_r) / 2 for q, r in zip(on_questions, on_recall)]


class GapProbe:
    """One workbench's probes, each made once per probe setting: every bank of a budget sweep or ablation
    that allocates by it shares it."""

    def __init__(self, bench):
        self.bench = bench
        self.layers: dict[tuple, list[float]] = {}  # per probe setting: each modeled layer's KL
        self.heads: dict[tuple, dict[int, list[float]]] = {}  # per (setting, layers): each KV head's KL
        self.times: dict[tuple, dict[str, float]] = {}
        self._made: dict[tuple, tuple] = {}  # per setting: (its questions, its recall prompts, the probe method)

    def layer_gaps(self, config: CompileConfig) -> list[float]:
        """Per modeled layer, the answer KL on training questions when it alone uses the probe's modules
        (beside the sink tokens)."""
        key, bench = gap_key(config), self.bench
        if key not in self.layers:
            times = self.times.setdefault(key, {})
            # With no exact tokens the main fit's capture serves; else the probe's own, of fewer sequences.
            train_store, val_store = bench.stores(0, every=SHORT_FIT_EVERY if config.exact_share else 1)
            with stage(times, "probe"):
                per_module = params_per_module(bench.model, bench.n, config)
                probe = fit_probe(bench.mlp_bank(config, per_module), config, train_store, val_store)
            with stage(times, "layer gaps"):
                questions = _spread([p for p in bench.train_prompts if p.kind in QUESTION_KINDS], config.probe_prompts)
                recall = _spread([p for p in bench.train_prompts if p.kind == "recall"], config.probe_recall)
                self._made[key] = questions, recall, (probe, bench.split(0)[0])
                self.layers[key] = self._kl(key, modeled_layers(bench.model.config))
        return self.layers[key]

    def head_gaps(self, config: CompileConfig) -> dict[int, list[float]]:
        """For the `head_gap_layers` modeled layers of largest KL, the KL each of their KV heads causes alone."""
        gaps, key, bench = self.layer_gaps(config), gap_key(config), self.bench
        if (key, config.head_gap_layers) not in self.heads:
            kv, modeled = bench.model.config.num_key_value_heads, modeled_layers(bench.model.config)
            hard = sorted(range(len(gaps)), key=gaps.__getitem__, reverse=True)[: config.head_gap_layers]
            cells = [(i, h) for i in hard for h in range(kv)]
            with stage(self.times[key], "head gaps"):
                kls = self._kl(key, [modeled[i] for i, _ in cells], heads=[h for _, h in cells])
            self.heads[key, config.head_gap_layers] = {i: kls[j * kv:(j + 1) * kv] for j, i in enumerate(hard)}
        return self.heads[key, config.head_gap_layers]

    def _kl(self, key: tuple, layers: list[int], heads: list[int] | None = None) -> list[float]:
        """The probe method's KL in each of `layers` (or each layer's one head), on the setting's questions mixed
        with its recall prompts."""
        bench, (questions, recall, method) = self.bench, self._made[key]
        return mixed_gaps(lambda pairs: layer_gaps(bench.model, pairs, bench.n, bench.full, method, layers,
                                                   window_tails(bench.full), bench.config.batch_size, heads=heads),
                          questions, recall)

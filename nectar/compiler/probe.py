"""Where the KL is: the probe behind the `gap` allocation.

Modules fitted briefly at uniform width stand in for one layer at a time, every other layer on the exact
document, and the next-token KL on training questions says how much that layer costs the answer. In the
hardest layers each KV head is then measured alone: a layer's heads differ by orders of magnitude, and
exact tokens go by head. Everything it measures comes in as arguments: the model, the document's exact
prefill, the training prompts and a capture of them.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from ..providers.attention import ExactContext
from .budget import params_per_module
from .capture import Store
from ..config import CompileConfig
from ..measure.fidelity import QUESTION_KINDS, layer_gaps
from .fit import fit
from ..model.models import modeled_layers
from .plan import mlp_bank
from ..runtime.prefill import window_tails
from .prompts import Prompt

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


@dataclass(eq=False)
class GapProbe:
    """A short fit's modules and the training prompts they are measured on: the KL of any layer (or one of
    its KV heads) standing on them alone, every other layer exact."""

    model: object
    full: ExactContext
    n: int
    method: tuple  # (the probe's bank, the sink tokens beside it)
    questions: list[tuple]
    recall: list[tuple]
    batch_size: int

    @classmethod
    def fit(cls, model, full: ExactContext, n: int, sinks: ExactContext, train_prompts: list[Prompt],
            stores: tuple[Store, Store], config: CompileConfig, batch_size: int) -> GapProbe:
        """The probe of `config`'s setting: fitted on `stores`, a capture of the document beside `sinks` alone."""
        per_module = params_per_module(model.config, n, config)
        bank = fit_probe(mlp_bank(config, model.config, per_module), config, *stores)
        questions = _spread([p for p in train_prompts if p.kind in QUESTION_KINDS], config.probe_prompts)
        recall = _spread([p for p in train_prompts if p.kind == "recall"], config.probe_recall)
        return cls(model, full, n, (bank, sinks), questions, recall, batch_size)

    def kls(self, layers: list[int], heads: list[int] | None = None) -> list[float]:
        """The KL in each of `layers` (or each layer's one head), on the questions mixed with the recall prompts."""
        return mixed_gaps(lambda pairs: layer_gaps(self.model, pairs, self.n, self.full, self.method, layers,
                                                   window_tails(self.full), self.batch_size, heads=heads),
                          self.questions, self.recall)

    def layer_gaps(self) -> list[float]:
        """Per modeled layer, the answer KL when it alone uses the probe's modules (beside the sink tokens)."""
        return self.kls(modeled_layers(self.model.config))

    def head_gaps(self, layer_gaps: list[float], count: int) -> dict[int, list[float]]:
        """For the `count` modeled layers of largest KL, the KL each of their KV heads causes alone."""
        kv, modeled = self.model.config.num_key_value_heads, modeled_layers(self.model.config)
        hard = sorted(range(len(layer_gaps)), key=layer_gaps.__getitem__, reverse=True)[:count]
        cells = [(i, h) for i in hard for h in range(kv)]
        kls = self.kls([modeled[i] for i, _ in cells], heads=[h for _, h in cells])
        return {i: kls[j * kv:(j + 1) * kv] for j, i in enumerate(hard)}


"""What every compile of one document shares: the document, its training set, and each split, capture and
probe made once.

The stages that cost the most do not depend on the budget: the prefill, the training prompts, a capture
for each set of exact tokens, the gap probe of each probe setting. A `Workspace` keeps each of them, on
first use, so that every bank fitted from one document (a budget sweep, the quadrature variant, an
ablation in `nectar eval`) pays only its own fit. It holds data and makes it; it decides nothing (that is
nectar.plan) and fits no bank (that is nectar.compiler).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor

from . import prompts as P
from ..providers.attention import ExactContext
from .capture import Store, capture
from ..config import CompileConfig
from ..model.documents import document_ids
from ..errors import NectarError
from ..model.models import attention_scaling, check_supported, layer_windows
from .plan import Gaps, most, resolve
from ..runtime.prefill import prefill, split_exact
from .probe import SHORT_FIT_EVERY, GapProbe, gap_key
from .refine import TopK, teacher
from .selection import TokenChoice, choose_tokens
from ..model.templates import templates_for
from ..timing import stage

TEACHER_TOPK = 64  # next-token candidates kept from the full-cache model for refinement (the rest: one bucket)


@dataclass(eq=False)
class Document:
    """One document on one model: its token ids, the token layout around it, and its exact prefill."""

    model: object
    tokenizer: object
    ids: list[int]
    templates: dict[str, str]
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def read(cls, model, tokenizer, context, config: CompileConfig) -> Document:
        """`context` (text, or a 1-D tensor of token ids) as the document `config` compiles; refused with what
        to do where there is nothing to compile."""
        check_supported(model)
        templates = templates_for(tokenizer, config)
        ids = document_ids(context, tokenizer, model, config.truncate, templates["document"])
        if len(ids) <= config.sink_tokens:
            raise NectarError(f"the document has only {len(ids)} tokens: nothing to compile beyond the "
                              f"{config.sink_tokens} sink tokens")
        chunk = config.prompts.chunk_tokens
        if config.prompts.holdout == "chunks" and len(P.chunk_bounds(len(ids), chunk)) < 2:
            # Known now, from the length alone: refused before minutes of question writing, not after.
            raise NectarError(f"the document has {len(ids)} tokens, too few to hold out a {chunk}-token chunk for "
                              f"validation: give one of at least {chunk + chunk // 2} tokens, or --set "
                              "prompts.holdout=prompts")
        windows = layer_windows(model.config)
        if all(windows):
            raise NectarError(f"every layer of {model.config.model_type} slides over {windows[0]} tokens: its cache "
                              "is already bounded, and there is nothing for nectar to compile")
        return cls(model, tokenizer, ids, templates)

    @property
    def n(self) -> int:
        return len(self.ids)

    @cached_property
    def full(self) -> ExactContext:
        """Every layer's exact keys and values of the document."""
        with stage(self.timings, "prefill"):
            return prefill(self.model, torch.tensor(self.ids))


@dataclass(eq=False)
class TrainingSet:
    """The training prompts written for a document, and which of them validation holds out."""

    prompts: list[P.Prompt]
    held_out: set[int]

    @classmethod
    def write(cls, document: Document, config: CompileConfig) -> TrainingSet:
        full = document.full
        with stage(document.timings, "prompts"):
            torch.manual_seed(config.seed)
            prompts = P.build_prompts(document.model, document.tokenizer, document.ids, full, document.templates,
                                      config)
        return cls(prompts, P.held_out(prompts, document.n, config.prompts, random.Random(config.seed)))

    @cached_property
    def train(self) -> list[P.Prompt]:
        return _nonempty([p for i, p in enumerate(self.prompts) if i not in self.held_out])

    @cached_property
    def val(self) -> list[P.Prompt]:
        return _nonempty([p for i, p in enumerate(self.prompts) if i in self.held_out])

    @cached_property
    def train_sequences(self) -> list[list[int]]:
        return [p.ids for p in self.train]

    @property
    def val_sequences(self) -> list[list[int]]:
        return [p.ids for p in self.val]

    def pilot_sequences(self, count: int) -> list[list[int]]:
        """`count` training sequences spread evenly through the set, whose queries choose the exact tokens."""
        step = max(1, len(self.train_sequences) // count)
        return self.train_sequences[::step][:count]

    @property
    def kinds(self) -> dict[str, int]:
        return {kind: sum(p.kind == kind for p in self.prompts) for kind in ("recall", "self_study", "generic", "direct")}


def _nonempty(items: list) -> list:
    if not items:
        raise NectarError("the document is too short to split into training and validation prompts: "
                          "give a longer document")
    return items


SplitKey = tuple  # (exact counts per model layer, how they were chosen)


class Workspace:
    """One document on one model, and what its compiles share, each made once on first use.

    `config` is the requested config with its defaults resolved at its own budget; a compile at another
    budget resolves its own (nectar.plan). Public caches, keyed by what each depends on: `splits` and
    `captures` by the exact tokens, `probes` and `gaps` by the probe's setting (probe.gap_key), `times` the
    stage times of each (the document's own are `document.timings`).
    """

    def __init__(self, model, tokenizer, context, config: CompileConfig | None = None):
        self.requested = config or CompileConfig()
        self.document = Document.read(model, tokenizer, context, self.requested)
        self.config = resolve(self.requested, model.config, self.document.n)
        self.splits: dict[SplitKey, tuple[ExactContext, ExactContext]] = {}
        self.captures: dict[tuple[SplitKey, int], tuple[Store, Store]] = {}
        self.probes: dict[tuple, GapProbe] = {}
        self.gaps: dict[tuple, Gaps] = {}
        self.times: dict = {}  # per split key or probe key: its stages' seconds
        self.teacher_time: dict[str, float] = {}
        self._riders: tuple[TopK, TopK] | None = None  # the teacher, collected during a capture
        self._teacher: tuple[list, list] | None = None

    @property
    def model(self):
        return self.document.model

    @property
    def n(self) -> int:
        return self.document.n

    @cached_property
    def training(self) -> TrainingSet:
        return TrainingSet.write(self.document, self.config)

    def key(self, counts: int | tuple = 0, choice: TokenChoice = TokenChoice()) -> SplitKey:
        """What a split and its captures depend on: the counts per layer, and how tokens were chosen if any were."""
        counts = (counts,) * self.model.config.num_hidden_layers if isinstance(counts, int) else tuple(counts)
        return counts, choice if most(counts) else TokenChoice()

    def split(self, counts: int | tuple = 0, choice: TokenChoice = TokenChoice()) -> tuple[ExactContext, ExactContext]:
        """(exact tokens: the sinks and the `counts` per head of each layer that rank highest by `choice`; the
        rest, which modules learn)."""
        key = self.key(counts, choice)
        if key not in self.splits:
            chosen = None
            if most(key[0]):
                with stage(self.times.setdefault(key, {}), "choose exact tokens"):
                    chosen = choose_tokens(self._pilot_queries(), self.document.full, attention_scaling(self.model),
                                           self.config.sink_tokens, *key)
            self.splits[key] = split_exact(self.document.full, self.config.sink_tokens, chosen)
        return self.splits[key]

    def _pilot_queries(self) -> Tensor:
        """Queries that choose the exact tokens. Queries do not depend on which tokens are exact, so a capture
        without them serves when there is one (rows evenly spread over it); else a few sequences'."""
        pilot = self.training.pilot_sequences(self.config.pilot_prompts)
        made = [key for key in self.captures if key[0] == self.key(0)]
        if not made:
            return capture(self.model, pilot, self.n, self.document.full, None, self.config.batch_size,
                           "choose exact tokens").q
        q = self.captures[made[0]][0].q
        rows = self.model.config.num_attention_heads // self.model.config.num_key_value_heads * sum(map(len, pilot))
        return q[:, torch.linspace(0, q.shape[1] - 1, min(rows, q.shape[1])).long()]

    def capture(self, counts: int | tuple = 0, choice: TokenChoice = TokenChoice(), every: int = 1,
                teacher: bool = False) -> tuple[Store, Store]:
        """(train, validation) stores of every `every`-th sequence for a split, on the model's device (the fit
        runs where the model does). With `teacher`, a first capture of every sequence also collects the
        full-cache model's top-k next tokens for refinement: a capture without modules driving it is the
        full-cache model, so its logits are the teacher's."""
        key = self.key(counts, choice)
        if (key, every) not in self.captures:
            training = self.training  # written (and timed) before the capture's clock starts
            riders = (None, None)
            if teacher and every == 1 and self._riders is None and self._teacher is None:
                riders = self._riders = (TopK(training.train_sequences, TEACHER_TOPK),
                                         TopK(training.val_sequences, TEACHER_TOPK))
            name = "capture" if every == 1 else "capture (probe)"
            self.split(*key)  # chosen (and timed) before the capture's clock starts, not inside it
            with stage(self.times.setdefault(key, {}), name):
                self.captures[key, every] = self._capture(key, every, None, riders)
        return self.captures[key, every]

    def capture_driven(self, counts: tuple, choice: TokenChoice, bank, timings: dict) -> tuple[Store, Store]:
        """(train, validation) stores whose queries come from the model running on `bank`, as the modules below
        each layer will shape them at inference, targets still exact; every other sequence's, not kept."""
        with stage(timings, "capture on-policy"):
            return self._capture(self.key(counts, choice), SHORT_FIT_EVERY, bank, (None, None))

    def _capture(self, key: SplitKey, every: int, drive, riders: tuple) -> tuple[Store, Store]:
        sinks, rest = self.split(*key)
        seqs = ((self.training.train_sequences[::every], "train"), (self.training.val_sequences[::every], "val"))
        return tuple(capture(self.model, s, self.n, rest, sinks, self.config.batch_size, f"capture {name}",
                             drive=drive, on_logits=collect).to(self.model.device)
                     for (s, name), collect in zip(seqs, riders))

    def teacher(self) -> tuple[list, list]:
        """The full-cache model's top-k next tokens on (train, validation) sequences, for refinement."""
        if self._teacher is not None:
            return self._teacher
        if self._riders is not None and all(t is not None for c in self._riders for t in c.out):  # not cut short
            self._teacher = self._riders[0].out, self._riders[1].out
            return self._teacher
        full, size, training = self.document.full, self.config.batch_size, self.training
        with stage(self.teacher_time, "teacher"):
            self._teacher = tuple(teacher(self.model, seqs, self.n, full, None, TEACHER_TOPK, size)
                                  for seqs in (training.train_sequences, training.val_sequences))
        return self._teacher

    def probe(self, config: CompileConfig, heads: bool = False) -> Gaps:
        """The gap probe's measurement at `config`'s probe setting: each modeled layer's KL, and with `heads`
        each KV head's in the `head_gap_layers` hardest layers."""
        key = gap_key(config)
        if key not in self.probes:
            times = self.times.setdefault(key, {})
            # With no exact tokens the main fit's capture serves; else the probe's own, of fewer sequences.
            stores = self.capture(0, every=SHORT_FIT_EVERY if config.exact_share else 1,
                                  teacher=bool(config.refine_steps))
            with stage(times, "probe"):
                probe = GapProbe.fit(self.model, self.document.full, self.n, self.split(0)[0], self.training.train,
                                     stores, config, self.config.batch_size)
            with stage(times, "layer gaps"):
                self.probes[key], self.gaps[key] = probe, Gaps(probe.layer_gaps())
        if not (heads and config.head_gap_layers):
            return self.gaps[key]
        if (key, config.head_gap_layers) not in self.gaps:
            layers = self.gaps[key].layers
            with stage(self.times[key], "head gaps"):
                self.gaps[key, config.head_gap_layers] = Gaps(layers, self.probes[key].head_gaps(
                    layers, config.head_gap_layers))
        return self.gaps[key, config.head_gap_layers]


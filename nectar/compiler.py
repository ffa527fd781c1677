"""The pipeline: text -> tokens -> prefill -> prompts -> capture -> fit -> evaluate -> Artifact.

A `Workbench` holds one document on one model and makes each stage once, on first use, so that every
bank fitted from it (a budget sweep, the quadrature variant, an allocation ablation) pays only its fit.
"""
from __future__ import annotations

import random
from dataclasses import replace
from functools import cached_property

import torch
from torch import Tensor

from . import prompts as P
from .artifact import Artifact, Bank, build_manifest
from .budget import allocate, head_gaps, params_per_module, uniform_exact
from .attention import ExactContext
from .capture import Store, capture
from .config import EXACT_SHARE, EXACT_SHARE_EVEN, MIN_MODULE_WIDTH, CompileConfig
from .documents import document_ids
from .errors import NectarError
from .evaluate import validation_metrics, warn_if_useless
from .fit import bank_errors, fit
from .models import attention_scaling, check_supported, head_dim, layer_windows, modeled_layers
from .modules import MLPBank
from .prefill import prefill, split_exact
from .probe import SHORT_FIT_EVERY, GapProbe, fit_probe, gap_key
from .quadrature import QuadratureBank
from .quant import as_stored
from .refine import TopK, kind_weights, refine, teacher
from .selection import TokenChoice, choose_tokens
from .templates import templates_for
from .timing import stage as _stage

TEACHER_TOPK = 64  # next-token candidates kept from the full-cache model for refinement (the rest: one bucket)
# Config fields whose default (None) the workbench decides per model, document and budget.
RESOLVED = ("exact_share", "exact_value_bits")
PILOT_SEQUENCES = 64  # training sequences whose queries choose the exact tokens


class Workbench:
    """One document on one model: prefill, prompts and captures, each made once on first use."""

    def __init__(self, model, tokenizer, context, config: CompileConfig | None = None):
        check_supported(model)
        self.model, self.tokenizer = model, tokenizer
        self.config = config or CompileConfig()
        self.templates = templates_for(tokenizer, self.config)
        self.doc_ids = document_ids(context, tokenizer, model, self.config.truncate, self.templates["document"])
        self.n = len(self.doc_ids)
        if self.n <= self.config.sink_tokens:
            raise NectarError(f"the document has only {self.n} tokens: nothing to compile beyond the "
                              f"{self.config.sink_tokens} sink tokens")
        windows = layer_windows(model.config)
        if all(windows):
            raise NectarError(f"every layer of {model.config.model_type} slides over {windows[0]} tokens: its cache "
                              "is already bounded, and there is nothing for nectar to compile")
        # As asked, before defaults that depend on the budget are decided: each compile of a sweep decides its own.
        self.requested = self.config
        self.config = self._resolved(self.config)
        self.timings: dict[str, float] = {}
        self._splits: dict[tuple, tuple[ExactContext, ExactContext]] = {}
        self._stores: dict[tuple, tuple[Store, Store]] = {}
        self._stage_times: dict[tuple, dict[str, float]] = {}  # per split (counts, choice): its own capture stages
        self.probe = GapProbe(self)  # where the KL is, for the `gap` allocation
        self._teacher_time: dict[str, float] = {}  # only compiles that refine pay for the teacher
        self._riders: tuple | None = None  # the teacher, collected during a capture
        self._refining = False  # whether the compile under way will need the teacher (set by each compile)

    @cached_property
    def full(self) -> ExactContext:
        with _stage(self.timings, "prefill"):
            return prefill(self.model, torch.tensor(self.doc_ids))

    def _resolved(self, config: CompileConfig) -> CompileConfig:
        """The config with its exact share decided: the default one, or none on sliding-window models; and the
        bits of the exact values written out, so that the artifact says how it stores them."""
        config = replace(config, exact_value_bits=config.value_bits)
        slides = any(layer_windows(self.model.config))
        if config.exact_share is None:
            share = 0.0 if slides else EXACT_SHARE if config.allocation == "gap" else EXACT_SHARE_EVEN
            return replace(config, exact_share=self._default_share(config, share))
        if slides and config.exact_share:
            raise NectarError("exact_share is not supported on models with sliding-window layers yet: set it to 0")
        return config

    def _default_share(self, config: CompileConfig, share: float) -> float:
        """`share`, or less where a small budget would leave the modules narrower than MIN_MODULE_WIDTH (or
        no room at all, as on a short document): each token a module gives up buys less than its width."""
        for step in range(round(share / 0.05), 0, -1):
            chosen = replace(config, exact_share=round(step * 0.05, 2))
            try:
                per_module = params_per_module(self.model, self.n, chosen, self._uniform_exact(chosen))
            except NectarError:
                continue
            if min(self.mlp_bank(chosen, per_module).target_widths) >= MIN_MODULE_WIDTH:
                return chosen.exact_share
        return 0.0

    def _uniform_exact(self, config: CompileConfig) -> int:
        return uniform_exact(self.n, config, head_dim(self.model.config))

    def exact_counts(self, config: CompileConfig) -> tuple[int, ...]:
        """Tokens kept exact per (layer, head) beyond the sinks, per model layer: `exact_share` of the budget's
        tokens, the same in every layer, or under the `gap` allocation in proportion to the KL each layer
        causes, since a layer whose module barely moves the answer needs no exact tokens at all."""
        layers, kv = self.model.config.num_hidden_layers, self.model.config.num_key_value_heads
        per_layer = self._uniform_exact(config)
        if not per_layer or config.allocation != "gap":
            return (per_layer,) * layers
        gaps = self.gaps(config)
        if config.head_gap_layers:  # by KV head: a tuple of counts per layer
            gaps = head_gaps(gaps, self.probe.head_gaps(config), kv)
        most = config.exact_head_cap * (self.n - config.sink_tokens)
        counts = allocate(gaps, per_layer, low=0.0, high=max(1.0, most / per_layer))
        return tuple(counts) if not config.head_gap_layers else tuple(tuple(counts[i: i + kv])
                                                                      for i in range(0, len(counts), kv))

    def split(self, counts: int | tuple[int, ...] = 0, choice: TokenChoice = TokenChoice()
              ) -> tuple[ExactContext, ExactContext]:
        """(exact tokens: the sinks and the `counts` per head of each layer that rank highest by `choice`; the
        rest, which modules learn)."""
        key = self._key(counts, choice)
        if key not in self._splits:
            chosen = None
            if _most(key[0]):
                with _stage(self._stage_times.setdefault(key, {}), "choose exact tokens"):
                    chosen = choose_tokens(self._pilot_queries(), self.full, attention_scaling(self.model),
                                           self.config.sink_tokens, key[0], key[1])
            self._splits[key] = split_exact(self.full, self.config.sink_tokens, chosen)
        return self._splits[key]

    def _key(self, counts: int | tuple[int, ...], choice: TokenChoice = TokenChoice()) -> tuple:
        """What a split and its captures depend on: the counts, and how tokens were chosen if any were."""
        counts = self._counts(counts)
        return counts, choice if _most(counts) else TokenChoice()

    def _pilot_queries(self) -> Tensor:
        """Queries that choose the exact tokens. Queries do not depend on which tokens are exact, so the
        probe's capture serves when there is one (rows evenly spread over it); else a few sequences'."""
        pilot = self.pilot_sequences
        made = [key for key in self._stores if key[0] == self._key(0)]
        if not made:
            return capture(self.model, pilot, self.n, self.full, None, self.config.batch_size, "choose exact tokens").q
        q = self._stores[made[0]][0].q
        rows = self.model.config.num_attention_heads // self.model.config.num_key_value_heads * sum(map(len, pilot))
        return q[:, torch.linspace(0, q.shape[1] - 1, min(rows, q.shape[1])).long()]

    def _counts(self, counts: int | tuple[int, ...]) -> tuple[int, ...]:
        return (counts,) * self.model.config.num_hidden_layers if isinstance(counts, int) else tuple(counts)

    @property
    def pilot_sequences(self) -> list[list[int]]:
        step = max(1, len(self.train_sequences) // PILOT_SEQUENCES)
        return self.train_sequences[::step][:PILOT_SEQUENCES]

    @cached_property
    def prompts(self) -> list[P.Prompt]:
        full = self.full
        with _stage(self.timings, "prompts"):
            torch.manual_seed(self.config.seed)
            return P.build_prompts(self.model, self.tokenizer, self.doc_ids, full, self.templates, self.config)

    @cached_property
    def held_out(self) -> set[int]:
        """Indices of the prompts held out of training, for validation (`PromptConfig.holdout`)."""
        return P.held_out(self.prompts, self.n, self.config.prompts, random.Random(self.config.seed))

    @cached_property
    def train_prompts(self) -> list[P.Prompt]:
        return self._nonempty([p for i, p in enumerate(self.prompts) if i not in self.held_out])

    @cached_property
    def train_sequences(self) -> list[list[int]]:
        return [p.ids for p in self.train_prompts]

    @cached_property
    def val_prompts(self) -> list[P.Prompt]:
        return self._nonempty([p for i, p in enumerate(self.prompts) if i in self.held_out])

    @staticmethod
    def _nonempty(items: list) -> list:
        if not items:
            raise NectarError("the document is too short to split into training and validation prompts: "
                              "give a longer document")
        return items

    @property
    def kinds(self) -> dict[str, int]:
        return {kind: sum(p.kind == kind for p in self.prompts) for kind in ("recall", "self_study", "generic", "direct")}

    def stores(self, counts: int | tuple[int, ...] = 0, drive=None, timings: dict | None = None,
               every: int = 1, choice: TokenChoice = TokenChoice()) -> tuple[Store, Store]:
        """(train, validation) stores for the split with `counts` exact tokens chosen by `choice`, on the
        model's device (the fit runs where the model does), of every `every`-th sequence. With `drive`,
        queries come from the model running on that bank, are not kept, and their capture is timed into
        `timings`."""
        key = self._key(counts, choice)
        if drive is None and (key, every) in self._stores:
            return self._stores[key, every]
        train, val = self.train_sequences[::every], [p.ids for p in self.val_prompts][::every]
        sinks, rest = self.split(*key)
        size, device = self.config.batch_size, self.model.device
        times = self._stage_times.setdefault(key, {}) if drive is None else timings
        collectors = self._teacher_riders(train, val) if drive is None and every == 1 else (None, None)
        stage = "capture on-policy" if drive is not None else "capture" if every == 1 else "capture (probe)"
        with _stage(times, stage):
            stores = tuple(capture(self.model, seqs, self.n, rest, sinks, size, f"capture {name}", drive,
                                   on_logits=collect).to(device)
                           for (seqs, name), collect in zip(((train, "train"), (val, "val")), collectors))
        if drive is None:
            self._stores[key, every] = stores
        return stores

    def _teacher_riders(self, train: list[list[int]], val: list[list[int]]) -> tuple:
        """Collectors of the full-cache teacher for a capture to feed, when the compile will refine: a capture
        without modules driving it is the full-cache model, so its logits are the teacher's."""
        if not self._refining or self._riders is not None:
            return None, None
        self._riders = TopK(train, TEACHER_TOPK), TopK(val, TEACHER_TOPK)
        return self._riders

    @cached_property
    def teachers(self) -> tuple[list, list]:
        """The full-cache model's top-k next tokens on (train, validation) sequences, for refinement only."""
        if self._riders is not None and all(t is not None for c in self._riders for t in c.out):  # not cut short
            return self._riders[0].out, self._riders[1].out
        full, size = self.full, self.config.batch_size
        with _stage(self._teacher_time, "teacher"):
            return (teacher(self.model, self.train_sequences, self.n, full, None, TEACHER_TOPK, size),
                    teacher(self.model, [p.ids for p in self.val_prompts], self.n, full, None, TEACHER_TOPK, size))

    def compile(self, **changes) -> Artifact:
        """Fit one bank; `changes` override fitting fields of the config (budget, variant, allocation, fit...)."""
        config = self._resolved(replace(self.requested, **changes))
        params_per_module(self.model, self.n, config, self._uniform_exact(config))  # refused before any work
        self._refining, gap_times = bool(config.refine_steps), {}
        if config.allocation == "gap" and (config.variant == "mlp" or config.exact_share):
            self.exact_counts(config) if config.exact_share else self.gaps(config)
            gap_times = dict(self.probe.times[gap_key(config)])
        counts, choice = self.exact_counts(config), TokenChoice.of(config)
        train_store, val_store = self.stores(counts, choice=choice)
        sinks = as_stored(self.split(counts, choice)[0], config.sink_tokens, config.exact_bits, config.value_bits)
        timings = {**self.timings, **self._stage_times[self._key(counts, choice)], **gap_times}
        if gap_times and _most(counts):  # the probe's own capture, of the document without exact tokens
            timings["capture (probe)"] = self._stage_times[self._key(0)]["capture (probe)"]
        with _stage(timings, "fit"):
            bank = self._bank(config, counts, train_store, val_store).to(self.model.device)
            fit_log = fit(bank, train_store, val_store, config.fit, seed=config.seed)
            bank.eval().requires_grad_(False)
        for _ in range(config.onpolicy_rounds if config.onpolicy_steps else 0):
            # Queries as the modules below each layer will shape them at inference, targets still exact.
            train_store, val_store = self.stores(counts, drive=bank, timings=timings, every=SHORT_FIT_EVERY,
                                                 choice=choice)
            with _stage(timings, "fit on-policy"):
                steps = replace(config.fit, steps=config.onpolicy_steps, warmup=config.onpolicy_steps // 10)
                fit_log["onpolicy"] = fit(bank.requires_grad_(True), train_store, val_store, steps, seed=config.seed,
                                          warm=True)
                bank.eval().requires_grad_(False)
        if config.refine_steps:
            train_teacher, val_teacher = self.teachers
            timings.update(self._teacher_time)
            with _stage(timings, "refine"):
                fit_log["refine"] = refine(self.model, bank, sinks, self.train_sequences, train_teacher,
                                           [p.ids for p in self.val_prompts], val_teacher, self.n, config.refine_steps,
                                           config.refine_lr, seed=config.seed, anchor=train_store,
                                           anchor_weight=config.refine_anchor, share_power=config.fit.share_power,
                                           weights=kind_weights(config.refine_recall, self.train_prompts, self.val_prompts))
        bank.round_weights()  # evaluate what the artifact will hold
        with _stage(timings, "evaluate"):
            metrics = validation_metrics(self.model, bank, sinks, self.full, self.n, self.val_prompts,
                                         val_store, config.batch_size)
        metrics["val_set"] = [{"kind": p.kind, "question": p.question, "answer_ids": p.answer_ids}
                              for p in self.val_prompts]
        metrics.update(fit_steps=fit_log["steps"], fit_history=fit_log["history"], refine=fit_log.get("refine"),
                       onpolicy=fit_log.get("onpolicy"), train_tokens=sum(map(len, self.train_sequences)),
                       prompts=self.kinds, exact_tokens=_most(counts), exact_per_layer=[_most(c) for c in counts],
                       exact_per_head=[list(c) for c in counts] if _most(counts) and not isinstance(counts[0], int) else None,
                       layer_gaps=self.probe.layers.get(gap_key(config)) if gap_times else None)
        timings["total"] = round(sum(timings.values()), 1)
        manifest = build_manifest(self.model, self.tokenizer, self.doc_ids, self.templates, bank, config, metrics,
                                  timings)
        sinks = replace(sinks, keys=[k.cpu() for k in sinks.keys], values=[v.cpu() for v in sinks.values],
                        bias=None if sinks.bias is None else [None if b is None else b.cpu() for b in sinks.bias])
        artifact = Artifact(manifest, bank.cpu(), sinks, self.doc_ids if config.keep_document else None)
        artifact.manifest["memory_ratio"] = artifact.memory_ratio()
        # So that an evaluation's sweep from this artifact decides the default again at each budget.
        artifact.manifest["defaulted"] = [f for f in RESOLVED if getattr(self.requested, f) is None and f not in changes]
        warn_if_useless(metrics["questions"])
        return artifact

    def _bank(self, config: CompileConfig, counts: tuple[int, ...], train_store: Store, val_store: Store) -> Bank:
        cfg, d = self.model.config, head_dim(self.model.config)
        per_module = params_per_module(self.model, self.n, config, self._uniform_exact(config))
        if config.variant == "quadrature":
            modeled = modeled_layers(cfg)
            bank = self._on_modeled(QuadratureBank.for_budget(len(modeled), cfg.num_key_value_heads, d, per_module,
                                                              attention_scaling(self.model)))
            _, rest = self.split(counts, TokenChoice.of(config))
            keys, values = ([part[layer] for layer in modeled] for part in (rest.keys, rest.values))
            bank.init_from(torch.cat(keys).float().cpu(), torch.cat(values).float().cpu(), seed=config.seed)
            return bank
        uniform = self.mlp_bank(config, per_module)
        if config.allocation == "uniform":
            return uniform
        if config.allocation == "gap":
            # The KL a layer causes alone is very skewed (one layer in 30 can carry most of it): its square
            # root, within 0.5x-6x of uniform, moves capacity there without starving the others.
            gaps = torch.tensor(self.gaps(config)).clamp_min(0).sqrt().tolist()
            shares = allocate(gaps, per_module, low=0.5, high=6.0)
        else:
            probe = fit_probe(self.mlp_bank(config, per_module), config, train_store, val_store)
            merged = bank_errors(probe, val_store)["merged_rel"]
            shares = allocate(merged.view(probe.layers, -1).mean(1).tolist(), per_module)
        # Widths round down per layer; shrink until no more numbers than the uniform bank's, for a fair match.
        for scale in torch.linspace(1.0, 0.8, 41).tolist():
            bank = self.mlp_bank(config, [int(p * scale) for p in shares])
            if bank.num_params() <= uniform.num_params():
                return bank
        return uniform

    def mlp_bank(self, config: CompileConfig, params: int | list[int]) -> MLPBank:
        cfg, shape = self.model.config, (config.depth, config.score_share, config.weight_bits, config.target_softmax)
        # Initialised from the config's seed, not from whatever drew on the global generator before: a bank
        # compiled second in one workbench (an ablation in `nectar eval`) starts where it would alone.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            return self._on_modeled(MLPBank.for_budget(len(modeled_layers(cfg)), cfg.num_key_value_heads,
                                                       head_dim(cfg), params, *shape))

    def _on_modeled(self, bank: Bank) -> Bank:
        """A bank for the model's global layers only, called by model layer (None: every layer has modules)."""
        modeled = modeled_layers(self.model.config)
        bank.model_layers = modeled if len(modeled) < self.model.config.num_hidden_layers else None
        return bank

    def gaps(self, config: CompileConfig) -> list[float]:
        """Per modeled layer, the answer KL when it alone uses the gap probe's modules (nectar.probe)."""
        return self.probe.layer_gaps(config)


def _most(counts) -> int:
    """The most exact tokens any head keeps, of counts per layer (each a number, or one per KV head)."""
    return counts if isinstance(counts, int) else max((_most(c) for c in counts), default=0)


def compile(model, tokenizer, context, config: CompileConfig | None = None) -> Artifact:
    """Compile a document (text, or a 1-D tensor of token ids) into an Artifact for `model`."""
    return Workbench(model, tokenizer, context, config).compile()

"""text -> tokens -> prefill -> prompts -> capture -> fit -> evaluate -> Artifact."""
from __future__ import annotations

import random
import time
from contextlib import contextmanager
from dataclasses import replace
from functools import cached_property

import torch

from . import prompts as P
from .artifact import Artifact, build_manifest
from .attach import attention_layers, prefill, split_context
from .attention import ExactContext, NoContext
from .capture import Store, capture
from .config import CompileConfig
from .errors import NectarError
from .evaluate import next_token_fidelity, pool
from .fit import errors, fit
from .generate import generate_ids, question_ids
from .models import head_dim
from .modules import Bank, MLPBank, QuadratureBank
from .refine import refine

TEACHER_TOPK = 32  # next-token candidates kept from the full-cache model for refinement
QUESTION_ROOM = 512  # positions left after the document for a question and its answer (or a quarter)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def templates_for(tokenizer, config: CompileConfig) -> dict[str, str]:
    document, question = P.default_templates(tokenizer)
    return {"document": config.document_template or document, "question": config.question_template or question}


def document_ids(context, tokenizer, model, config: CompileConfig, template: str) -> list[int]:
    """Token ids of the document: a 1-D tensor verbatim, or text wrapped by the document template."""
    positions = model.config.max_position_embeddings
    limit = positions - min(QUESTION_ROOM, positions // 4)
    if isinstance(context, torch.Tensor):
        if context.dim() != 1 or context.numel() == 0 or context.is_floating_point():
            raise NectarError("a token-id context must be a non-empty 1-D integer tensor")
        ids = context.tolist()
        return _fit_length(ids, limit, config.truncate, len(ids))
    if not isinstance(context, str) or not context.strip():
        raise NectarError("the document is empty: give a text with some content")
    before, after = template.split("{document}")
    pre, body, post = encode(tokenizer, before), encode(tokenizer, context), encode(tokenizer, after)
    room = limit - len(pre) - len(post)
    return pre + _fit_length(body, room, config.truncate, len(pre) + len(body) + len(post)) + post


def _fit_length(ids: list[int], limit: int, truncate: bool, total: int) -> list[int]:
    if len(ids) <= limit:
        return ids
    if not truncate:
        raise NectarError(f"the document has {total} tokens, more than the {limit} this model can hold before "
                          f"a question: pass --truncate (truncate=True) to keep the first {limit}")
    return ids[:limit]


@contextmanager
def _stage(timings: dict, name: str):
    start = time.perf_counter()
    print(f"[nectar] {name}...", flush=True)
    yield
    timings[name] = round(time.perf_counter() - start, 1)


def build_prompts(model, tokenizer, doc_ids, full: ExactContext, templates, config: CompileConfig):
    """Training prompts of every kind, each with teacher-forcing answer ids."""
    cfg = config.prompts
    prompts, requests, chunks = P.plan(doc_ids, tokenizer, cfg, config.seed)
    if requests:
        chat = [encode(tokenizer, _chat(tokenizer, r)) for r in requests]
        written = generate_ids(model, tokenizer, chat, 0, NoContext(), max_new_tokens=40, sample=True,
                               batch_size=config.batch_size, desc="write questions")
        for chunk, ids in zip(chunks, written):
            question = P.clean_question(tokenizer.decode(ids, skip_special_tokens=True))
            if question:
                prompts.append(P.Prompt("self_study", chunk, question))
    open_ = [p for p in prompts if p.answer_ids is None]
    answers = generate_ids(model, tokenizer, [question_ids(tokenizer, templates["question"], p.question) for p in open_],
                           len(doc_ids), full, max_new_tokens=cfg.answer_tokens, batch_size=config.batch_size,
                           desc="answer with full cache")
    for prompt, answer in zip(open_, answers):
        prompt.answer_ids = answer
    return [p for p in prompts if p.answer_ids]


def _chat(tokenizer, text: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return text + "\n"


class Workbench:
    """One document on one model: prefill, prompts and captures, each made once on first use.

    Every bank fitted here (a budget sweep, the quadrature variant, an allocation ablation) shares
    them, so only the fit itself is paid again.
    """

    def __init__(self, model, tokenizer, context, config: CompileConfig | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.config = config or CompileConfig()
        self.templates = templates_for(tokenizer, self.config)
        self.doc_ids = document_ids(context, tokenizer, model, self.config, self.templates["document"])
        self.n = len(self.doc_ids)
        if self.n <= self.config.sink_tokens:
            raise NectarError(f"the document has only {self.n} tokens: nothing to compile beyond the "
                              f"{self.config.sink_tokens} exact sink tokens")
        self.timings: dict[str, float] = {}

    @cached_property
    def full(self) -> ExactContext:
        with _stage(self.timings, "prefill"):
            return prefill(self.model, torch.tensor(self.doc_ids))

    @cached_property
    def split(self) -> tuple[ExactContext, ExactContext]:
        """(exact sink tokens, the rest that modules learn)."""
        return split_context(self.full, self.config.sink_tokens)

    @cached_property
    def prompts(self) -> tuple[list[list[int]], list[P.Prompt]]:
        """(training sequences, validation prompts): validation prompts come from held-out chunks."""
        config, full = self.config, self.full
        with _stage(self.timings, "prompts"):
            torch.manual_seed(config.seed)
            prompts = build_prompts(self.model, self.tokenizer, self.doc_ids, full, self.templates, config)
            _, val_chunks = P.split_chunks(len(P.chunk_bounds(self.n, config.prompts.chunk_tokens)),
                                           config.prompts.val_fraction, random.Random(config.seed))
            for p in prompts:
                p.question_ids = question_ids(self.tokenizer, self.templates["question"], p.question)
            train = [p.question_ids + p.answer_ids for p in prompts if p.chunk not in val_chunks]
            val = [p for p in prompts if p.chunk in val_chunks]
        if not train or not val:
            raise NectarError("the document is too short to split into training and validation chunks: "
                              "give a longer document")
        self.kinds = {kind: sum(p.kind == kind for p in prompts) for kind in ("recall", "self_study", "generic")}
        return train, val

    @cached_property
    def stores(self) -> tuple[Store, Store, list | None, list | None]:
        """(train store, validation store, train teacher, validation teacher)."""
        train, val = self.prompts
        sinks, rest = self.split
        topk = TEACHER_TOPK if self.config.refine_steps else 0
        size = self.config.batch_size
        with _stage(self.timings, "capture"):
            train_store, teacher = capture(self.model, train, self.n, rest, sinks, size, "capture train", topk)
            val_seqs = [p.question_ids + p.answer_ids for p in val]
            val_store, val_teacher = capture(self.model, val_seqs, self.n, rest, sinks, size, "capture val", topk)
        return train_store, val_store, teacher, val_teacher

    @cached_property
    def device_stores(self) -> tuple[Store, Store]:
        """(train, validation) stores on the model's device: the fit runs where the model does."""
        train_store, val_store, _, _ = self.stores
        return train_store.to(self.model.device), val_store.to(self.model.device)

    def compile(self, **changes) -> Artifact:
        """Fit one bank; `changes` override fitting fields of the config (budget, variant, allocation, fit...)."""
        config = replace(self.config, **changes)
        train, val = self.prompts
        _, _, teacher, val_teacher = self.stores
        train_store, val_store = self.device_stores
        sinks, rest = self.split
        timings = dict(self.timings)
        with _stage(timings, "fit"):
            bank = self._bank(config, train_store, val_store).to(self.model.device)
            fit_log = fit(bank, train_store, val_store, config.fit, seed=config.seed)
            bank.eval().requires_grad_(False)
        if config.refine_steps:
            with _stage(timings, "refine"):
                val_seqs = [p.question_ids + p.answer_ids for p in val]
                fit_log["refine"] = refine(self.model, bank, sinks, train, teacher, val_seqs, val_teacher, self.n,
                                           config.refine_steps, seed=config.seed)
        with _stage(timings, "evaluate"):
            metrics = _metrics(self.model, bank, val_store, val, self.n, self.full, sinks, config)
        metrics["val_set"] = [{"kind": p.kind, "question": p.question, "answer_ids": p.answer_ids} for p in val]
        metrics.update(fit_steps=fit_log["steps"], fit_history=fit_log["history"], refine=fit_log.get("refine"),
                       train_tokens=sum(map(len, train)), prompts=self.kinds)
        timings["total"] = round(sum(timings.values()), 1)
        manifest = build_manifest(self.model, self.tokenizer, self.doc_ids, self.templates, bank, config, metrics,
                                  timings)
        sinks = ExactContext([k.cpu() for k in sinks.keys], [v.cpu() for v in sinks.values])
        artifact = Artifact(manifest, bank.cpu(), sinks, self.doc_ids if config.keep_document else None)
        artifact.manifest["memory_ratio"] = artifact.memory_ratio()
        return artifact

    def _bank(self, config: CompileConfig, train_store: Store, val_store: Store) -> Bank:
        cfg, d = self.model.config, head_dim(self.model.config)
        per_module = params_per_module(self.model, self.n, config)
        if config.variant == "quadrature":
            bank = QuadratureBank.for_budget(cfg.num_hidden_layers, cfg.num_key_value_heads, d, per_module,
                                             attention_scaling(self.model))
            _, rest = self.split
            bank.init_from(torch.cat(rest.keys).float().cpu(), torch.cat(rest.values).float().cpu(), seed=config.seed)
            return bank
        def bank_for(params) -> MLPBank:
            return MLPBank.for_budget(cfg.num_hidden_layers, cfg.num_key_value_heads, d, params, config.depth,
                                      config.score_share)

        uniform = bank_for(per_module)
        if config.allocation == "uniform":
            return uniform
        shares = allocate(self._probe(bank_for(per_module), config, train_store, val_store), per_module)
        # Widths round down per layer; shrink until no more numbers than the uniform bank's, for a fair match.
        for scale in torch.linspace(1.0, 0.8, 41).tolist():
            bank = bank_for([int(p * scale) for p in shares])
            if bank.num_params() <= uniform.num_params():
                return bank
        return uniform

    def _probe(self, probe: MLPBank, config: CompileConfig, train_store: Store, val_store: Store) -> list[float]:
        """Each layer's merged-output error after a short fit of `probe` (uniform): where capacity is short."""
        steps = config.probe_steps
        fit(probe.to(train_store.q.device), train_store, val_store, replace(config.fit, steps=steps, eval_every=steps, warmup=steps // 10),
            seed=config.seed, progress=False)
        merged = errors(probe, val_store)["merged_rel"]
        return merged.view(probe.layers, -1).mean(1).tolist()


def allocate(difficulty: list[float], per_module: int, low: float = 0.25, high: float = 3.0) -> list[int]:
    """Split a uniform budget across layers in proportion to difficulty, each within [low, high] x uniform.

    The total never exceeds the uniform one, so both allocations compare at the same bytes.
    """
    share = torch.tensor(difficulty, dtype=torch.float64).clamp_min(1e-9)
    share = share / share.mean()
    for _ in range(50):  # clamping moves mass: rescale the unclamped layers until the mean is 1 again
        share = share.clamp(low, high)
        free = (share > low) & (share < high)
        excess = share.sum() - len(share)
        if abs(excess) < 1e-6 or not free.any():
            break
        share = torch.where(free, share - excess * share / share[free].sum(), share)
    share = share.clamp(low, high)
    share = share / max(1.0, share.mean().item())
    return [int(per_module * s) for s in share.tolist()]


def compile(model, tokenizer, context, config: CompileConfig | None = None) -> Artifact:
    """Compile a document (text, or a 1-D tensor of token ids) into an Artifact for `model`."""
    return Workbench(model, tokenizer, context, config).compile()


def attention_scaling(model) -> float:
    layer = attention_layers(model)[0]
    return float(getattr(layer, "scaling", head_dim(model.config) ** -0.5))


def params_per_module(model, n: int, config: CompileConfig) -> int:
    """Numbers per (layer, KV head) module so that modules + exact sink K/V = budget x the document's KV."""
    d = head_dim(model.config)
    per_module = config.budget * 2 * n * d - config.sink_tokens * 2 * d
    if per_module <= 0:
        raise NectarError(f"budget {config.budget} leaves no room for modules: raise --budget")
    return int(per_module)


def _metrics(model, bank, val_store, val_prompts, n, full, sinks, config) -> dict:
    per_module = errors(bank, val_store)
    kv = model.config.num_key_value_heads
    per_layer = {k: v.view(-1, kv).mean(1).tolist() for k, v in per_module.items()}
    methods = {"nectar": (bank, sinks), "no_document": (NoContext(), None)}
    fidelity = {}
    for kind in sorted({p.kind for p in val_prompts}):
        pairs = [(p.question_ids, p.answer_ids) for p in val_prompts if p.kind == kind]
        fidelity[kind] = next_token_fidelity(model, pairs, n, (full, None), methods, config.batch_size)
    return {"validation": {k: sum(v) / len(v) for k, v in per_layer.items()}, "per_layer": per_layer,
            "fidelity": fidelity, "questions": pooled(fidelity, QUESTION_KINDS), "val_prompts": len(val_prompts)}


QUESTION_KINDS = ("self_study", "generic")  # questions answered in the model's words; recall is verbatim quoting


def pooled(fidelity: dict, kinds) -> dict:
    """Token-weighted answer-token fidelity over several prompt kinds, per method."""
    methods = next(iter(fidelity.values()))
    return {method: pool([fidelity[k][method]["answer"] for k in kinds if k in fidelity]) for method in methods}

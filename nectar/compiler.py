"""text -> tokens -> prefill -> prompts -> capture -> fit -> evaluate -> Artifact."""
from __future__ import annotations

import random
import time
from contextlib import contextmanager

import torch

from . import prompts as P
from .artifact import Artifact, build_manifest
from .attach import prefill, split_context
from .attention import ExactContext, NoContext
from .capture import capture
from .config import CompileConfig
from .errors import NectarError
from .evaluate import next_token_fidelity
from .fit import errors, fit
from .generate import generate_ids, question_ids
from .modules import MLPBank
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


def compile(model, tokenizer, context, config: CompileConfig | None = None) -> Artifact:
    """Compile a document (text, or a 1-D tensor of token ids) into an Artifact for `model`."""
    config = config or CompileConfig()
    torch.manual_seed(config.seed)
    timings: dict[str, float] = {}
    templates = templates_for(tokenizer, config)
    doc_ids = document_ids(context, tokenizer, model, config, templates["document"])
    n = len(doc_ids)
    if n <= config.sink_tokens:
        raise NectarError(f"the document has only {n} tokens: nothing to compile beyond the {config.sink_tokens} "
                          "exact sink tokens")

    with _stage(timings, "prefill"):
        full = prefill(model, torch.tensor(doc_ids))
        sinks, rest = split_context(full, config.sink_tokens)
    with _stage(timings, "prompts"):
        prompts = build_prompts(model, tokenizer, doc_ids, full, templates, config)
        _, val_chunks = P.split_chunks(len(P.chunk_bounds(n, config.prompts.chunk_tokens)),
                                       config.prompts.val_fraction, random.Random(config.seed))
        for p in prompts:
            p.question_ids = question_ids(tokenizer, templates["question"], p.question)
        train = [p.question_ids + p.answer_ids for p in prompts if p.chunk not in val_chunks]
        val = [p for p in prompts if p.chunk in val_chunks]
        if not train or not val:
            raise NectarError("the document is too short to split into training and validation chunks: "
                              "give a longer document")
    with _stage(timings, "capture"):
        topk = TEACHER_TOPK if config.refine_steps else 0
        val_seqs = [p.question_ids + p.answer_ids for p in val]
        train_store, teacher = capture(model, train, n, rest, sinks, config.batch_size, "capture train", topk)
        val_store, val_teacher = capture(model, val_seqs, n, rest, sinks, config.batch_size, "capture val", topk)
    with _stage(timings, "fit"):
        bank = _bank_for(model, n, config)
        fit_log = fit(bank, train_store, val_store, config.fit, seed=config.seed)
        bank.eval().requires_grad_(False)
    if config.refine_steps:
        with _stage(timings, "refine"):
            refined = refine(model, bank, sinks, train, teacher, val_seqs, val_teacher, n, config.refine_steps,
                             seed=config.seed)
            fit_log["refine"] = refined
    with _stage(timings, "evaluate"):
        metrics = _metrics(model, bank, val_store, val, n, full, sinks, config)
    del train_store, val_store
    metrics["val_set"] = [{"kind": p.kind, "question": p.question, "answer_ids": p.answer_ids} for p in val]
    metrics.update(fit_steps=fit_log["steps"], fit_history=fit_log["history"], refine=fit_log.get("refine"),
                   train_tokens=sum(map(len, train)),
                   prompts={kind: sum(p.kind == kind for p in prompts) for kind in ("recall", "self_study", "generic")})
    timings["total"] = round(sum(timings.values()), 1)
    manifest = build_manifest(model, tokenizer, doc_ids, templates, bank, config, metrics, timings)
    artifact = Artifact(manifest, bank, sinks, doc_ids if config.keep_document else None)
    artifact.manifest["memory_ratio"] = artifact.memory_ratio()
    return artifact


def _bank_for(model, n: int, config: CompileConfig) -> MLPBank:
    cfg = model.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    modules = cfg.num_hidden_layers * cfg.num_key_value_heads
    # Module numbers + exact sink keys/values must fit in budget * (KV numbers of the whole document).
    total = config.budget * 2 * n * d * modules - config.sink_tokens * 2 * d * modules
    if total <= 0:
        raise NectarError(f"budget {config.budget} leaves no room for modules: raise --budget")
    return MLPBank.for_budget(cfg.num_hidden_layers, cfg.num_key_value_heads, d, int(total / modules),
                              config.depth, config.score_share)


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
    out = {}
    for method in next(iter(fidelity.values())):
        parts = [fidelity[k][method]["answer"] for k in kinds if k in fidelity]
        tokens = sum(p["tokens"] for p in parts)
        out[method] = {m: sum(p[m] * p["tokens"] for p in parts) / max(tokens, 1) for m in ("agreement", "kl")}
        out[method]["tokens"] = tokens
    return out

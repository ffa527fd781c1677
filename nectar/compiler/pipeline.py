"""The compile: text -> Document -> TrainingSet -> Gaps -> Plan -> captures -> Bank -> Artifact.

`compile_bank` is the whole pipeline on one screen. Each stage is a function of explicit data; what a
stage makes that does not depend on the budget (the prefill, the prompts, the captures, the gap probe)
lives in a `Workspace`, so that the compiles of a sweep or an ablation share it.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ..artifact import Artifact, Bank, build_manifest
from .budget import allocate
from .capture import Store
from ..config import CompileConfig
from ..measure.fidelity import validation_metrics, warn_if_useless
from ..measure.metrics import bank_errors
from .fit import fit
from ..model.models import attention_scaling, head_dim, modeled_layers
from .plan import RESOLVED, Plan, mlp_bank, module_numbers, most, on_modeled, plan, probe_needs, resolve
from .probe import gap_key, fit_probe
from ..providers.quadrature import QuadratureBank
from ..providers.quant import as_stored
from .refine import kind_weights, refine
from ..timing import stage
from .workspace import Workspace


def compile(model, tokenizer, context, config: CompileConfig | None = None) -> Artifact:
    """Compile a document (text, or a 1-D tensor of token ids) into an Artifact for `model`."""
    return compile_bank(Workspace(model, tokenizer, context, config))


def compile_bank(ws: Workspace, **changes) -> Artifact:
    """One artifact from `ws`'s document; `changes` override fields of its config (budget, variant, ...)."""
    config = resolve(replace(ws.requested, **changes), ws.model.config, ws.n)
    the_plan = plan_of(ws, config)
    data = ws.capture(the_plan.counts, the_plan.choice, teacher=bool(config.refine_steps))
    sinks = as_stored(ws.split(the_plan.counts, the_plan.choice)[0], config.sink_tokens, config.exact_bits,
                      config.value_bits)
    timings = _stage_times(ws, the_plan)
    with stage(timings, "fit"):
        bank, log = fit_bank(the_plan, ws, data)
    if config.onpolicy_steps:  # refinement and validation then read the last round's queries
        data, log["onpolicy"] = fit_onpolicy(the_plan, ws, bank, timings)
    if config.refine_steps:
        train_teacher, val_teacher = ws.teacher()
        timings.update(ws.teacher_time)
        with stage(timings, "refine"):
            log["refine"] = refine_bank(config, ws, bank, sinks, data[0], train_teacher, val_teacher)
    bank.round_weights()  # evaluate what the artifact will hold
    with stage(timings, "evaluate"):
        metrics = validation_metrics(ws.model, bank, sinks, ws.document.full, ws.n, ws.training.val, data[1],
                                     ws.config.batch_size)
    artifact = package(ws, the_plan, bank, sinks, metrics, log, timings)
    artifact.manifest["defaulted"] = [f for f in RESOLVED if getattr(ws.requested, f) is None and f not in changes]
    warn_if_useless(metrics["questions"])
    return artifact


def plan_of(ws: Workspace, config: CompileConfig) -> Plan:
    """The plan of a resolved `config` for `ws`'s document, the gap probe run first where it needs one."""
    cfg = ws.model.config
    module_numbers(config, cfg, ws.n)  # a budget with no room is refused before any work
    layers, heads = probe_needs(config, cfg, ws.n)
    return plan(config, cfg, ws.n, ws.probe(config, heads) if layers else None)


def _stage_times(ws: Workspace, the_plan: Plan) -> dict[str, float]:
    """The seconds of each shared stage this compile used: the document's, its split's and its probe's."""
    key = ws.key(the_plan.counts, the_plan.choice)
    probed = dict(ws.times[gap_key(the_plan.config)]) if the_plan.gaps else {}
    timings = {**ws.document.timings, **ws.times[key], **probed}
    if probed and the_plan.exact:  # the probe's own capture, of the document without exact tokens
        timings["capture (probe)"] = ws.times[ws.key(0)]["capture (probe)"]
    return timings


def fit_bank(the_plan: Plan, ws: Workspace, data: tuple[Store, Store]) -> tuple[Bank, dict]:
    """A bank as the plan sizes it, fitted to the captured queries; (bank, fit log)."""
    bank = initial_bank(the_plan, ws, data).to(ws.model.device)
    log = fit(bank, *data, the_plan.config.fit, seed=the_plan.config.seed)
    return bank.eval().requires_grad_(False), log


def fit_onpolicy(the_plan: Plan, ws: Workspace, bank: Bank, timings: dict) -> tuple[tuple[Store, Store], dict]:
    """Refit `bank` on queries the model produces with it in place, `onpolicy_rounds` times; (the last
    round's captures, its fit log)."""
    config = the_plan.config
    steps = replace(config.fit, steps=config.onpolicy_steps, warmup=config.onpolicy_steps // 10)
    for _ in range(config.onpolicy_rounds):
        data = ws.capture_driven(the_plan.counts, the_plan.choice, bank, timings)
        with stage(timings, "fit on-policy"):
            log = fit(bank.requires_grad_(True), *data, steps, seed=config.seed, warm=True)
            bank.eval().requires_grad_(False)
    return data, log


def refine_bank(config: CompileConfig, ws: Workspace, bank: Bank, sinks, anchor: Store, train_teacher,
                val_teacher) -> dict:
    """End-to-end distillation of the bank on the full cache's next tokens (nectar.refine)."""
    training = ws.training
    return refine(ws.model, bank, sinks, training.train_sequences, train_teacher, training.val_sequences,
                  val_teacher, ws.n, config.refine_steps, config.refine_lr, seed=config.seed, anchor=anchor,
                  anchor_weight=config.refine_anchor, share_power=config.fit.share_power,
                  weights=kind_weights(config.refine_recall, training.train, training.val))


def initial_bank(the_plan: Plan, ws: Workspace, data: tuple[Store, Store]) -> Bank:
    """An unfitted bank of the plan's variant and widths."""
    config, cfg = the_plan.config, ws.model.config
    if config.variant == "quadrature":
        modeled = modeled_layers(cfg)
        bank = on_modeled(QuadratureBank.for_budget(len(modeled), cfg.num_key_value_heads, head_dim(cfg),
                                                    the_plan.per_module, attention_scaling(ws.model)), cfg)
        rest = ws.split(the_plan.counts, the_plan.choice)[1]
        keys, values = ([part[layer] for layer in modeled] for part in (rest.keys, rest.values))
        bank.init_from(torch.cat(keys).float().cpu(), torch.cat(values).float().cpu(), seed=config.seed)
        return bank
    uniform = mlp_bank(config, cfg, the_plan.per_module)
    if config.allocation == "uniform":
        return uniform
    shares = the_plan.shares
    if shares is None:  # "probe": by a short fit's per-layer error on this very capture
        probe = fit_probe(mlp_bank(config, cfg, the_plan.per_module), config, *data)
        merged = bank_errors(probe, data[1])["merged_rel"]
        shares = allocate(merged.view(probe.layers, -1).mean(1).tolist(), the_plan.per_module)
    # Widths round down per layer; shrink until no more numbers than the uniform bank's, for a fair match.
    for scale in torch.linspace(1.0, 0.8, 41).tolist():
        bank = mlp_bank(config, cfg, [int(p * scale) for p in shares])
        if bank.num_params() <= uniform.num_params():
            return bank
    return uniform


def package(ws: Workspace, the_plan: Plan, bank: Bank, sinks, metrics: dict, log: dict, timings: dict) -> Artifact:
    """The artifact: the bank and exact tokens on the CPU, and a manifest of what was built and measured."""
    config, counts, training = the_plan.config, the_plan.counts, ws.training
    metrics["val_set"] = [{"kind": p.kind, "question": p.question, "answer_ids": p.answer_ids} for p in training.val]
    metrics.update(fit_steps=log["steps"], fit_history=log["history"], refine=log.get("refine"),
                   onpolicy=log.get("onpolicy"), train_tokens=sum(map(len, training.train_sequences)),
                   prompts=training.kinds, exact_tokens=the_plan.exact,
                   exact_per_layer=[most(c) for c in counts],
                   exact_per_head=[list(c) for c in counts] if the_plan.exact and not isinstance(counts[0], int) else None,
                   layer_gaps=the_plan.gaps.layers if the_plan.gaps else None)
    timings["total"] = round(sum(timings.values()), 1)
    doc = ws.document
    manifest = build_manifest(ws.model, doc.tokenizer, doc.ids, doc.templates, bank, config, metrics, timings)
    sinks = replace(sinks, keys=[k.cpu() for k in sinks.keys], values=[v.cpu() for v in sinks.values],
                    bias=None if sinks.bias is None else [None if b is None else b.cpu() for b in sinks.bias])
    artifact = Artifact(manifest, bank.cpu(), sinks, doc.ids if config.keep_document else None)
    artifact.manifest["memory_ratio"] = artifact.memory_ratio()
    return artifact

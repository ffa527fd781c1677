"""`nectar eval`: a compiled document against every other stand-in for its KV cache, at the same bytes.

One Workspace holds the document, its prompts and captures; each method at each budget is a context
provider answered by the same batched code path, against the full cache on the same held-out prompts.
Compiled banks and finished rows are cached under the output folder, so a re-run only does what is new.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path

import torch

from ..providers import baselines
from ..artifact import Artifact
from ..providers.attention import ExactContext, NoContext
from ..compiler.capture import capture
from .report import correlations
from ..compiler.pipeline import compile_bank
from ..config import CompileConfig, parse_settings, with_changes
from ..runtime.decode import generate_ids, generate_text
from ..errors import NectarError
from ..measure.fidelity import Method, generation_match, layer_errors, layer_gaps, next_token_fidelity
from ..files import write_json
from ..measure.metrics import pooled_kinds
from ..model.models import attention_scaling, cache_tokens, dtype_name, modeled_layers
from ..runtime.prefill import prefill, window_tails
from ..compiler.prompts import Prompt
from ..compiler.workspace import Workspace
from ..model.templates import question_ids

NECTAR = {"nectar": {}, "nectar_probe": {"allocation": "probe"}, "nectar_quadrature": {"variant": "quadrature"}}
METHODS = (*NECTAR, "no_document", *baselines.REGISTRY)
# What the compiles of one evaluation share, and so no ablation may change: the document's prompts and splits.
SHARED = ("prompts", "seed", "sink_tokens", "batch_size", "generate_batch", "document_template",
          "question_template", "truncate", "keep_document", "pilot_prompts")


def nectar_changes(name: str) -> dict | None:
    """The CompileConfig changes a nectar method asks for: a named one, or `nectar+FIELD=VALUE+...` for an
    ablation in `--set`'s grammar (e.g. nectar+exact_share=0); None for a method that is not nectar."""
    if name in NECTAR:
        return NECTAR[name]
    if not name.startswith("nectar+"):
        return None
    changes = parse_settings(name.split("+")[1:])
    shared = [key for key in changes if key in SHARED]
    if shared:
        raise NectarError(f"{', '.join(shared)} in method {name}: every compile of an evaluation shares it; "
                          "set it for all with --set")
    with_changes(CompileConfig(), changes)  # validates the values
    return changes


@dataclass
class EvalConfig:
    budgets: tuple[float, ...] = ()  # empty: the artifact's own budget
    methods: tuple[str, ...] = METHODS
    generate: bool = True  # greedy answers against the full cache's (main budget only)
    gap_prompts: int = 16  # prompts for the per-layer gap probe (main budget only; 0: off)
    max_new_tokens: int = 40  # the full cache's answers: what methods are judged on, teacher-forced and greedy
    batch_size: int = 16

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise NectarError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        bad = [b for b in self.budgets if not 0.0 < b < 1.0]
        if bad:
            raise NectarError(f"budgets must be in (0, 1), got {', '.join(map(str, bad))}: e.g. 0.01,0.02,0.05")
        unknown = [m for m in self.methods if m not in METHODS and nectar_changes(m) is None]
        if unknown:
            raise NectarError(f"unknown method(s) {', '.join(unknown)}: choose from {', '.join(METHODS)}, "
                              "or nectar+FIELD=VALUE")


class Comparison:
    """`judge` is the model every method answers with, the full-cache reference included: the workspace's
    weights at the dtype `nectar ask` and `serve` answer in (fp32), while the workspace compiles in its own
    (bf16 is ~3x faster where the hardware has it). None: the workspace's model judges too."""

    def __init__(self, workspace: Workspace, artifact: Artifact | None, questions: list[str] | None, out: Path,
                 config: EvalConfig, judge=None):
        self.ws, self.artifact, self.questions, self.out, self.config = workspace, artifact, questions, out, config
        self.doc = workspace.document
        self.model, self.tokenizer, self.n = judge or self.doc.model, self.doc.tokenizer, self.doc.n
        cfg = self.model.config
        self.kv_heads, self.scaling = cfg.num_key_value_heads, attention_scaling(self.model)
        self.main_budget = artifact.manifest["budget"] if artifact else workspace.config.budget
        self.budgets = sorted(set(config.budgets) | {self.main_budget})
        # Banks compiled in one dtype are not another's: the compile's dtype is part of their key.
        compiled_in = dtype_name(self.doc.model.dtype)
        identity = [self.doc.ids, workspace.config.to_dict(), compiled_in] + ([questions] if questions else [])
        self.key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:12]  # compiled banks
        rows_key = f"{self.key}-{dtype_name(self.model.dtype)}"  # rows: also who judged them
        if config.max_new_tokens != EvalConfig.max_new_tokens:  # and on how long answers
            rows_key += f"-{config.max_new_tokens}"
        self.rows_path = out / "rows.json"
        cached = json.loads(self.rows_path.read_text()) if self.rows_path.is_file() else {}
        self.rows: dict = cached if cached.get("key") == rows_key else {"key": rows_key}
        self._references: list[str] | None = None
        self._fit_seconds: dict[tuple[str, float], float] = {}

    @cached_property
    def full(self) -> ExactContext:
        """The document's exact K/V as the judge computes them."""
        return self.doc.full if self.model is self.doc.model else prefill(self.model, torch.tensor(self.doc.ids))

    @cached_property
    def prompts(self) -> list[Prompt]:
        """Made once per output folder (writing prompts and answers is slow), then read back."""
        if "prompts" not in self.rows:
            prompts = held_out(self.ws, self.artifact, self.questions, self.config, self.model, self.full)
            self.rows["prompts"] = [asdict(p) for p in prompts]
            write_json(self.rows_path, self.rows)
        return [Prompt(**p) for p in self.rows["prompts"]]

    # -- methods ----------------------------------------------------------------------------------
    def method(self, name: str, budget: float):
        """The `Method` named `name` at `budget`, and the bytes it keeps / the full KV cache's."""
        full = self.full
        if nectar_changes(name) is not None:
            art = self._compiled(name, budget)
            self._fit_seconds[name, budget] = _fit_seconds(art.manifest["timings"])
            return Method(*art.providers(self.model)), art.memory_ratio()
        if name == "no_document":  # nothing at all, sliding layers included: the floor every method must beat
            return Method(NoContext()), 0.0
        tails = window_tails(full)  # sliding layers: their window's tail, exact, whatever the method
        context, ratio = baselines.REGISTRY[name].build(self.baseline_inputs, budget)
        return Method(context, tails), self._ratio(ratio, tails)

    @cached_property
    def baseline_inputs(self) -> baselines.Inputs:
        """What the baselines read; the queries are nectar's training queries (the workspace's capture)."""
        return baselines.Inputs(self.model, self.doc.ids, self.full, self.ws.config.sink_tokens, self.scaling,
                                lambda: self.ws.capture(0)[0].q)

    def _ratio(self, global_ratio: float, tails: ExactContext | None) -> float:
        """Bytes kept / the model's own cache. `global_ratio` is per layer, against every layer holding all n
        tokens; with sliding layers, their exact tails count too, against the cache's real size."""
        if tails is None:
            return global_ratio
        layers = self.model.config.num_hidden_layers
        kept = global_ratio * self.n * layers + sum(k.shape[-2] for k in tails.keys)
        return kept / cache_tokens(self.model.config, self.n)

    def _compiled(self, name: str, budget: float) -> Artifact:
        if name == "nectar" and self.artifact is not None and budget == self.main_budget:
            return self.artifact
        path = self.out / "cache" / f"{name}-{budget:g}-{self.key}.nectar"
        if path.is_file():
            return Artifact.load(path)
        print(f"[nectar] compiling {name} at budget {budget:g}")
        changes = nectar_changes(name)
        if "fit" in changes:  # fit fields change within the fit this evaluation compiles with (its --steps)
            changes["fit"] = replace(self.ws.config.fit, **changes["fit"])
        art = compile_bank(self.ws, budget=budget, **changes)
        art.save(path)
        return art

    # -- measurements -----------------------------------------------------------------------------
    @cached_property
    def store(self):
        """Held-out queries with their exact attention over the whole document (no sinks split off)."""
        seqs = [p.question_ids + p.answer_ids for p in self.prompts]
        return capture(self.model, seqs, self.n, self.full, None, self.config.batch_size, "capture held-out")

    def references(self) -> list[str]:
        if self._references is None:
            self._references = self._answers((self.full, None), "full cache")
        return self._references

    @property
    def question_kinds(self) -> list[str]:
        """Kinds answered in the model's own words (recall is verbatim quoting), or every kind if none is."""
        kinds = sorted({p.kind for p in self.prompts})
        return [k for k in kinds if k != "recall"] or kinds

    def _answers(self, method, name: str, model=None) -> list[str]:
        questions = [p.question_ids for p in self.prompts if p.kind in self.question_kinds]
        return generate_text(model or self.model, self.tokenizer, questions, self.n, method,
                             self.config.max_new_tokens, self.config.batch_size, desc=f"greedy answers, {name}")

    def ceiling(self) -> dict | None:
        """The full cache itself on the compile's model (bf16) against the judge's answers: greedy answers
        flip on near-ties, so this is what answer similarity reads for a method that is exact up to rounding."""
        if not self.config.generate or self.model is self.doc.model:
            return None
        if "ceiling" not in self.rows:
            dtype = dtype_name(self.doc.model.dtype)
            answers = self._answers((self.doc.full, None), f"full cache in {dtype}", self.doc.model)
            self.rows["ceiling"] = {"dtype": dtype, **generation_match(answers, self.references())}
        if "questions" not in self.rows["ceiling"]:  # rows written before it was measured gain it here
            self.rows["ceiling"]["questions"] = self._rounding_fidelity()
            write_json(self.rows_path, self.rows)
        return self.rows["ceiling"]

    def _rounding_fidelity(self) -> dict:
        """Teacher-forced agreement and KL of the compile's model, its own full cache included, against the
        judge's: what the greedy answers' similarity reads for, in the units a method's rows use."""
        pairs = [(p.question_ids, p.answer_ids) for p in self.prompts if p.kind in self.question_kinds]
        fidelity = next_token_fidelity(self.model, pairs, self.n, (self.full, None), {"ceiling": (self.doc.full, None)},
                                       self.config.batch_size, models={"ceiling": self.doc.model})
        return fidelity["ceiling"]

    def evaluate(self, name: str, budget: float) -> dict:
        method, ratio = self.method(name, budget)
        kinds = sorted({p.kind for p in self.prompts})
        fidelity = {}
        for kind in kinds:
            pairs = [(p.question_ids, p.answer_ids) for p in self.prompts if p.kind == kind]
            fidelity[kind] = next_token_fidelity(self.model, pairs, self.n, (self.full, None), {name: method},
                                                 self.config.batch_size)[name]
        row = {"method": name, "budget": budget, "bytes_ratio": ratio, "fidelity": fidelity,
               "questions": {part: pooled_kinds(fidelity, self.question_kinds, part) for part in ("question", "answer")},
               "layers": layer_errors(method, self.store, self.kv_heads, self.scaling, device=self.model.device,
                                      layers=modeled_layers(self.model.config))}
        row["errors"] = {k: None if None in v else sum(v) / len(v) for k, v in row["layers"].items()}
        row["fit_seconds"] = self._fit_seconds.get((name, budget))
        if self.config.generate and budget == self.main_budget:
            answers = self._answers(method, name)
            row["generation"] = generation_match(answers, self.references())
            row["generation"]["answers"] = answers
        if self.config.gap_prompts and name == "nectar" and budget == self.main_budget:
            row["layer_gap"] = self.layer_gap(method)
        return row

    def layer_gap(self, method) -> list[float]:
        """Answer-token KL when only layer l uses the method and every other layer the full cache."""
        pairs = [(p.question_ids, p.answer_ids) for p in self.prompts][: self.config.gap_prompts]
        layers = modeled_layers(self.model.config)  # a sliding layer is exact for every method
        return layer_gaps(self.model, pairs, self.n, self.full, method, layers, window_tails(self.full),
                          self.config.batch_size)

    def methods_at(self, budget: float) -> list[str]:
        # The allocation ablation is one comparison at the main budget, not a curve.
        return [m for m in self.config.methods if m != "nectar_probe" or budget == self.main_budget]

    def run(self) -> dict:
        _ = self.prompts  # the references first: a question too long for the window fails before any compile
        # The main budget first: its full table is ready before the sweep's extra points.
        for budget in sorted(self.budgets, key=lambda b: b != self.main_budget):
            for name in self.methods_at(budget):
                key = f"{name}@{budget:g}"
                if key in self.rows:
                    continue
                print(f"[nectar] evaluating {name} at budget {budget:g}", flush=True)
                start = time.perf_counter()
                self.rows[key] = self.evaluate(name, budget)
                self.rows[key]["seconds"] = round(time.perf_counter() - start, 1)
                self.rows[key]["shared_timings"] = dict(self.doc.timings)
                write_json(self.rows_path, self.rows)
        rows = [self.rows[f"{m}@{b:g}"] for b in self.budgets for m in self.methods_at(b)]
        return {"document_tokens": self.n, "main_budget": self.main_budget, "budgets": self.budgets,
                "judge_dtype": dtype_name(self.model.dtype),
                "prompts": {k: sum(p.kind == k for p in self.prompts) for k in sorted({p.kind for p in self.prompts})},
                "rows": rows, "correlation": correlations(rows, self.main_budget), "ceiling": self.ceiling()}


def _fit_seconds(timings: dict) -> float:
    """A compile's own cost beside the stages every compile of the document shares (prefill, prompts, capture)."""
    shared = ("prefill", "prompts", "capture", "total")
    return round(sum(v for k, v in timings.items() if k not in shared), 1)


def held_out(workspace: Workspace, artifact: Artifact | None, questions: list[str] | None, config: EvalConfig,
             judge, full: ExactContext):
    """The prompts to judge on: the user's questions (answered by the judge with the full cache `full`, up to
    `config.max_new_tokens` tokens), or the held-out split (answers as long as the compile made them)."""
    doc = workspace.document
    tokenizer, template = doc.tokenizer, doc.templates["question"]
    if questions:
        prompts = [Prompt("user", q, question_ids=question_ids(tokenizer, template, q)) for q in questions]
        answers = generate_ids(judge, tokenizer, [p.question_ids for p in prompts], doc.n,
                               full, max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                               desc="answer with full cache")
        for p, a in zip(prompts, answers):
            p.answer_ids = a
        return [p for p in prompts if p.answer_ids]
    if artifact is not None:
        val = artifact.manifest["metrics"]["val_set"]
        return [Prompt(v["kind"], v["question"], answer_ids=v["answer_ids"],
                       question_ids=question_ids(tokenizer, template, v["question"])) for v in val]
    return workspace.training.val

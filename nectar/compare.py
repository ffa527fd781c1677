"""`nectar eval`: a compiled document against every other stand-in for its KV cache, at the same bytes.

One Workbench holds the document, its prompts and captures; each method at each budget is a context
provider answered by the same batched code path, against the full cache on the same held-out prompts.
Compiled banks and finished rows are cached under the output folder, so a re-run only does what is new.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from . import baselines
from .artifact import Artifact
from .attention import ExactContext, NoContext
from .capture import capture
from .compiler import Workbench, attention_scaling
from .errors import NectarError
from .evaluate import document_part, generation_match, layer_errors, next_token_fidelity, pool
from .generate import generate_ids, question_ids

NECTAR = {"nectar": {}, "nectar_probe": {"allocation": "probe"}, "nectar_quadrature": {"variant": "quadrature"}}
METHODS = (*NECTAR, "no_document", "streaming_llm", *baselines.PRESSES)


@dataclass
class EvalConfig:
    budgets: tuple[float, ...] = ()  # empty: the artifact's own budget
    methods: tuple[str, ...] = METHODS
    generate: bool = True  # greedy answers against the full cache's (main budget only)
    gap_prompts: int = 16  # prompts for the per-layer gap probe (main budget only; 0: off)
    max_new_tokens: int = 40
    batch_size: int = 16

    def __post_init__(self):
        bad = [b for b in self.budgets if not 0.0 < b < 1.0]
        if bad:
            raise NectarError(f"budgets must be in (0, 1), got {', '.join(map(str, bad))}: e.g. 0.01,0.02,0.05")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise NectarError(f"unknown method(s) {', '.join(unknown)}: choose from {', '.join(METHODS)}")


@dataclass
class Prompt:
    kind: str
    question: str
    question_ids: list[int]
    answer_ids: list[int] = field(default_factory=list)


def read_questions(path: str | os.PathLike) -> list[str]:
    """A JSON list of questions (strings, or objects with a "question"), or {"questions": [...]}."""
    path = Path(path)
    if not path.is_file():
        raise NectarError(f"no such question file: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NectarError(f"{path} is not valid JSON ({e}): write a list of questions, e.g. [\"What is ...?\"]") \
            from None
    if isinstance(data, dict):
        data = data.get("questions", [])
    questions = [q.get("question") if isinstance(q, dict) else q for q in data] if isinstance(data, list) else []
    questions = [q.strip() for q in questions if isinstance(q, str) and q.strip()]
    if not questions:
        raise NectarError(f"{path} has no questions: write a JSON list of strings, e.g. [\"What is ...?\"]")
    return questions


class Comparison:
    def __init__(self, workbench: Workbench, artifact: Artifact | None, questions: list[str] | None, out: Path,
                 config: EvalConfig):
        self.wb, self.artifact, self.questions, self.out, self.config = workbench, artifact, questions, out, config
        self.model, self.tokenizer, self.n = workbench.model, workbench.tokenizer, workbench.n
        cfg = self.model.config
        self.kv_heads, self.scaling = cfg.num_key_value_heads, attention_scaling(self.model)
        self.main_budget = artifact.manifest["budget"] if artifact else workbench.config.budget
        self.budgets = sorted(set(config.budgets) | {self.main_budget})
        identity = [workbench.doc_ids, workbench.config.to_dict()] + ([questions] if questions else [])
        self.key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:12]
        self.rows_path = out / "rows.json"
        cached = json.loads(self.rows_path.read_text()) if self.rows_path.is_file() else {}
        self.rows: dict = cached if cached.get("key") == self.key else {"key": self.key}
        self._references: list[str] | None = None

    @cached_property
    def prompts(self) -> list[Prompt]:
        """Made once per output folder (writing prompts and answers is slow), then read back."""
        if "prompts" not in self.rows:
            prompts = held_out(self.wb, self.artifact, self.questions, self.config.batch_size)
            self.rows["prompts"] = [asdict(p) for p in prompts]
            _write_json(self.rows_path, self.rows)
        return [Prompt(**p) for p in self.rows["prompts"]]

    # -- methods ----------------------------------------------------------------------------------
    def method(self, name: str, budget: float):
        """(context, kept) for method `name` at `budget`, plus the bytes it keeps / the full KV cache's."""
        full = self.wb.full
        if name in NECTAR:
            art = self._compiled(name, budget)
            return art.providers(self.model), art.memory_ratio()
        if name == "no_document":
            return (NoContext(), None), 0.0
        if name == "streaming_llm":
            context = baselines.streaming_llm(full, budget, self.wb.config.sink_tokens)
        else:
            context = baselines.press(self.model, self.wb.doc_ids, name, budget)
        return (context, None), baselines.context_tokens(context) / self.n

    def _compiled(self, name: str, budget: float) -> Artifact:
        if name == "nectar" and self.artifact is not None and budget == self.main_budget:
            return self.artifact
        path = self.out / "cache" / f"{name}-{budget:g}-{self.key}.nectar"
        if path.is_file():
            return Artifact.load(path)
        print(f"[nectar] compiling {name} at budget {budget:g}")
        art = self.wb.compile(budget=budget, **NECTAR[name])
        art.save(path)
        return art

    # -- measurements -----------------------------------------------------------------------------
    @cached_property
    def store(self):
        """Held-out queries with their exact attention over the whole document (no sinks split off)."""
        seqs = [p.question_ids + p.answer_ids for p in self.prompts]
        return capture(self.model, seqs, self.n, self.wb.full, None, self.config.batch_size, "capture held-out")[0]

    def references(self) -> list[str]:
        if self._references is None:
            self._references = self._answers((self.wb.full, None), "full cache")
        return self._references

    @property
    def question_kinds(self) -> list[str]:
        """Kinds answered in the model's own words (recall is verbatim quoting), or every kind if none is."""
        kinds = sorted({p.kind for p in self.prompts})
        return [k for k in kinds if k != "recall"] or kinds

    def _answers(self, method, name: str) -> list[str]:
        questions = [p.question_ids for p in self.prompts if p.kind in self.question_kinds]
        ids = generate_ids(self.model, self.tokenizer, questions, self.n, *method,
                           max_new_tokens=self.config.max_new_tokens, batch_size=self.config.batch_size,
                           desc=f"greedy answers, {name}")
        return [self.tokenizer.decode(a, skip_special_tokens=True).strip() for a in ids]

    def evaluate(self, name: str, budget: float) -> dict:
        method, ratio = self.method(name, budget)
        kinds = sorted({p.kind for p in self.prompts})
        fidelity = {}
        for kind in kinds:
            pairs = [(p.question_ids, p.answer_ids) for p in self.prompts if p.kind == kind]
            fidelity[kind] = next_token_fidelity(self.model, pairs, self.n, (self.wb.full, None), {name: method},
                                                 self.config.batch_size)[name]
        row = {"method": name, "budget": budget, "bytes_ratio": ratio, "fidelity": fidelity,
               "questions": _pooled(fidelity, self.question_kinds),
               "layers": layer_errors(method, self.store, self.kv_heads, self.scaling, device=self.model.device)}
        row["errors"] = {k: _mean(v) for k, v in row["layers"].items()}
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
        provider = document_part(method)
        layers = range(self.model.config.num_hidden_layers)
        # One call with every layer as a method: the full-cache reference runs once per batch, not per layer.
        swapped = {str(layer): (_OneLayer(layer, provider, self.wb.full), None) for layer in layers}
        fid = next_token_fidelity(self.model, pairs, self.n, (self.wb.full, None), swapped, self.config.batch_size)
        return [fid[str(layer)]["answer"]["kl"] for layer in layers]

    def methods_at(self, budget: float) -> list[str]:
        # The allocation ablation is one comparison at the main budget, not a curve.
        return [m for m in self.config.methods if m != "nectar_probe" or budget == self.main_budget]

    def run(self) -> dict:
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
                self.rows[key]["workbench_timings"] = dict(self.wb.timings)
                _write_json(self.rows_path, self.rows)
        rows = [self.rows[f"{m}@{b:g}"] for b in self.budgets for m in self.methods_at(b)]
        return {"document_tokens": self.n, "main_budget": self.main_budget, "budgets": self.budgets,
                "prompts": {k: sum(p.kind == k for p in self.prompts) for k in sorted({p.kind for p in self.prompts})},
                "rows": rows, "correlation": correlations(rows, self.main_budget)}


class _OneLayer:
    """A provider that is `provider` at one layer and the exact document everywhere else."""

    def __init__(self, layer: int, provider, full: ExactContext):
        self.layer, self.provider, self.full = layer, provider, full

    def __call__(self, layer, q, scaling):
        return (self.provider if layer == self.layer else self.full)(layer, q, scaling)


def _pooled(fidelity: dict, kinds: list[str]) -> dict:
    return {part: pool([fidelity[k][part] for k in kinds]) for part in ("question", "answer")}


def _mean(values: list) -> float | None:
    return None if any(v is None for v in values) else sum(values) / len(values)


def spearman(x: list[float], y: list[float]) -> float:
    """Rank correlation (no tie correction: the values here are continuous)."""
    if len(x) < 3:
        return float("nan")
    rx = torch.tensor(x).argsort().argsort().float()
    ry = torch.tensor(y).argsort().argsort().float()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()).clamp_min(1e-12))


def correlations(rows: list[dict], main_budget: float) -> dict:
    """Approximation error against next-token gap: per layer (main nectar) and across methods x budgets."""
    out = {}
    main = next((r for r in rows if r["method"] == "nectar" and r["budget"] == main_budget and "layer_gap" in r), None)
    if main:
        out["per_layer"] = spearman(main["layers"]["merged_rel"], main["layer_gap"])
    points = [(r["errors"]["merged_rel"], r["questions"]["answer"]["kl"]) for r in rows]
    out["across_methods"] = spearman(*zip(*points)) if len(points) >= 3 else float("nan")
    return out


def _write_json(path: Path, data) -> None:
    """Atomically: an interrupted run leaves the previous file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, default=lambda x: None if isinstance(x, float) and math.isnan(x) else x)
    os.replace(tmp, path)


def held_out(workbench: Workbench, artifact: Artifact | None, questions: list[str] | None, batch_size: int):
    """The prompts to judge on: the user's questions (answered by the full cache), or the held-out split."""
    tokenizer, template = workbench.tokenizer, workbench.templates["question"]
    if questions:
        prompts = [Prompt("user", q, question_ids(tokenizer, template, q)) for q in questions]
        answers = generate_ids(workbench.model, tokenizer, [p.question_ids for p in prompts], workbench.n,
                               workbench.full, max_new_tokens=40, batch_size=batch_size, desc="answer with full cache")
        for p, a in zip(prompts, answers):
            p.answer_ids = a
        return [p for p in prompts if p.answer_ids]
    if artifact is not None:
        val = artifact.manifest["metrics"]["val_set"]
        return [Prompt(v["kind"], v["question"], question_ids(tokenizer, template, v["question"]), v["answer_ids"])
                for v in val]
    return [Prompt(p.kind, p.question, p.question_ids, p.answer_ids) for p in workbench.prompts[1]]


def table(report: dict) -> str:
    """One line per method and budget: bytes, fidelity on question and answer tokens, errors, generation."""
    head = (f"{'method':<19} {'budget':>6} {'bytes':>7} {'agree A':>8} {'KL A':>7} {'agree Q':>8} {'KL Q':>7} "
            f"{'merged':>7} {'o_ctx':>6} {'|lse|':>6} {'EM':>5} {'cos':>5}")
    lines = [head, "-" * len(head)]
    for r in report["rows"]:
        q, e, g = r["questions"], r["errors"], r.get("generation", {})
        lse = "-" if e["lse_abs"] is None else f"{e['lse_abs']:.3f}"
        gen = f"{g['exact_match']:>5.2f} {g['cosine']:>5.3f}" if g else f"{'-':>5} {'-':>5}"
        lines.append(f"{r['method']:<19} {r['budget']:>6g} {r['bytes_ratio']:>7.4f} "
                     f"{q['answer']['agreement']:>8.3f} {q['answer']['kl']:>7.3f} "
                     f"{q['question']['agreement']:>8.3f} {q['question']['kl']:>7.3f} "
                     f"{e['merged_rel']:>7.3f} {e['o_rel']:>6.3f} {lse:>6} {gen}")
    c = report["correlation"]
    lines.append(f"error vs gap, Spearman: per layer {c.get('per_layer', float('nan')):.2f}, "
                 f"across methods and budgets {c['across_methods']:.2f}")
    return "\n".join(lines)


def plot_fidelity(report: dict, path: Path) -> None:
    """Answer-token agreement and KL against bytes kept (log x), one curve per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    methods = dict.fromkeys(r["method"] for r in report["rows"])
    for name in methods:
        rows = sorted((r for r in report["rows"] if r["method"] == name), key=lambda r: r["bytes_ratio"])
        for ax, metric in zip(axes, ("agreement", "kl")):
            y = [r["questions"]["answer"][metric] for r in rows]
            if name == "no_document":
                ax.axhline(sum(y) / len(y), color="grey", linestyle="--", label="no document")
                continue
            style = {"linewidth": 2.5, "marker": "o"} if name.startswith("nectar") else {"marker": "."}
            ax.plot([r["bytes_ratio"] for r in rows], y, label=name, **style)
    for ax, label in zip(axes, ("answer-token agreement with the full cache", "KL(full || method), answer tokens")):
        ax.set_xscale("log")
        ax.set_xlabel("bytes kept for the document / full KV cache bytes")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    _log_if_positive(axes[1], "y")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Fidelity vs bytes, {report['document_tokens']}-token document")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_gap(report: dict, path: Path) -> None:
    """Approximation error against next-token gap: per layer, and per method x budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    main = next((r for r in report["rows"] if "layer_gap" in r), None)
    c = report["correlation"]
    if main:
        err, gap = main["layers"]["merged_rel"], main["layer_gap"]
        axes[0].scatter(err, gap)
        for layer, (x, y) in enumerate(zip(err, gap)):
            axes[0].annotate(str(layer), (x, y), fontsize=7, xytext=(2, 2), textcoords="offset points")
        axes[0].set_title(f"per layer (nectar at {main['budget']:g}): Spearman {c.get('per_layer', float('nan')):.2f}")
        axes[0].set_xlabel("merged-output relative error of that layer")
        axes[0].set_ylabel("answer KL with only that layer approximated")
        _log_if_positive(axes[0], "y")
    for name in dict.fromkeys(r["method"] for r in report["rows"]):
        rows = [r for r in report["rows"] if r["method"] == name]
        axes[1].scatter([r["errors"]["merged_rel"] for r in rows], [r["questions"]["answer"]["kl"] for r in rows],
                        label=name, s=40 if name.startswith("nectar") else 20)
    axes[1].set_title(f"per method and budget: Spearman {c['across_methods']:.2f}")
    axes[1].set_xlabel("mean merged-output relative error (all layers)")
    axes[1].set_ylabel("answer-token KL(full || method)")
    _log_if_positive(axes[1], "x")
    _log_if_positive(axes[1], "y")
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _log_if_positive(ax, axis: str) -> None:
    """Log scale where every plotted value allows it (a perfect method can reach 0)."""
    values = [v for coll in ax.collections for v in coll.get_offsets()[:, 0 if axis == "x" else 1]]
    values += [v for line in ax.lines for v in (line.get_xdata() if axis == "x" else line.get_ydata())]
    if values and min(values) > 0:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")


def write_report(report: dict, out: Path) -> list[Path]:
    paths = [out / "eval.json", out / "fidelity_vs_bytes.png", out / "error_vs_gap.png"]
    _write_json(paths[0], {k: v for k, v in report.items()})
    plot_fidelity(report, paths[1])
    plot_gap(report, paths[2])
    return paths

"""Typed, validated configuration, each field described once.

Every field carries its meaning and the reason for its default in `field(metadata=...)`: the CLI's help,
`nectar compile --set help` and docs/options.md are generated from them, and each reason links to an entry
of docs/decisions.md with the alternatives, the numbers and the command behind it. `--set FIELD=VALUE`
(and `nectar eval`'s `nectar+FIELD=VALUE` methods) parse here, so both speak one grammar. Every check
raises NectarError with what to change.
"""
from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields, replace

from .errors import NectarError

VARIANTS = ("mlp", "quadrature")
ALLOCATIONS = ("uniform", "probe", "gap")
WEIGHT_BITS = (8, 16)  # module weight storage: int8 with a 16-bit scale per column, or 16-bit (nectar.quant)
EXACT_BITS = (4, 8, 16)  # exact-token storage: 4-bit codes two to a byte, int8, or 16-bit; a scale per channel
HOLDOUTS = ("chunks", "prompts")  # what validation holds out of training (PromptConfig.holdout)
EXACT_BY = ("mass", "output")  # how exact tokens are ranked (nectar.selection.TokenChoice)
EXACT_SHARE = 0.6  # the exact tokens' default share of the budget under the gap allocation (decisions.md#exact-share)
EXACT_SHARE_EVEN = 0.3  # ... and under another allocation, where each token buys less
MIN_MODULE_WIDTH = 8  # the default share shrinks until modules keep this width (decisions.md#exact-share)
VALUES_4BIT_UP_TO = 0.05  # exact values take 4 bits up to this budget (decisions.md#exact-value-bits)


def knob(default=MISSING, meaning: str = "", why: str = "", see: str = "", factory=MISSING):
    """A config field with its meaning, the reason for its default, and the decisions.md entry behind it."""
    return field(default=default, default_factory=factory, metadata={"meaning": meaning, "why": why, "see": see})


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise NectarError(message)


# Why each kind's count is what it is (the four were halved together).
_COUNTS = ("twice as many of each kind answered no better, at a longer compile", "prompts")


@dataclass
class PromptConfig:
    """How many training prompts of each kind, and their shape (nectar.prompts)."""

    recall: int = knob(64, "prompts that quote or continue a span of the document", *_COUNTS)
    self_study: int = knob(48, "questions the model writes itself about a chunk, answered with the full cache",
                           *_COUNTS)
    generic: int = knob(48, "summarise / explain / list prompts about a term of a chunk", *_COUNTS)
    direct: int = knob(48, "short questions about a term, worded as a person asks them", *_COUNTS)
    answer_tokens: int = knob(40, "length of each training answer, in tokens")
    chunk_tokens: int = knob(256, "the document is cut into chunks of this many tokens for prompts and validation")
    val_fraction: float = knob(0.15, "share of the prompts held out for validation")
    holdout: str = knob("chunks", "what validation holds out: whole chunks of the document, or prompts at random",
                        "unseen text measures generalisation; holding prompts out instead measured neutral",
                        "holdout")

    def __post_init__(self):
        counts = (self.recall, self.self_study, self.generic, self.direct)
        _require(min(counts) >= 0, "prompt counts must be >= 0")
        _require(sum(counts) > 0, "at least one training prompt is needed")
        _require(self.answer_tokens >= 1, "answer_tokens must be >= 1")
        _require(self.chunk_tokens >= 32, "chunk_tokens must be >= 32")
        _require(0.0 < self.val_fraction < 0.5, "val_fraction must be in (0, 0.5)")
        _require(self.holdout in HOLDOUTS, f"holdout must be one of {', '.join(HOLDOUTS)}, got '{self.holdout}'")

    @classmethod
    def with_total(cls, total: int, **shape) -> PromptConfig:
        """`total` prompts in the default mix: 4 recall to 3 each of self-study, generic and direct."""
        _require(total >= 1, f"the number of training prompts must be >= 1, got {total}")
        recall, self_study, generic = round(4 * total / 13), round(3 * total / 13), round(3 * total / 13)
        return cls(recall=recall, self_study=self_study, generic=generic,
                   direct=total - recall - self_study - generic, **shape)


@dataclass
class FitConfig:
    """AdamW on all modules at once: warmup + cosine, an EMA of the weights, early stop on validation."""

    steps: int = knob(500, "fitting steps of the module bank", "from ridge-solved output layers, 500 reach what 1000 "
                      "did from random ones", "fit-steps")
    batch: int = knob(1024, "queries per fitting step")
    lr: float = knob(4e-2, "AdamW's peak learning rate",
                     "tiny standardised networks train far faster than the usual 3e-3 allows", "fit-lr")
    warmup: int = knob(100, "linear warmup steps")
    weight_decay: float = knob(0.0, "AdamW's weight decay")
    ema: float = knob(0.98, "decay of the exponential moving average of the weights that is kept",
                      "a 50-step horizon: a 200-step one lagged far behind a fit that still improves fast", "fit-ema")
    init: str = knob("ridge", "output layers at the start of a fresh fit: ridge (each network's last layer solved by "
                     "ridge regression on its random hidden features) or random",
                     "the fit starts from the best output layer its first features allow", "fit-init")
    eval_every: int = knob(100, "steps between validations")
    patience: int = knob(4, "validations without improvement before the fit stops early")
    bf16: bool | None = knob(None, "training matmuls in bfloat16 (None: where the hardware runs them natively)",
                             "faster steps on a CPU with bf16 units; weights, optimiser and loss stay fp32", "fit-bf16")
    share_power: float = knob(1.0, "the target error's weight is the document's share of the merged output to "
                              "this power", "2 (the merged output's squared error) starves low-share queries",
                              "share-power")

    def __post_init__(self):
        _require(self.share_power >= 0, f"share_power must be >= 0, got {self.share_power}")
        _require(self.steps >= 1 and self.batch >= 1, "steps and batch must be >= 1")
        _require(self.lr > 0, "lr must be > 0")
        _require(0.0 <= self.ema < 1.0, "ema must be in [0, 1)")
        _require(self.init in ("ridge", "random"), f"init must be ridge or random, got {self.init!r}")
        _require(self.eval_every >= 1 and self.patience >= 1, "eval_every and patience must be >= 1")


@dataclass
class CompileConfig:
    """What `nectar.compile` builds. `budget` is module bytes / document KV-cache bytes, same dtype."""

    budget: float = knob(0.02, "module and exact-token bytes / the document's KV-cache bytes, same dtype")
    variant: str = knob("mlp", "module kind: mlp (two small networks per KV head) or quadrature (learned nodes)",
                        "the MLP is the paper's stronger variant", "variant")
    allocation: str = knob("gap", "capacity per layer: gap (by the next-token KL each layer causes alone), "
                           "probe (by a short fit's per-layer error) or uniform",
                           "the KL a layer causes is what the answer feels", "allocation")
    probe_steps: int = knob(100, "fitting steps of the short probe fit behind the gap and probe allocations",
                            "under the short weight average, 100 steps answered no worse than 150", "onpolicy")
    probe_prompts: int = knob(8, "training questions on which the gap probe measures each layer's KL",
                              "16 bought little for more time", "probe-prompts")
    probe_recall: int = knob(4, "verbatim-recall prompts the gap probe also measures (0: questions only)",
                             "a head that copies text costs quoting far more than questions", "probe-recall")
    head_gap_layers: int = knob(8, "hardest layers whose KV heads the gap probe measures one by one",
                                "a layer's heads differ by orders of magnitude", "exact-by-head")
    seed: int = knob(0, "seed of prompts, splits and fitting")
    depth: int = knob(2, "hidden layers per network")
    score_share: float = knob(0.4, "share of each module's numbers given to the score network")
    target_softmax: bool = knob(False, "the target network's first layer as a softmax over learned pseudo-keys",
                                "less output error on a fixed capture, but worse answers", "target-softmax")
    weight_bits: int = knob(8, "module weights stored as int8 with a scale per column (8) or 16-bit",
                            "the modules are capacity-bound and rounding costs them almost nothing", "weight-bits")
    exact_bits: int = knob(8, "exact tokens' keys stored as 4- or 8-bit codes with a scale per channel, or 16-bit",
                           "twice 16-bit's tokens; 4 bits round keys, which steer the softmax, too far", "exact-bits")
    exact_value_bits: int | None = knob(None, "exact tokens' values: 4, 8 or 16 bits (None: 4 beside 8-bit keys "
                                        "at budgets up to VALUES_4BIT_UP_TO, else as the keys)",
                                        "values enter linearly and tolerate rounding that keys do not",
                                        "exact-value-bits")
    exact_power: float = knob(1.0, "each training query's attention to a token is raised to this power before "
                              "tokens are ranked", "sharper powers chose no better", "exact-power")
    exact_by: str = knob("output", "rank tokens by attention alone (mass), or times how far the token's value "
                         "lies from what the query reads (output)",
                         "the error that leaving a token to a module would cause", "exact-by")
    exact_head_cap: float = knob(0.9, "the most of the document one KV head may keep exact under the gap allocation",
                                 "a head that copies text wants much of it; its module learns the rest",
                                 "exact-head-cap")
    refine_steps: int = knob(15, "end-to-end distillation steps on the answer KL after the fits (0: off)",
                             "15 steps read as 30 on both regression documents, for half the time", "refine")
    refine_anchor: float = knob(1.0, "weight of the per-layer regression loss beside refinement's KL")
    refine_lr: float = knob(3e-4, "Adam's peak rate in refinement", "other rates and lengths were within noise",
                            "refine")
    refine_recall: float = knob(1.0, "weight of recall prompts' tokens in refinement's KL",
                                "lower weights traded quoting for answers within noise", "refine-recall")
    exact_share: float | None = knob(None, "budget share for document tokens kept exact (None: EXACT_SHARE under "
                                     "gap, even_share otherwise, less where modules would fall under "
                                     "MIN_MODULE_WIDTH; global layers only on sliding-window models)",
                                     "exact tokens bought most of the fidelity", "exact-share")
    even_share: float = knob(EXACT_SHARE_EVEN, "the default exact share under an allocation other than gap, where "
                             "each token buys less (an effort level's)",
                             "exact tokens bought most of the fidelity", "exact-share")
    onpolicy_steps: int = knob(100, "refit steps on queries captured with the fitted modules in place (0: off)",
                               "most of a round's gain comes in its first 100 steps", "onpolicy")
    onpolicy_rounds: int = knob(1, "capture-and-refit rounds", "a second round bought nothing measurable", "onpolicy")
    pilot_prompts: int = knob(64, "training prompts whose queries rank the document's tokens for the exact ones",
                              "the ranking settles well before the whole training set", "pilot-prompts")
    sink_tokens: int = knob(4, "first document tokens kept exact", "attention sinks carry much of the mass")
    document_template: str | None = knob(None, "'...{document}...' around the document (None: the chat template's)")
    question_template: str | None = knob(None, "'...{question}...' around a question (None: the chat template's)")
    keep_document: bool = knob(True, "store the document's token ids in the artifact (lets `ask --compare` run)")
    truncate: bool = knob(False, "cut a document too long for the model instead of refusing it")
    batch_size: int = knob(16, "prompts per forward pass during capture")
    generate_batch: int = knob(256, "prompts decoded together while writing and answering training prompts",
                               "one batch for the default prompts: fewer, larger decode steps", "generate-batch")
    prompts: PromptConfig = knob(meaning="training prompts (nectar.prompts)", factory=PromptConfig)
    fit: FitConfig = knob(meaning="the module fit (nectar.fit)", factory=FitConfig)

    def __post_init__(self):
        _require(0.0 < self.budget < 1.0, f"budget must be in (0, 1), got {self.budget}: e.g. 0.02 for 2% of the KV cache")
        _require(self.variant in VARIANTS, f"variant must be one of {', '.join(VARIANTS)}, got '{self.variant}'")
        _require(self.allocation in ALLOCATIONS,
                 f"allocation must be one of {', '.join(ALLOCATIONS)}, got '{self.allocation}'")
        _require(self.probe_steps >= 1, "probe_steps must be >= 1")
        _require(self.probe_prompts >= 1, f"probe_prompts must be >= 1, got {self.probe_prompts}")
        _require(self.probe_recall >= 0, f"probe_recall must be >= 0, got {self.probe_recall}")
        _require(self.head_gap_layers >= 0, f"head_gap_layers must be >= 0, got {self.head_gap_layers}")
        _require(self.depth >= 1, "depth must be >= 1")
        _require(0.0 < self.score_share < 1.0, "score_share must be in (0, 1)")
        _require(isinstance(self.target_softmax, bool), f"target_softmax must be true or false, got {self.target_softmax!r}")
        _require(self.weight_bits in WEIGHT_BITS, f"weight_bits must be 8 or 16, got {self.weight_bits}")
        _require(self.exact_bits in EXACT_BITS, f"exact_bits must be 4, 8 or 16, got {self.exact_bits}")
        _require(self.exact_value_bits in (None, *EXACT_BITS),
                 f"exact_value_bits must be 4, 8 or 16, got {self.exact_value_bits}")
        _require(self.exact_power > 0, f"exact_power must be > 0, got {self.exact_power}")
        _require(self.exact_by in EXACT_BY, f"exact_by must be one of {', '.join(EXACT_BY)}, got '{self.exact_by}'")
        _require(0.0 < self.exact_head_cap < 1.0, f"exact_head_cap must be in (0, 1), got {self.exact_head_cap}")
        _require(self.sink_tokens >= 0, "sink_tokens must be >= 0")
        _require(self.pilot_prompts >= 1, f"pilot_prompts must be >= 1, got {self.pilot_prompts}")
        _require(self.refine_steps >= 0, "refine_steps must be >= 0")
        _require(self.refine_anchor >= 0, f"refine_anchor must be >= 0, got {self.refine_anchor}")
        _require(self.refine_lr > 0, f"refine_lr must be > 0, got {self.refine_lr}")
        _require(self.refine_recall >= 0, f"refine_recall must be >= 0, got {self.refine_recall}")
        _require(0.0 <= self.even_share < 1.0, f"even_share must be in [0, 1), got {self.even_share}")
        _require(self.exact_share is None or 0.0 <= self.exact_share < 1.0,
                 f"exact_share must be in [0, 1), got {self.exact_share}: the modules need some of the budget")
        _require(self.onpolicy_steps >= 0, "onpolicy_steps must be >= 0")
        _require(self.onpolicy_rounds >= 1, "onpolicy_rounds must be >= 1")
        _require(self.batch_size >= 1 and self.generate_batch >= 1, "batch_size and generate_batch must be >= 1")
        if self.document_template is not None:
            _require("{document}" in self.document_template, "document_template needs a {document} slot")
        if self.question_template is not None:
            _require("{question}" in self.question_template, "question_template needs a {question} slot")

    @property
    def value_bits(self) -> int:
        """The bits the exact tokens' values are stored at."""
        if self.exact_value_bits is not None:
            return self.exact_value_bits
        return 4 if self.exact_bits == 8 and self.budget <= VALUES_4BIT_UP_TO else self.exact_bits

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CompileConfig:
        data = dict(data)
        data.setdefault("exact_by", "mass")  # written before ranking by output error: chosen by attention mass
        data.setdefault("probe_recall", 0)  # written before the probe weighed recall: questions only
        prompts, fit = PromptConfig(**data.pop("prompts")), FitConfig(**data.pop("fit"))
        return cls(**data, prompts=prompts, fit=fit)


# -- settings: FIELD=VALUE, the one grammar of `--set` and of `nectar eval`'s nectar+FIELD=VALUE methods ------
_PARTS = {"fit": FitConfig, "prompts": PromptConfig}


def _where(name: str) -> tuple[str | None, str]:
    """(the part a field lives in, None for CompileConfig itself; its name). Fit and prompt fields may be
    written bare (steps=600) or dotted (fit.steps=600): no name is in two places."""
    part, dot, key = name.partition(".")
    if dot:
        if part not in _PARTS or key not in _names(_PARTS[part]):
            raise NectarError(f"no config field {name}: see `nectar compile --set help`")
        return part, key
    if name in _names(CompileConfig) and name not in _PARTS:
        return None, name
    for part, cls in _PARTS.items():
        if name in _names(cls):
            return part, name
    raise NectarError(f"no config field {name}: see `nectar compile --set help`")


def _names(cls) -> list[str]:
    return [f.name for f in fields(cls)]


def _parse(cls, key: str, text: str):
    """`text` as the type of `cls`'s field `key`: its annotation names it ("int | None", "bool", ...)."""
    kinds = [k.strip() for k in next(f.type for f in fields(cls) if f.name == key).split("|")]
    if "None" in kinds and text.lower() == "none":
        return None
    kind = kinds[0]
    try:
        if kind == "bool":
            if text.lower() not in ("0", "1", "true", "false"):
                raise ValueError(text)
            return text.lower() in ("1", "true")
        return {"int": int, "float": float, "str": str}[kind](text)
    except ValueError:
        raise NectarError(f"'{text}' is not a valid {key}: it takes {' or '.join(kinds)}") from None


def parse_settings(items: list[str]) -> dict:
    """`["FIELD=VALUE", ...]` as changes to a CompileConfig: {field: value, "fit": {...}, "prompts": {...}}.
    `prompts=N` sets the total number of training prompts in the default mix."""
    changes: dict = {}
    for item in items:
        name, eq, text = item.partition("=")
        if not eq or not name or not text:
            raise NectarError(f"'{item}': write FIELD=VALUE, e.g. budget=0.05 or fit.steps=600")
        if name == "prompts":
            if not text.strip().isdigit():
                raise NectarError(f"'{text}' is not a valid prompts: it takes a whole number of training prompts")
            changes.setdefault("prompts", {})["total"] = int(text)
            continue
        part, key = _where(name)
        cls = _PARTS[part] if part else CompileConfig
        (changes.setdefault(part, {}) if part else changes)[key] = _parse(cls, key, text)
    return changes


def with_changes(config: CompileConfig, changes: dict) -> CompileConfig:
    """`config` with `parse_settings`' changes applied (and so validated)."""
    changes = dict(changes)
    fit = replace(config.fit, **changes.pop("fit", {}))
    prompt_changes = dict(changes.pop("prompts", {}))
    prompts = config.prompts
    if "total" in prompt_changes:
        shape = {f.name: getattr(prompts, f.name) for f in fields(PromptConfig)
                 if f.name not in ("recall", "self_study", "generic", "direct")}
        prompts = PromptConfig.with_total(prompt_changes.pop("total"), **shape)
    return replace(config, **changes, fit=fit, prompts=replace(prompts, **prompt_changes))


@dataclass(frozen=True)
class Effort:
    """A named level of compile effort: `--set` changes to the defaults, and what it costs and buys, measured."""

    settings: tuple[str, ...]
    summary: str


# Applied before the user's own --set. Numbers: docs/decisions.md#effort.
EFFORTS: dict[str, Effort] = {
    "quick": Effort(("allocation=uniform", "even_share=0.5", "self_study=0", "recall=64", "generic=24", "direct=24",
                     "answer_tokens=24", "pilot_prompts=16", "fit.steps=200", "fit.warmup=20", "fit.eval_every=50",
                     "onpolicy_steps=0", "refine_steps=0"),
                    "no written questions, no gap probe, a short fit"),
    "fast": Effort(("fit.steps=250",), "half the fit of default"),
    "default": Effort((), "the gap probe, written questions, a 500-step fit, on-policy refit, 15 refinement steps"),
}
EFFORT_HELP = ("how much compute the compile spends: " + "; ".join(f"{name}: {e.summary}" for name, e in EFFORTS.items())
               + " (default: default)")


def at_effort(name: str) -> CompileConfig:
    """The default config at effort level `name` (EFFORTS)."""
    if name not in EFFORTS:
        raise NectarError(f"unknown effort '{name}': use one of {', '.join(EFFORTS)}")
    return with_changes(CompileConfig(), parse_settings(list(EFFORTS[name].settings)))


def describe(markdown: bool = False) -> str:
    """Every field with its default, meaning and reason: `--set help`, and docs/options.md with `markdown`."""
    lines = []
    for part, cls in ((None, CompileConfig), *_PARTS.items()):
        for f in fields(cls):
            if f.name in _PARTS:
                continue
            default = f.default if f.default is not MISSING else f.default_factory()
            name, meta = f"{part}.{f.name}" if part else f.name, f.metadata
            why = f" Why: {meta['why']}" if meta.get("why") else ""
            see = f" ([decision](decisions.md#{meta['see']}))" if markdown and meta.get("see") else ""
            if markdown:
                lines.append(f"| `{name}` | `{default}` | {meta.get('meaning', '')}.{why}{see} |")
            else:
                lines.append(f"  {name}={default}\n      {meta.get('meaning', '')}" + (f"\n      why: {meta['why']}"
                                                                                    if meta.get("why") else ""))
    if markdown:
        return "| field | default | meaning |\n|---|---|---|\n" + "\n".join(lines) + "\n"
    return "\n".join(lines)


def options_page() -> str:
    """docs/options.md: written by `python -m nectar.config > docs/options.md`, checked by the tests."""
    return ("# Config fields\n\nEvery field of `CompileConfig`, set on the command line with `--set FIELD=VALUE` "
            "(`nectar compile` and `nectar eval`) or in Python. Generated from the fields' metadata in "
            "`nectar/config.py`; each link goes to the decision behind the default.\n\n" + describe(markdown=True))


if __name__ == "__main__":
    print(options_page(), end="")

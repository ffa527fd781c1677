"""Typed, validated configuration. Every check raises NectarError with what to change."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .errors import NectarError

VARIANTS = ("mlp", "quadrature")
ALLOCATIONS = ("uniform", "probe", "gap")
WEIGHT_BITS = (8, 16)  # module weight storage: int8 with a 16-bit scale per column, or 16-bit (nectar.quant)
EXACT_BITS = (4, 8, 16)  # exact-token storage: 4-bit codes two to a byte, int8, or 16-bit; a scale per channel
HOLDOUTS = ("chunks", "prompts")  # what validation holds out of training (PromptConfig.holdout)
EXACT_BY = ("mass", "output")  # how exact tokens are ranked (nectar.selection.TokenChoice)
# The measured best share of the budget for exact tokens where the gap allocation places them by KV head: at 2%,
# answer KL 0.035 / 0.028 / 0.025 / 0.029 on MPL and 0.025 / 0.021 / 0.020 on pydoc at 0.3 / 0.45 / 0.6 / 0.75
# (docs/results.md). Spread evenly (another allocation) each token buys less: there the earlier 0.3 stays.
EXACT_SHARE = 0.6
EXACT_SHARE_EVEN = 0.3
# The default share shrinks (in steps of 0.05) until the modules keep at least this width in a uniform bank: at
# 0.5% a share of 0.6 leaves MPL's modules 1 wide (agreement 0.828, KL 0.206), where 0.3 and 0.15 leave them
# 5 and 8 wide (0.858 / 0.141, 0.855 / 0.142). At 1% and above the 0.6 share keeps them at least this wide.
MIN_MODULE_WIDTH = 8
# Exact tokens' values take 4 bits with a scale per token (beside 8-bit keys) up to this budget, 8 bits above.
# Values enter the output linearly and tolerate rounding that keys do not, so 4 bits hold 31% more tokens in the
# same bytes: MPL read answer KL 0.129 against 0.143 at 0.5%, 0.018 against 0.023 at 2%, 0.005 against 0.006 at
# 5%. At 10%, where the hardest heads already keep 0.9 of the document, the rounding costs more than the tokens
# buy: 0.0029 against 0.0025 (docs/results.md).
VALUES_4BIT_UP_TO = 0.05


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise NectarError(message)


@dataclass
class PromptConfig:
    """How many training prompts of each kind, and their shape.

    recall: quote or continue a span; self_study: a question the model writes about a chunk; generic:
    summarise / explain / list a term; direct: a short question about a term, as a person words it. Answers
    are `answer_tokens` long; the document is cut into chunks of `chunk_tokens`, and `val_fraction` of the
    prompts are held out for validation: by whole chunks (`holdout="chunks"`), or at random (`"prompts"`).
    """

    recall: int = 128
    self_study: int = 96
    generic: int = 96
    direct: int = 96
    answer_tokens: int = 40
    chunk_tokens: int = 256
    val_fraction: float = 0.15
    # Held-out chunks measure generalisation to unseen text, but the modules then never see queries about
    # ~15% of the document, which a user's questions do reach. The document is fixed and known; what a
    # user brings that training did not see is new questions, which held-out prompts measure. Measured
    # neutral at 2% (mean of MPL and pydoc: 0.935 / KL 0.039 against 0.933 / 0.039, docs/results.md).
    holdout: str = "chunks"

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

    # 600 steps: level on MPL at 2%, but pydoc read 0.946 / KL 0.028 against 1000's 0.954 / 0.024.
    steps: int = 1000
    batch: int = 1024
    # Tiny standardised networks train far faster than the usual 3e-3 allows: on the default model, 4e-2
    # reaches in 1000 steps the error 3e-3 needs 3000 for, and flat from 2e-2 to 8e-2 (docs/results.md).
    lr: float = 4e-2
    warmup: int = 100
    weight_decay: float = 0.0
    ema: float = 0.995
    eval_every: int = 100
    patience: int = 4
    # Training matmuls in bfloat16 (weights, optimiser, loss and validation stay fp32): 1.5x faster steps on
    # a CPU with bf16 units (docs/results.md). None: on where the hardware has them, off where it would emulate.
    bf16: bool | None = None
    # The target error's weight is the document's share w of the merged output to this power. The merged
    # output's error is w times the target's, so 2 is its squared error; but 2 starves low-share queries,
    # where the merged output's relative error grows: MPL at 2% read KL 0.059 against 1's 0.056, and 0.5 was
    # level with 1 (0.055; docs/results.md).
    share_power: float = 1.0

    def __post_init__(self):
        _require(self.share_power >= 0, f"share_power must be >= 0, got {self.share_power}")
        _require(self.steps >= 1 and self.batch >= 1, "steps and batch must be >= 1")
        _require(self.lr > 0, "lr must be > 0")
        _require(0.0 <= self.ema < 1.0, "ema must be in [0, 1)")
        _require(self.eval_every >= 1 and self.patience >= 1, "eval_every and patience must be >= 1")


@dataclass
class CompileConfig:
    """What `nectar.compile` builds. `budget` is module bytes / document KV-cache bytes, same dtype."""

    budget: float = 0.02
    variant: str = "mlp"
    # Capacity per layer: equal; by a short probe fit's per-layer error ("probe"); or by the next-token KL
    # each layer causes when it alone uses the probe's modules ("gap").
    allocation: str = "gap"
    probe_steps: int = 150  # fitting steps of that probe
    # Training questions on which the probe measures each layer's KL ("gap"). 16 read answer KL 0.050 against
    # 8's 0.053 on MPL at 2%, agreement level, for 104 s more of a 15-minute compile (docs/results.md).
    probe_prompts: int = 8
    # Verbatim-recall training prompts the probe also measures, each set's KL taken as a share of its own total
    # (0: questions only). A head that copies text back costs quoting far more than questions, and by questions
    # alone keeps few exact tokens on some documents. At 2%, 4 read answer KL 0.021 against 0.035 on the zlib
    # FAQ, 0.016 against 0.029 on bzip2(1), 0.011 against 0.017 on pydoc, 0.017 against 0.018 on MPL, agreement
    # level or up, for ~1.5 min more of the compile (docs/results.md).
    probe_recall: int = 4
    # The hardest layers by that KL whose KV heads the probe then measures one by one, so that exact tokens
    # go to the heads that cause it (one head of MPL's layer 18 carried half its answer KL, the layer's two
    # others none). 0: a layer's heads share its tokens alike.
    head_gap_layers: int = 8
    seed: int = 0
    depth: int = 2  # hidden layers per network
    score_share: float = 0.4  # fraction of each module's parameters given to the score network
    # The target network's first hidden layer as a softmax over its units, attention over learned pseudo-keys,
    # instead of a GELU. 6% less output error on a fixed capture, but at 2% MPL read 0.922 / KL 0.055 against
    # 0.912 / 0.053 and pydoc 0.939 / 0.026 against 0.954 / 0.024: off (docs/results.md).
    target_softmax: bool = False
    # How module weights are stored: 8 (int8, a 16-bit scale per column: ~1.6x the width in the same bytes;
    # the modules are capacity-bound and rounding costs them ~nothing) or 16 (docs/results.md).
    weight_bits: int = 8
    # How the exact tokens past the sinks are stored: 8 (int8 keys and values, a 16-bit scale per channel of
    # each (layer, head): about twice the tokens in the same bytes; MPL at 2%: KL 0.045 -> 0.038) or 16.
    # 4 holds twice 8's tokens but rounds keys by ~10%: MPL at 2% read KL 0.044 against 8's 0.037.
    exact_bits: int = 8
    # How their values are stored: None takes 4 bits with a scale per token where the keys are 8-bit and the
    # budget is at most VALUES_4BIT_UP_TO, and the keys' bits otherwise (see there).
    exact_value_bits: int | None = None
    # Which tokens stay exact: those with the most attention summed over training queries, each query's
    # attention raised to this power. 1 sums the mass; 2 favours tokens some queries attend to sharply (a
    # verbatim quote, a looked-up name), which a module smooths over, above tokens many attend to a little.
    exact_power: float = 1.0
    # Ranked by that attention alone ("mass"), or times the distance of the token's value from the query's
    # output ("output"), the error that leaving it to a module would cause (nectar.selection.TokenChoice). At
    # 2%, hand-written questions read answer KL 0.0175 against 0.0184 on MPL, 0.0166 against 0.0187 on pydoc and
    # 0.0291 against 0.0342 on bzip2, agreement level or better; level at 10% (docs/results.md).
    exact_by: str = "output"
    # The most of the document (past the sinks) any one KV head keeps exact under the gap allocation: the
    # module must keep something to learn. A head that copies text back wants much of it: MPL's layer 18 head 2
    # keeps 1866 tokens at 0.5, 2466 at 0.9, and MPL at 2% read answer KL 0.023 against 0.025, question KL
    # 0.026 against 0.031 (docs/results.md). pydoc's heads stay under 0.5 at 2%.
    exact_head_cap: float = 0.9
    # End-to-end distillation steps on the answer KL after the per-layer fits (0: off). 30 hold nearly all
    # of its gain (MPL: validation KL 0.255 -> 0.240 at 30 steps, 0.239 at 60) in a 15-minute compile of a
    # 4k document on 2 cores, beside the 8-bit weights' wider fits.
    refine_steps: int = 30
    refine_anchor: float = 1.0  # weight of the per-layer regression loss beside refinement's KL
    refine_lr: float = 3e-4  # Adam's peak rate in refinement (warmup + cosine over its steps)
    # Weight of recall prompts' tokens in refinement's KL, beside 1 for the question kinds. Quoting's KL runs
    # 10-30x the questions' (pydoc at 2%: 0.37 against 0.01-0.04), so at 1 recall's third of the prompts
    # carries ~90% of the loss. MPL at 2%: 0.1 / 0.3 read answer KL 0.0168 / 0.0170 against 0.0176 on the
    # hand-written questions, greedy cosine 0.808 / 0.814 against 0.820, quoting's KL 3-7% worse: within
    # noise, so 1 stays (docs/results.md).
    refine_recall: float = 1.0
    # Budget share for document tokens kept exact, chosen as `exact_by` says (by layer and, in the hardest layers,
    # by KV head under the gap allocation).
    # None: EXACT_SHARE (EXACT_SHARE_EVEN under another allocation than gap) where every layer is global, less
    # where that would leave the modules under MIN_MODULE_WIDTH, 0 on models with sliding-window layers (not
    # supported yet).
    exact_share: float | None = None
    # Refit steps on queries captured with the fitted modules driving the model (0: off); most of a round's
    # gain comes in its first 100 steps (MPL, second round: validation error 0.0474 at 100, 0.0469 at 300).
    onpolicy_steps: int = 150
    # Capture-and-refit rounds, each on queries shaped by the previous round's modules. A second round bought
    # nothing measurable (MPL at 2%: 0.920 / KL 0.037 with one or two) for ~2 min of a 4k compile on 2 cores.
    onpolicy_rounds: int = 1
    sink_tokens: int = 4  # first document tokens kept exact: attention sinks, which carry much of the mass
    document_template: str | None = None  # "...{document}..."; None: derived from the chat template
    question_template: str | None = None  # "...{question}..."; None: derived from the chat template
    keep_document: bool = True  # store the token ids (not used at inference; lets `ask --compare` run)
    truncate: bool = False  # cut a too-long document instead of refusing it
    batch_size: int = 16  # prompts per forward pass during capture
    # Prompts decoded together while writing and answering training prompts: a CPU decode step costs little
    # more for 64 rows than for 16 (answering 64 questions after MPL-2.0: 1.55x faster at 64, docs/results.md).
    generate_batch: int = 64
    prompts: PromptConfig = field(default_factory=PromptConfig)
    fit: FitConfig = field(default_factory=FitConfig)

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
        _require(self.refine_steps >= 0, "refine_steps must be >= 0")
        _require(self.refine_anchor >= 0, f"refine_anchor must be >= 0, got {self.refine_anchor}")
        _require(self.refine_lr > 0, f"refine_lr must be > 0, got {self.refine_lr}")
        _require(self.refine_recall >= 0, f"refine_recall must be >= 0, got {self.refine_recall}")
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

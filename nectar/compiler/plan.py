"""The plan of one compile: every default decided, and the budget split into exact tokens and module widths.

Pure functions of the config, the model's shape, the document's length and what the gap probe measured:
nothing here runs the model, so a plan can be read, printed or tested without one.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .budget import allocate, head_gaps, params_per_module, uniform_exact
from ..config import EXACT_SHARE, MIN_MODULE_WIDTH, CompileConfig
from ..errors import NectarError
from ..model.models import head_dim, modeled_layers
from ..providers.modules import MLPBank
from .selection import TokenChoice

# Config fields whose default (None) the plan decides per model, document and budget.
RESOLVED = ("exact_share", "exact_value_bits")


@dataclass(frozen=True)
class Gaps:
    """What the gap probe measured: per modeled layer, the answer KL when it alone uses a short fit's modules;
    and for the hardest layers (by index in `layers`), the KL each of their KV heads causes alone."""

    layers: list[float]
    heads: dict[int, list[float]] | None = None


@dataclass(frozen=True)
class Plan:
    """One compile, decided: its config with every default resolved, the exact tokens each (layer, KV head)
    keeps beyond the sinks and how they are chosen, and the numbers each module may hold."""

    config: CompileConfig
    counts: tuple  # per model layer: a count, or one per KV head
    choice: TokenChoice
    per_module: int  # numbers per module in a uniform bank
    shares: list[int] | None  # numbers per module, by layer, under the gap allocation (None: uniform or measured)
    gaps: Gaps | None  # what the gap probe measured, where the plan needed it

    @property
    def exact(self) -> int:
        """The most exact tokens any head keeps (0: none beyond the sinks)."""
        return most(self.counts)


def most(counts) -> int:
    """The most exact tokens any head keeps, of counts per layer (each a number, or one per KV head)."""
    return counts if isinstance(counts, int) else max((most(c) for c in counts), default=0)


def probe_needs(config: CompileConfig, cfg, n: int) -> tuple[bool, bool]:
    """(whether the plan needs the gap probe's KL per layer: for module widths or exact tokens by layer; and
    per KV head of the hardest layers: for exact tokens by head)."""
    layers = config.allocation == "gap" and (config.variant == "mlp" or bool(config.exact_share))
    heads = layers and bool(config.head_gap_layers) and uniform_exact(n, config, head_dim(cfg)) > 0
    return layers, heads


def module_numbers(config: CompileConfig, cfg, n: int) -> int:
    """Numbers per module in a uniform bank, beside the exact tokens spread evenly; refused where none fit."""
    return params_per_module(cfg, n, config, uniform_exact(n, config, head_dim(cfg)))


def resolve(config: CompileConfig, cfg, n: int) -> CompileConfig:
    """The config with its exact share decided (the default one, less where modules would grow too narrow);
    and the bits of the exact values written out, so that the artifact says how it stores them."""
    config = replace(config, exact_value_bits=config.value_bits)
    if config.exact_share is None:
        share = EXACT_SHARE if config.allocation == "gap" else config.even_share
        return replace(config, exact_share=_default_share(config, cfg, n, share))
    return config


def _default_share(config: CompileConfig, cfg, n: int, share: float) -> float:
    """`share`, or less where a small budget would leave the modules narrower than MIN_MODULE_WIDTH (or
    no room at all, as on a short document): each token a module gives up buys less than its width."""
    for step in range(round(share / 0.05), 0, -1):
        chosen = replace(config, exact_share=round(step * 0.05, 2))
        try:
            per_module = params_per_module(cfg, n, chosen, uniform_exact(n, chosen, head_dim(cfg)))
        except NectarError:
            continue
        if min(mlp_bank(chosen, cfg, per_module).target_widths) >= MIN_MODULE_WIDTH:
            return chosen.exact_share
    return 0.0


def plan(config: CompileConfig, cfg, n: int, gaps: Gaps | None = None) -> Plan:
    """The plan of a resolved config on a model of config `cfg` and an n-token document; `gaps` where
    `probe_needs` says so."""
    per_module = module_numbers(config, cfg, n)
    shares = None
    if config.variant == "mlp" and config.allocation == "gap":
        # The KL a layer causes alone is very skewed (one layer in 30 can carry most of it): its square
        # root, within 0.5x-6x of uniform, moves capacity there without starving the others.
        shares = allocate(torch.tensor(gaps.layers).clamp_min(0).sqrt().tolist(), per_module, low=0.5, high=6.0)
    return Plan(config, exact_counts(config, cfg, n, gaps), TokenChoice.of(config), per_module, shares, gaps)


def exact_counts(config: CompileConfig, cfg, n: int, gaps: Gaps | None) -> tuple:
    """Tokens kept exact per (layer, head) beyond the sinks, per model layer: `exact_share` of the budget's
    tokens, the same in every modeled layer, or under the `gap` allocation in proportion to the KL each
    layer causes, since a layer whose module barely moves the answer needs no exact tokens at all. A
    sliding-window layer keeps none: its window's tail is exact already, and it has no module."""
    kv, modeled = cfg.num_key_value_heads, modeled_layers(cfg)
    per_layer = uniform_exact(n, config, head_dim(cfg))
    if not per_layer or config.allocation != "gap":
        return _on_model_layers(cfg, (per_layer,) * len(modeled))
    cells = gaps.layers
    if config.head_gap_layers:  # by KV head: a tuple of counts per layer
        cells = head_gaps(gaps.layers, gaps.heads, kv)
    cap = config.exact_head_cap * (n - config.sink_tokens)
    counts = allocate(cells, per_layer, low=0.0, high=max(1.0, cap / per_layer))
    if not config.head_gap_layers:
        return _on_model_layers(cfg, counts)
    return _on_model_layers(cfg, [tuple(counts[i: i + kv]) for i in range(0, len(counts), kv)])


def _on_model_layers(cfg, counts) -> tuple:
    """Counts per modeled layer spread over every model layer, 0 on the sliding ones."""
    if len(counts) == cfg.num_hidden_layers:
        return tuple(counts)
    per_layer = dict(zip(modeled_layers(cfg), counts))
    return tuple(per_layer.get(layer, 0) for layer in range(cfg.num_hidden_layers))


def mlp_bank(config: CompileConfig, cfg, params: int | list[int]) -> MLPBank:
    """A fresh MLP bank for the model's modeled layers, `params` numbers per module (one count, or one per layer)."""
    shape = (config.depth, config.score_share, config.weight_bits, config.target_softmax)
    # Initialised from the config's seed, not from whatever drew on the global generator before: a bank
    # compiled second from one workspace (an ablation in `nectar eval`) starts where it would alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        bank = MLPBank.for_budget(len(modeled_layers(cfg)), cfg.num_key_value_heads, head_dim(cfg), params, *shape)
    return on_modeled(bank, cfg)


def on_modeled(bank, cfg):
    """`bank`, told which model layers it serves (None: every layer has modules)."""
    modeled = modeled_layers(cfg)
    bank.model_layers = modeled if len(modeled) < cfg.num_hidden_layers else None
    return bank

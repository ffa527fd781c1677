"""Fit every module of the bank at once on captured queries; early stop on held-out prompts."""
from __future__ import annotations

import copy

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .capture import Store
from ..config import FitConfig
from ..measure.metrics import bank_errors, context_share
from ..model.models import has_fast_bf16
from .schedule import KeepBest, warmup_cosine


def loss_terms(bank, batch: Store, share_power: float = 1.0) -> tuple[Tensor, Tensor]:
    """Per-module (target error weighted by the document's share w ** share_power, score error), both in
    standardised units."""
    o, lse = bank.predict(batch.q)
    w = context_share(batch.lse_ctx, batch.lse_loc).pow(share_power)
    target = (w.unsqueeze(-1) * ((o - batch.o_ctx.float()) / bank.o_scale).pow(2)).mean((1, 2))
    score = ((lse - batch.lse_ctx) / bank.lse_scale).pow(2).mean(1)
    return target, score


def _shuffled(store: Store, generator: torch.Generator) -> Store:
    """The training rows in one random order, without o_loc (only the reported errors use it).

    One gather up front: each step then takes the next contiguous window, a view, instead of a random
    gather per step.
    """
    order = torch.randperm(store.size, generator=generator)
    return Store(store.q[:, order], store.o_ctx[:, order], store.lse_ctx[:, order], None, store.lse_loc[:, order])


def _window(store: Store, step: int, batch: int) -> Store:
    """Rows [step * batch, (step + 1) * batch) of the shuffled store, wrapping around at its end."""
    batch = min(batch, store.size)
    start = step * batch % store.size
    if start + batch <= store.size:
        index = slice(start, start + batch)
    else:
        index = torch.cat([torch.arange(start, store.size), torch.arange(start + batch - store.size)])
    return Store(store.q[:, index], store.o_ctx[:, index], store.lse_ctx[:, index], None, store.lse_loc[:, index])


def _bf16(bank, bf16: bool | None) -> tuple[str, bool]:
    """(device type, whether the fit's matmuls run in bf16 there): decided once per fit, not per step."""
    device = next(bank.parameters()).device
    enabled = has_fast_bf16(device) if bf16 is None else bf16
    return device.type, enabled and device.type in ("cpu", "cuda")


@torch.enable_grad()  # a caller inside `torch.no_grad()` still gets a fit
def fit(bank, train: Store, val: Store, config: FitConfig, seed: int = 0, progress: bool = True,
        warm: bool = False) -> dict:
    """Adam(W) with warmup + cosine and an EMA of the weights; keeps the EMA state best on validation.

    `warm` continues from the bank's weights and normalisation (which a fresh fit sets from `train`).
    """
    if not warm:
        bank.standardise(train.q, train.o_ctx, train.lse_ctx)
    generator = torch.Generator().manual_seed(seed)
    params = list(bank.parameters())
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    ema = copy.deepcopy(bank)
    ema_params = list(ema.parameters())
    start = bank_errors(ema, val)["merged_rel"].mean().item() if warm else float("inf")
    best, history = KeepBest(ema, score=start, patience=config.patience, min_delta=1e-4), []
    shuffled = _shuffled(train, generator)
    device_type, bf16 = _bf16(bank, config.bf16)
    bar = tqdm(range(config.steps), desc="fit", disable=not progress, leave=False)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(step, config.steps, config.lr, config.warmup)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            target, score = loss_terms(bank, _window(shuffled, step, config.batch), config.share_power)
        loss = (target + score).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - config.ema)
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            err = {k: v.mean().item() for k, v in bank_errors(ema, val).items()}
            history.append({"step": step + 1, "loss": loss.item() / len(target), **err})
            bar.set_postfix(val_o=f"{err['o_rel']:.3f}", val_lse=f"{err['lse_abs']:.3f}")
            if best.update(err["merged_rel"], ema):
                break
    best.restore(bank)
    return {"steps": history[-1]["step"] if history else 0, "history": history}

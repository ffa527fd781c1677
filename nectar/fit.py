"""Fit every module of the bank at once on captured queries; early stop on held-out chunks."""
from __future__ import annotations

import copy
import math

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .capture import Store
from .config import FitConfig
from .modules import MLPBank


def context_share(lse_ctx: Tensor, lse_loc: Tensor) -> Tensor:
    """Weight of the document part in the merged output."""
    return torch.sigmoid(lse_ctx - lse_loc)


def loss_terms(bank: MLPBank, batch: Store) -> tuple[Tensor, Tensor]:
    """Per-module (share-weighted target error, score error), both in standardised units."""
    o, lse = bank.predict(batch.q)
    w = context_share(batch.lse_ctx, batch.lse_loc)
    target = (w.unsqueeze(-1) * ((o - batch.o_ctx.float()) / bank.o_scale).pow(2)).mean((1, 2))
    score = ((lse - batch.lse_ctx) / bank.lse_scale).pow(2).mean(1)
    return target, score


def relative_error(approx: Tensor, true: Tensor) -> Tensor:
    """|approx - true| / |true| over the last dimension."""
    return (approx - true).norm(dim=-1) / true.norm(dim=-1).clamp_min(1e-6)


@torch.no_grad()
def errors(bank: MLPBank, store: Store, chunk: int = 8192) -> dict[str, Tensor]:
    """Per-module mean errors (DESIGN section 6): o_ctx relative, lse absolute, merged output relative."""
    sums = {"o_rel": 0.0, "lse_abs": 0.0, "merged_rel": 0.0}
    for start in range(0, store.size, chunk):
        part = store.rows(torch.arange(start, min(start + chunk, store.size)))
        o, lse = bank.predict(part.q)
        o_true, o_loc = part.o_ctx.float(), part.o_loc.float()
        sums["o_rel"] = sums["o_rel"] + relative_error(o, o_true).sum(1)
        sums["lse_abs"] = sums["lse_abs"] + (lse - part.lse_ctx).abs().sum(1)
        w_true = context_share(part.lse_ctx, part.lse_loc).unsqueeze(-1)
        w_pred = context_share(lse, part.lse_loc).unsqueeze(-1)
        merged = w_true * o_true + (1 - w_true) * o_loc
        approx = w_pred * o + (1 - w_pred) * o_loc
        sums["merged_rel"] = sums["merged_rel"] + relative_error(approx, merged).sum(1)
    return {k: v / store.size for k, v in sums.items()}


def _lr(step: int, cfg: FitConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _shuffled(store: Store, generator: torch.Generator) -> Store:
    """The training rows in one random order, without o_loc (only the reported errors use it).

    One gather up front: each step then takes the next contiguous window, a view, where a random
    gather per step cost 15% of the fit's time.
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


def fit(bank: MLPBank, train: Store, val: Store, cfg: FitConfig, seed: int = 0, progress: bool = True) -> dict:
    """Adam(W) with warmup + cosine and an EMA of the weights; keeps the EMA state best on validation."""
    bank.standardise(train.q, train.o_ctx, train.lse_ctx)
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in bank.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = copy.deepcopy(bank)
    ema_params = list(ema.parameters())
    best, best_state, stale, history = math.inf, copy.deepcopy(ema.state_dict()), 0, []
    shuffled = _shuffled(train, generator)
    bar = tqdm(range(cfg.steps), desc="fit", disable=not progress, leave=False)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg)
        target, score = loss_terms(bank, _window(shuffled, step, cfg.batch))
        loss = (target + score).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - cfg.ema)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            err = {k: v.mean().item() for k, v in errors(ema, val).items()}
            history.append({"step": step + 1, "loss": loss.item() / len(target), **err})
            bar.set_postfix(val_o=f"{err['o_rel']:.3f}", val_lse=f"{err['lse_abs']:.3f}")
            score_now = err["merged_rel"]
            if score_now < best - 1e-4:
                best, best_state, stale = score_now, copy.deepcopy(ema.state_dict()), 0
            else:
                stale += 1
                if stale >= cfg.patience:
                    break
    bank.load_state_dict(best_state)
    return {"steps": history[-1]["step"] if history else 0, "history": history}

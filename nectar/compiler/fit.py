"""Fit every module of the bank at once on captured queries; early stop on held-out prompts."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .capture import Store
from ..config import FitConfig
from ..measure.metrics import bank_errors, context_share
from ..model.models import has_fast_bf16
from ..providers.modules import STAT_BLOCK
from .schedule import KeepBest, warmup_cosine


RIDGE_ROWS = 8192  # rows per module that solve the output layers before a fresh fit: ~100x their widths


@dataclass
class Rows:
    """Training rows in the networks' own units (`bank.encode`, `bank.units`): inputs, targets, and each row's
    weight in the target error (the document's share of the merged output, to `share_power`)."""

    x: Tensor  # [M, N, d] encoded queries: bf16 where the fit runs in bf16 (what its matmuls read), else fp16
    o: Tensor  # [M, N, d] fp16
    lse: Tensor  # [M, N] fp32
    w: Tensor  # [M, N] fp32

    @property
    def size(self) -> int:
        return self.x.shape[1]

    def window(self, step: int, batch: int) -> Rows:
        """Rows [step * batch, (step + 1) * batch), wrapping around at the end: a view, except at the wrap."""
        batch = min(batch, self.size)
        start = step * batch % self.size
        if start + batch <= self.size:
            index = slice(start, start + batch)
        else:
            index = torch.cat([torch.arange(start, self.size), torch.arange(start + batch - self.size)])
        return Rows(self.x[:, index], self.o[:, index], self.lse[:, index], self.w[:, index])


def rows_of(bank, store: Store, share_power: float, order: Tensor | None = None, bf16: bool = False,
            block: int = STAT_BLOCK) -> Rows:
    """`store`'s rows (in `order`, if given) encoded once for the fit, a few modules at a time."""
    M, N, d = store.q.shape
    index = slice(None) if order is None else order
    device = store.q.device
    rows = Rows(torch.empty(M, N, d, dtype=torch.bfloat16 if bf16 else torch.float16, device=device),
                torch.empty(M, N, d, dtype=torch.float16, device=device), torch.empty(M, N, device=device),
                torch.empty(M, N, device=device))
    with torch.no_grad():
        for first in range(0, M, block):
            m = slice(first, min(first + block, M))
            lse_ctx = store.lse_ctx[m][:, index]
            rows.x[m] = bank.encode(store.q[m][:, index], m)
            rows.o[m], rows.lse[m] = bank.units(store.o_ctx[m][:, index], lse_ctx, m)
            rows.w[m] = context_share(lse_ctx, store.lse_loc[m][:, index]).pow(share_power)
    return rows


class WeightedSquare(torch.autograd.Function):
    """Per-module mean of w * (o - t)^2 over rows and channels ([M, N, d] -> [M]), in fp32, with its gradient
    in two passes over [M, N, d] where the expression's autograd graph makes about a dozen (the fit's largest
    cost after the matmuls)."""

    @staticmethod
    def forward(ctx, o: Tensor, t: Tensor, w: Tensor) -> Tensor:
        diff = o.float() - t  # mixed bf16 - fp16 promotes too, but by a slow elementwise cast path
        weighted = diff * w.unsqueeze(-1)
        M, count = o.shape[0], o.shape[1] * o.shape[2]
        ctx.save_for_backward(weighted)
        ctx.dtype, ctx.count = o.dtype, count
        return torch.linalg.vecdot(weighted.view(M, count), diff.view(M, count)) / count

    @staticmethod
    def backward(ctx, grad: Tensor):
        (weighted,) = ctx.saved_tensors
        return (weighted * (grad * (2 / ctx.count)).view(-1, 1, 1)).to(ctx.dtype), None, None


def _errors(o: Tensor, lse: Tensor, o_true: Tensor, lse_true: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Per-module (target error weighted by `w`, score error), all in output units."""
    return WeightedSquare.apply(o, o_true, w), (lse.float() - lse_true).pow(2).mean(1)


def unit_loss(bank, rows: Rows) -> tuple[Tensor, Tensor]:
    """The fit's per-module loss terms on encoded rows."""
    o, lse = bank.predict_units(rows.x if rows.x.dtype == torch.bfloat16 else rows.x.float())
    return _errors(o, lse, rows.o, rows.lse, rows.w)


def loss_terms(bank, batch: Store, share_power: float = 1.0) -> tuple[Tensor, Tensor]:
    """The same loss terms on raw captured rows (refinement's anchor): the target error weighted by the
    document's share w ** share_power."""
    w = context_share(batch.lse_ctx, batch.lse_loc).pow(share_power)
    return _errors(*bank.predict_units(bank.encode(batch.q)), *bank.units(batch.o_ctx, batch.lse_ctx), w)


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
    device_type, bf16 = _bf16(bank, config.bf16)
    # One random order, encoded once: each step then takes the next contiguous window, a view.
    shuffled = rows_of(bank, train, config.share_power, torch.randperm(train.size, generator=generator), bf16)
    if not warm and config.init == "ridge" and hasattr(bank, "solve_heads"):
        first = shuffled.window(0, RIDGE_ROWS)
        bank.solve_heads(first.x.float(), first.o.float(), first.lse, first.w)
    params = list(bank.parameters())
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    ema = copy.deepcopy(bank)
    ema_params = list(ema.parameters())
    start = bank_errors(ema, val)["merged_rel"].mean().item() if warm else float("inf")
    best, history = KeepBest(ema, score=start, patience=config.patience, min_delta=1e-4), []
    bar = tqdm(range(config.steps), desc="fit", disable=not progress, leave=False)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(step, config.steps, config.lr, config.warmup)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            target, score = unit_loss(bank, shuffled.window(step, config.batch))
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

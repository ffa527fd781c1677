"""End-to-end refinement: tune the module bank so the whole model's next-token distribution matches
the full-cache model's (top-k distillation), which is what per-layer regression alone cannot see:
per-layer errors compound through the network."""
from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..runtime.binding import bound
from .capture import Store
from .fit import loss_terms
from ..measure.metrics import BLOCK_NUMBERS
from ..providers.attention import ExactContext
from ..providers.modules import MLPBank
from ..model.padding import right_pad, right_padded_positions
from .schedule import KeepBest, warmup_cosine

ANCHOR_ROWS = 1024  # captured queries per step for the per-layer regression term
Teacher = list[tuple[Tensor, Tensor]]  # per sequence: top-k ids [len, k], log-probs [len, k]


class TopK:
    """Collects each sequence's top-k next-token (ids, log-probs) from a pass's logits, in sequence order.
    Log-probs are kept unnormalised over the top-k, so the tail's mass is known. A capture pass can feed
    it: the full-cache model's logits come with the queries at the cost of the output layer alone."""

    def __init__(self, sequences: list[list[int]], topk: int):
        self.lengths, self.topk = [len(s) for s in sequences], topk
        self.out: Teacher = [None] * len(sequences)

    def __call__(self, index: list[int], logits: Tensor) -> None:
        # A block of positions at a time, as the distillation loss (`position_blocks`): bitwise the same top-k.
        tops = [torch.log_softmax(block.float(), -1).topk(self.topk, dim=-1) for block in position_blocks(logits)]
        shape = (*logits.shape[:2], self.topk)
        ids = torch.cat([t.indices for t in tops]).view(shape)
        values = torch.cat([t.values for t in tops]).view(shape)
        for row, i in enumerate(index):
            self.out[i] = (ids[row, :self.lengths[i]].cpu(), values[row, :self.lengths[i]].cpu())


@torch.no_grad()
def teacher(model, seqs: list[list[int]], n: int, context, sinks: ExactContext | None, topk: int,
            batch_size: int = 16) -> Teacher:
    """Each sequence's top-k next tokens under `context`, the full document for refinement."""
    collect = TopK(seqs, topk)
    with bound(model, context, sinks):
        for start in range(0, len(seqs), batch_size):
            index = list(range(start, min(start + batch_size, len(seqs))))
            ids, _ = right_pad([seqs[i] for i in index])
            ids = ids.to(model.device)
            collect(index, model(input_ids=ids, position_ids=right_padded_positions(n, ids)).logits)
    return collect.out


def _distill_loss(model, bank, sinks, seqs, teacher: Teacher, n: int, weights: list[float] | None = None) -> Tensor:
    """KL(teacher || model) over the teacher's top-k tokens plus one bucket for all the others, at every
    position: the KL that `eval` reports on answers, short of the tail's shape (a renormalised top-k target would ignore the tail's mass
    and reward over-confidence). `weights`: each sequence's tokens' weight in the mean (default 1)."""
    ids, valid = right_pad(seqs)
    ids = ids.to(model.device)
    with bound(model, bank, sinks):
        logits = model(input_ids=ids, position_ids=right_padded_positions(n, ids)).logits
    width = ids.shape[1]
    top_ids = torch.stack([torch.nn.functional.pad(t[0], (0, 0, 0, width - len(t[0]))) for t in teacher])
    top_lp = torch.stack([torch.nn.functional.pad(t[1].float(), (0, 0, 0, width - len(t[1])), value=-1e4)
                          for t in teacher]).to(logits.device)
    student = _gathered_logprobs(logits, top_ids.to(logits.device))
    kl, valid = _kl_with_tail(top_lp, student), valid.to(logits.device)
    w = torch.tensor(weights or [1.0] * len(seqs), device=logits.device).unsqueeze(1).expand_as(kl)[valid]
    return (kl[valid] * w).sum() / w.sum().clamp_min(1e-12)


def position_blocks(logits: Tensor) -> tuple[Tensor, ...]:
    """[b, L, vocab] logits as blocks of positions of BLOCK_NUMBERS numbers each: the whole [b, L, vocab] fp32
    log-softmax (and in refinement its gradient, ~1 GB a step) is larger than glibc's mmap threshold, so the
    kernel hands it out fresh and faults it in page by page each time, where blocks reuse the heap. Rows are
    independent: the same numbers. `split`, not slicing: a slice's backward writes a zero tensor of the
    whole shape, once per block."""
    flat = logits.flatten(0, 1)
    return flat.split(max(1, BLOCK_NUMBERS // flat.shape[-1]))


def _gathered_logprobs(logits: Tensor, ids: Tensor) -> Tensor:
    """log_softmax(logits) in fp32 at `ids` [b, L, k], a block of positions at a time (`position_blocks`)."""
    blocks = position_blocks(logits)
    index = ids.flatten(0, 1).split(len(blocks[0]))
    return torch.cat([torch.log_softmax(b.float(), -1).gather(-1, i) for b, i in zip(blocks, index)]).view(ids.shape)


def kind_weights(recall: float, *prompt_sets) -> tuple[list[float], ...]:
    """Per prompt of each set, its tokens' weight in refinement's KL: `recall` for recall prompts, else 1."""
    return tuple([recall if p.kind == "recall" else 1.0 for p in prompts] for prompts in prompt_sets)


def _kl_with_tail(teacher_lp: Tensor, student_lp: Tensor) -> Tensor:
    """KL between two distributions coarsened to k named tokens and the rest; log-probs [..., k]."""
    p = teacher_lp.exp()
    p_tail = (1 - p.sum(-1)).clamp_min(0)
    # log(1 - sum q) computed from the log-sum-exp to stay finite when the top-k hold nearly all the mass
    q_tail = torch.log(-torch.expm1(student_lp.logsumexp(-1).clamp_max(-1e-6)))
    head = (p * (teacher_lp - student_lp)).sum(-1)
    return head + p_tail * (torch.log(p_tail.clamp_min(1e-12)) - q_tail)


@torch.enable_grad()
def refine(model, bank: MLPBank, sinks: ExactContext | None, train: list[list[int]], teacher: Teacher,
           val: list[list[int]], val_teacher: Teacher, n: int, steps: int, lr: float = 3e-4,
           batch_size: int = 8, eval_every: int = 30, seed: int = 0, progress: bool = True,
           anchor: Store | None = None, anchor_weight: float = 0.0, share_power: float = 1.0,
           weights: tuple[list[float], list[float]] | None = None) -> dict:
    """Adam on the bank's parameters only; keeps the state best on validation KL.

    With `anchor` (captured queries and their exact attention), the per-layer regression loss joins the KL,
    weighted by `anchor_weight` (its target error by the document's share to `share_power`): the few hundred
    prompts of the KL alone let modules drift from the attention they stand in for, which helps the prompts
    and hurts questions worded otherwise. `weights`: per (train, val) sequence, its tokens' weight in the KL."""
    frozen = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    bank.train().requires_grad_(True)
    opt = torch.optim.Adam(bank.parameters(), lr=lr)
    rng = torch.Generator().manual_seed(seed)
    train_w, val_w = weights or ([1.0] * len(train), [1.0] * len(val))

    def val_loss() -> float:
        with torch.no_grad():
            # Batch means weighted by their tokens' total weight: the weighted mean over all of validation.
            total, mass = 0.0, 0.0
            for i in range(0, len(val), 16):
                rows = slice(i, i + 16)
                weight = sum(w * len(s) for w, s in zip(val_w[rows], val[rows]))
                total += weight * _distill_loss(model, bank, sinks, val[rows], val_teacher[rows], n, val_w[rows]).item()
                mass += weight
        return total / max(mass, 1e-12)

    start = val_loss()
    best, history = KeepBest(bank, score=start), [{"step": 0, "val": start}]
    try:
        for step in tqdm(range(steps), desc="refine", disable=not progress, leave=False):
            for group in opt.param_groups:
                group["lr"] = warmup_cosine(step, steps, lr)
            pick = torch.randint(len(train), (batch_size,), generator=rng).tolist()
            loss = _distill_loss(model, bank, sinks, [train[i] for i in pick], [teacher[i] for i in pick], n,
                                 [train_w[i] for i in pick])
            if anchor is not None and anchor_weight > 0:
                rows = torch.randint(anchor.size, (ANCHOR_ROWS,), generator=rng)
                target, score = loss_terms(bank, anchor.rows(rows), share_power)
                loss = loss + anchor_weight * (target + score).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if (step + 1) % eval_every == 0 or step + 1 == steps:
                current = val_loss()
                history.append({"step": step + 1, "train": loss.item(), "val": current})
                best.update(current, bank)
    finally:
        best.restore(bank)
        bank.eval().requires_grad_(False)
        for p, flag in zip(model.parameters(), frozen):
            p.requires_grad_(flag)
    return {"history": history, "val_start": start, "val_best": best.best}

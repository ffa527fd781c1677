"""Batches of token sequences that follow an n-token document: padding and position ids."""
from __future__ import annotations

import torch


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) with each sequence at the right: for generation, where new tokens go last."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids, mask


def right_pad(seqs: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, valid) with each sequence at the left; for teacher-forced passes, where pads come last."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    valid = torch.zeros((len(seqs), width), dtype=torch.bool)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        valid[row, : len(seq)] = True
    return ids, valid


def positions_after(n: int, attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids for (left-padded) tokens that follow an n-token document."""
    return n + (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def right_padded_positions(n: int, ids: torch.Tensor) -> torch.Tensor:
    """Position ids n, n+1, ... for right-padded rows: real tokens never attend to the pads after them."""
    return (n + torch.arange(ids.shape[1], device=ids.device)).expand_as(ids)

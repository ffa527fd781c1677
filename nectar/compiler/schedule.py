"""The learning-rate schedule and the keep-the-best-weights rule that every fit in nectar shares."""
from __future__ import annotations

import copy
import math

from torch import nn


def warmup_cosine(step: int, steps: int, lr: float, warmup: int = 0) -> float:
    """Linear warmup over `warmup` steps, then a cosine decay to 0 at `steps`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class KeepBest:
    """Remembers the weights with the lowest validation score; says when `patience` checks bring nothing.

    Fits end on the best state seen, not the last: a late, noisy step never costs fidelity.
    """

    def __init__(self, module: nn.Module, score: float = math.inf, patience: int | None = None,
                 min_delta: float = 0.0):
        self.best, self.state = score, copy.deepcopy(module.state_dict())
        self.patience, self.min_delta, self.stale = patience, min_delta, 0

    def update(self, score: float, module: nn.Module) -> bool:
        """Record a check; True when the fit should stop early."""
        if score < self.best - self.min_delta:
            self.best, self.state, self.stale = score, copy.deepcopy(module.state_dict()), 0
            return False
        self.stale += 1
        return self.patience is not None and self.stale >= self.patience

    def restore(self, module: nn.Module) -> None:
        module.load_state_dict(self.state)

"""Profile the module fit on a synthetic store of the default model's real size: ms per step, top ops.

    python benchmarks/profile_fit.py [--rows 60000] [--steps 30] [--width 35]

The fit's cost depends on shapes only, so random queries of the default model's shapes (30 layers x
3 KV heads, head_dim 64) stand in for captured ones. Prints milliseconds per training step and the top operators of ten steps.
"""
import argparse
import time

import torch
from torch.profiler import profile

from nectar.compiler.capture import Store
from nectar.config import FitConfig
from nectar.compiler.fit import _shuffled, _window, fit, loss_terms
from nectar.providers.modules import MLPBank


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=60000)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--width", type=int, default=35)
    args = p.parse_args()
    M, d = 90, 64
    half = dict(dtype=torch.float16)
    def store(n):
        return Store(torch.randn(M, n, d, **half), torch.randn(M, n, d, **half), torch.randn(M, n),
                     torch.randn(M, n, d, **half), torch.randn(M, n))
    train, val = store(args.rows), store(args.rows // 8)
    bank = MLPBank(30, 3, d, args.width, args.width, depth=2)
    fit(bank, train, val, FitConfig(steps=3, eval_every=3), progress=False)  # standardise, warm up
    opt = torch.optim.AdamW(bank.parameters(), lr=1e-3)

    shuffled, steps = _shuffled(train, torch.Generator().manual_seed(0)), iter(range(10**9))

    def step():
        target, score = loss_terms(bank, _window(shuffled, next(steps), 1024))
        opt.zero_grad(set_to_none=True)
        (target + score).sum().backward()
        opt.step()

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    print(f"{(time.perf_counter() - start) / args.steps * 1e3:.0f} ms per training step")
    with profile() as prof:
        for _ in range(10):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))

if __name__ == "__main__":
    main()

"""Profile the module fit on a synthetic store of the default model's real size: ms per step, top ops.

    python benchmarks/profile_fit.py [--rows 90000] [--steps 100] [--widths 36,17,...] [--bits 8]

The fit's cost depends on shapes only, so random queries of the default model's shapes (30 layers x
3 KV heads, head_dim 64) stand in for captured ones. `--widths` gives each layer's target width (score
widths alike), as a gap-allocated bank has them; the default is pydoc:4096's at 2%. Runs `fit` itself
(bf16 where the hardware has it, the EMA, validation) and prints milliseconds per step, then the top
operators of a short fit.
"""
import argparse
import time

import torch
from torch.profiler import profile

from nectar.compiler.capture import Store
from nectar.config import FitConfig
from nectar.compiler.fit import fit
from nectar.providers.modules import MLPBank

PYDOC_4096 = "36,17,19,16,16,17,22,52,44,15,11,10,10,10,22,17,10,25,80,13,52,18,14,41,26,10,16,10,13,10"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=90000)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--widths", default=PYDOC_4096)
    p.add_argument("--bits", type=int, default=8)
    args = p.parse_args()
    M, d = 90, 64
    half = dict(dtype=torch.float16)

    def store(n):
        return Store(torch.randn(M, n, d, **half), torch.randn(M, n, d, **half), torch.randn(M, n),
                     torch.randn(M, n, d, **half), torch.randn(M, n))

    train, val = store(args.rows), store(args.rows // 6)
    widths = [int(w) for w in args.widths.split(",")]
    bank = MLPBank(30, 3, d, widths, widths, depth=2, weight_bits=args.bits)
    config = FitConfig(steps=args.steps, eval_every=args.steps, patience=100)
    fit(bank, train, val, FitConfig(steps=3, eval_every=3), progress=False)  # warm up
    start = time.perf_counter()
    fit(bank, train, val, config, progress=False)
    print(f"{(time.perf_counter() - start) / args.steps * 1e3:.0f} ms per training step (fit of {args.steps}, "
          "validation included)")
    with profile() as prof:
        fit(bank, train, val, FitConfig(steps=20, eval_every=20), progress=False)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()

"""Time the gap probe's per-layer KL (`nectar.evaluate.layer_gaps`) with and without replaying the reference.

    python benchmarks/profile_probe.py [--n 4096] [--pairs 8] [--repeats 2]

A cell that swaps layer l reads the reference's document attention back up to l instead of attending over
the document again. The cost depends on shapes only, so random prompts of the training prompts' size (a 30-token
question, a 40-token answer) on the default model in fp32 stand in for real ones, and no-document-plus-sinks
stands in for the probe's modules. Prints each run's seconds, min / median per mode, and that the KLs agree.
"""
import argparse
import statistics
import time

import torch

from nectar.providers.attention import NoContext
from nectar.model.documents import pydoc_text
from nectar.measure.fidelity import layer_gaps
from nectar.model.models import load_model, modeled_layers
from nectar.runtime.prefill import prefill, split_sinks
from nectar.model.templates import encode


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    torch.set_grad_enabled(False)
    model, tokenizer = load_model(dtype=torch.float32)
    doc = encode(tokenizer, pydoc_text())[: args.n]
    full = prefill(model, torch.tensor(doc))
    sinks, _ = split_sinks(full, 4)
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randint(100, 40000, (30,), generator=g).tolist(), torch.randint(100, 40000, (40,), generator=g).tolist())
             for _ in range(args.pairs)]
    layers = modeled_layers(model.config)
    seconds, kls = {False: [], True: []}, {}
    for _ in range(args.repeats):
        for replay in (False, True):  # side by side, so drift in the machine's speed hits both
            start = time.perf_counter()
            kls[replay] = layer_gaps(model, pairs, len(doc), full, (NoContext(), sinks), layers, batch_size=16,
                                     replay=replay)
            seconds[replay].append(time.perf_counter() - start)
            print(f"replay={replay}: {seconds[replay][-1]:.1f} s", flush=True)
    for replay, runs in seconds.items():
        print(f"replay={replay}: min {min(runs):.1f} s, median {statistics.median(runs):.1f} s over {len(runs)}")
    worst = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(kls[True], kls[False]))
    print(f"{len(layers)} cells; largest relative KL difference {worst:.1e}; "
          f"time ratio (min) {min(seconds[True]) / min(seconds[False]):.2f}")


if __name__ == "__main__":
    main()

"""Profile one greedy decode of the attached model: where a decode step spends its time, op by op.

    python benchmarks/profile_decode.py ARTIFACT [--batch 1] [--tokens 32]

Prints torch.profiler's top operators by self CPU time for the model with no document and with the
nectar modules attached, so the overhead of the modules is visible op by op.
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import nectar
from nectar.runtime.binding import bound
from nectar.eval.bench import greedy_decode as decode


def main():
    p = argparse.ArgumentParser()
    p.add_argument("artifact")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--rows", type=int, default=15)
    args = p.parse_args()
    art = nectar.Artifact.load(args.artifact)
    model, _ = nectar.load_model(art.manifest["model"]["fingerprint"]["name"], dtype=torch.bfloat16)
    modules, sinks = art.providers(model)
    prompt = torch.randint(100, 1000, (args.batch, 16))
    with torch.no_grad():
        for name, ctx in (("no document", None), ("nectar", (modules, sinks))):
            def run(ctx=ctx):
                if ctx is None:
                    return decode(model, prompt, 0, args.tokens)
                with bound(model, ctx[0]):
                    decode(model, prompt, art.n, args.tokens, ctx[1])  # sinks in a prefix cache
            run()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                run()
            print(f"=== {name}, batch {args.batch}, {args.tokens} tokens")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()

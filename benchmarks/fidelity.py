"""`nectar eval` with any CompileConfig, for fidelity experiments the CLI has no flag for.

    python benchmarks/fidelity.py DOC [--questions FILE] --out OUT [--config JSON] [--methods a,b,...]
        [--sweep 0.005,0.01,...] [--no-generate] [--eval-dtype float32|bfloat16]

DOC is a file or pydoc:TOKENS; --config holds CompileConfig fields as JSON, nested for the prompt mix and
the fit, e.g. '{"exact_share": 0.25, "prompts": {"direct": 96}}'. Prints the eval table and writes the
usual eval.json and plots under OUT.
"""
import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch

from nectar.eval.runner import Comparison, EvalConfig
from nectar.eval.report import table, write_report
from nectar.compiler.workspace import Workspace
from nectar.config import CompileConfig
from nectar.model.documents import load_text, parse_source
from nectar.model.models import load_model
from nectar.questions import read_questions


def config_from(overrides: dict) -> CompileConfig:
    base = asdict(CompileConfig())
    for key, value in overrides.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) else value
    return CompileConfig.from_dict(base)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("document")
    p.add_argument("--questions")
    p.add_argument("--out", required=True)
    p.add_argument("--config", default="{}")
    p.add_argument("--methods", default="nectar,no_document")
    p.add_argument("--sweep", default="", help="more budgets, comma-separated, for every method (no greedy answers)")
    p.add_argument("--no-generate", action="store_true")
    p.add_argument("--eval-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="dtype the methods and the full cache answer in (the compile runs in bf16)")
    args = p.parse_args()
    config = config_from(json.loads(args.config))
    budgets = tuple(float(b) for b in args.sweep.split(",") if b)
    evaluation = EvalConfig(budgets=budgets, methods=tuple(args.methods.split(",")), generate=not args.no_generate,
                            gap_prompts=0)
    questions = read_questions(args.questions) if args.questions else None
    model, tokenizer = load_model("smollm2-135m", dtype=torch.bfloat16)
    text = load_text(parse_source(args.document), tokenizer)
    out = Path(args.out)
    judge = model if args.eval_dtype == "bfloat16" else load_model("smollm2-135m", dtype=torch.float32)[0]
    report = Comparison(Workspace(model, tokenizer, text, config), None, questions, out, evaluation, judge).run()
    print(table(report))
    print("wrote " + ", ".join(str(p) for p in write_report(report, out)))


if __name__ == "__main__":
    main()

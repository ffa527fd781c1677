"""`nectar compile | ask | info | bench | eval | demo`: a fixable failure is one line on stderr and exit code 2.

Each command checks its arguments (document source, output path, numbers) before it imports torch or
loads a model, so a typo costs a second, not a minute.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .config import CompileConfig, FitConfig, PromptConfig
from .documents import Pydoc, load_text, parse_source
from .errors import NectarError
from .files import check_writable

DEMO_TOPICS = ("assert", "pass", "del", "return", "break", "continue", "global", "nonlocal", "if", "while", "lambda")
DEMO_QUESTIONS = (
    "What does the assert statement do?",
    "What does the global statement do?",
    "When is the else clause of a while loop executed?",
)


def _load(name: str, dtype: str, device: str = "auto"):
    import torch

    from .models import load_model

    return load_model(name, dtype=getattr(torch, dtype), device=device)


def _load_for(artifact, args):
    """The model the artifact was compiled for, unless --model names another (then it must match)."""
    model, tokenizer = _load(args.model or artifact.manifest["model"]["fingerprint"]["name"], args.dtype, args.device)
    artifact.check_compatible(model, tokenizer)
    return model, tokenizer


def _compile_config(args) -> CompileConfig:
    """The CompileConfig the flags ask for: built (and so validated) before anything slow runs."""
    return CompileConfig(budget=args.budget, variant=getattr(args, "variant", "mlp"),
                         allocation=getattr(args, "allocation", "uniform"), seed=args.seed, truncate=args.truncate,
                         exact_share=args.exact_share, onpolicy_steps=args.onpolicy_steps,
                         fit=FitConfig(steps=args.steps), prompts=PromptConfig.with_total(args.prompts))


def cmd_compile(args) -> None:
    config = _compile_config(args)
    source = parse_source(args.document)
    check_writable(args.output, "--output")
    from .compiler import compile
    from .summary import summary

    model, tokenizer = _load(args.model, args.dtype, args.device)
    artifact = compile(model, tokenizer, load_text(source, tokenizer), config)
    print(summary(artifact, artifact.save(args.output)))


def cmd_info(args) -> None:
    from .artifact import Artifact
    from .summary import summary

    artifact = Artifact.load(args.artifact)
    if args.json:
        print(json.dumps(artifact.manifest, indent=2))
    else:
        print(f"model: {artifact.manifest['model']['fingerprint']['name']}")
        print(summary(artifact))


def cmd_ask(args) -> None:
    from .prompts import read_questions

    _positive("--max-new-tokens", args.max_new_tokens)
    questions = read_questions(args.questions)
    from .artifact import Artifact
    from .generate import ask
    from .summary import compare_answers, indent

    artifact = Artifact.load(args.artifact)
    if args.compare and artifact.document_ids is None:
        raise NectarError("this artifact was compiled without its document ids: recompile it, or drop --compare")
    model, tokenizer = _load_for(artifact, args)
    if args.compare:
        print(compare_answers(model, tokenizer, artifact, questions, args.max_new_tokens))
        return
    start = time.perf_counter()
    answers = ask(model, tokenizer, artifact, questions, max_new_tokens=args.max_new_tokens)
    for q, a in zip(questions, answers):
        print(f"Q: {q}\n  {indent(a)}\n")
    print(f"{len(questions)} answer(s) in {time.perf_counter() - start:.1f} s")


def cmd_demo(args) -> None:
    from pydoc_data.topics import topics

    from .compiler import compile
    from .summary import compare_answers, summary

    check_writable(args.output, "--output")
    demo = CompileConfig(budget=args.budget, fit=FitConfig(steps=args.steps), onpolicy_steps=args.steps // 2,
                         prompts=PromptConfig(recall=64, self_study=48, generic=48))  # ends in a few minutes
    start = time.perf_counter()
    model, tokenizer = _load(args.model, "bfloat16")
    text = "\n\n".join(f"{name}\n{topics[name].strip()}" for name in DEMO_TOPICS)
    artifact = compile(model, tokenizer, text, demo)
    print(summary(artifact, artifact.save(args.output)) + "\n")
    print(compare_answers(model, tokenizer, artifact, list(DEMO_QUESTIONS), max_new_tokens=64))
    print(f"demo total {time.perf_counter() - start:.0f} s")


def cmd_bench(args) -> None:
    from .bench import BenchConfig

    config = BenchConfig(attention_n=args.attention_n, decode_n=args.n, batches=args.batch, repeats=args.repeats,
                         new_tokens=args.new_tokens)
    check_writable(Path(args.out) / "bench.json", "--out")
    from .artifact import Artifact
    from .bench import run
    from .bench_report import table, write_report
    from .documents import pydoc_text
    from .templates import encode

    artifact = Artifact.load(args.artifact)
    model, tokenizer = _load_for(artifact, args)
    report = run(model, artifact, encode(tokenizer, pydoc_text()), config)
    print(table(report))
    print("wrote " + ", ".join(str(p) for p in write_report(report, Path(args.out))))


def cmd_eval(args) -> None:
    from .compare import EvalConfig
    from .prompts import read_questions

    config = EvalConfig(budgets=tuple(args.sweep or ()), methods=tuple(args.methods or EvalConfig.methods),
                        generate=not args.no_generate, gap_prompts=args.gap_prompts)
    questions = read_questions(args.questions) if args.questions else None
    is_artifact = args.target.endswith(".nectar")
    source = None if is_artifact else parse_source(args.target)
    compiled = None if is_artifact else _compile_config(args)
    check_writable(Path(args.out) / "eval.json", "--out")
    from .artifact import Artifact
    from .compare import Comparison
    from .compare_report import table, write_report
    from .compiler import Workbench

    artifact = Artifact.load(args.target) if is_artifact else None
    if artifact is not None:
        model, tokenizer = _load_for(artifact, args)
        compiled = CompileConfig.from_dict(artifact.manifest["config"])
        context = _document_of(artifact, args.document, model, tokenizer, compiled)
    else:
        model, tokenizer = _load(args.model or "smollm2-135m", args.dtype, args.device)
        context = load_text(source, tokenizer)
    out = Path(args.out)
    report = Comparison(Workbench(model, tokenizer, context, compiled), artifact, questions, out, config).run()
    print(table(report))
    print("wrote " + ", ".join(str(p) for p in write_report(report, out)))


def _document_of(artifact, spec: str | None, model, tokenizer, config):
    """The artifact's document ids (a tensor, used verbatim): stored in it, or from the text the user passes."""
    import torch

    from .artifact import document_hash
    from .documents import document_ids
    from .templates import templates_for

    if spec is None:
        if artifact.document_ids is None:
            raise NectarError("this artifact does not hold its document, which the baselines and the full-cache "
                              "reference need: pass --document FILE (the text it was compiled from)")
        return torch.tensor(artifact.document_ids)
    text = load_text(parse_source(spec), tokenizer)
    ids = document_ids(text, tokenizer, model, config.truncate, templates_for(tokenizer, config)["document"])
    if document_hash(ids) != artifact.manifest["document"]["sha256"]:
        raise NectarError(f"{spec} is not the document this artifact was compiled from: pass that one")
    return torch.tensor(ids)


def _positive(flag: str, value: int) -> None:
    if value < 1:
        raise NectarError(f"{flag} must be at least 1, got {value}")


def _list_of(kind, what: str):
    def parse(text: str) -> list:
        try:
            values = [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of {what}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"'{text}' holds no {what}")
        return values
    return parse


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line like every other nectar error."""

    def error(self, message: str):
        print(f"nectar: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="nectar", description="Compile a long document into small neural modules that stand in for "
                "its KV cache, then ask questions against them.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="compile a document into an artifact",
                       description="Compile a document (in bf16 by default, ~3x faster than fp32 on CPU). The "
                       "questions it is compiled for follow the model's chat template; a base model with no chat "
                       "template gets a plain layout: the document, then '\\n\\nQuestion: ...\\nAnswer: '.")
    c.add_argument("document", help="UTF-8 text file, or pydoc[:TOKENS] for CPython's help topics")
    c.add_argument("-o", "--output", required=True, help="artifact path, e.g. manual.nectar")
    c.add_argument("--variant", default="mlp", help="module kind: mlp (default) or quadrature")
    c.add_argument("--allocation", default="uniform",
                   help="capacity per layer: uniform (default) or probe (by a short fit's per-layer error)")
    _compile_args(c)
    _model_args(c, default="smollm2-135m", dtype="bfloat16")
    c.set_defaults(run=cmd_compile)

    a = sub.add_parser("ask", help="answer questions with a compiled document",
                       description="Answer questions greedily with a compiled document (fp32 by default: answers "
                       "are compared word for word with the full cache's, where bf16 rounding would show).")
    a.add_argument("artifact")
    a.add_argument("questions", nargs="+", metavar="question", help="one or more; '-' reads one per line from stdin")
    a.add_argument("--compare", action="store_true",
                   help="also answer with the full KV cache; print MiniLM cosine, memory and time")
    a.add_argument("--max-new-tokens", type=int, default=128, help="longest answer, in tokens (default 128)")
    _model_args(a, default=None, dtype="float32")
    a.set_defaults(run=cmd_ask)

    i = sub.add_parser("info", help="show an artifact's manifest")
    i.add_argument("artifact")
    i.add_argument("--json", action="store_true", help="the whole manifest as JSON")
    i.set_defaults(run=cmd_info)

    b = sub.add_parser("bench", help="decode speed and memory against the full KV cache, side by side")
    b.add_argument("artifact")
    b.add_argument("--out", default="bench", help="folder for bench.json and bench.png")
    b.add_argument("--n", type=_list_of(int, "integers"), default=[1024, 2048, 4096, 8192],
                   help="document sizes for decode (default 1024,2048,4096,8192)")
    b.add_argument("--attention-n", type=_list_of(int, "integers"), default=[1024, 2048, 4096, 8192, 16384, 32768],
                   help="document sizes for the attention-only timing (synthetic keys)")
    b.add_argument("--batch", type=_list_of(int, "integers"), default=[1, 16], help="decode batch sizes (default 1,16)")
    b.add_argument("--repeats", type=_at_least_one, default=3,
                   help="rounds; every case runs once a round, and min/median are over rounds (default 3)")
    b.add_argument("--new-tokens", type=int, default=32, help="tokens generated per decode timing (default 32)")
    _model_args(b, default=None, dtype="bfloat16")
    b.set_defaults(run=cmd_bench)

    e = sub.add_parser("eval", help="fidelity against the full cache, beside every baseline at the same bytes")
    e.add_argument("target", help="an artifact (.nectar), or a document to compile first (file or pydoc:TOKENS)")
    e.add_argument("--questions", help="questions file: a JSON list, or one question a line "
                   "(default: the compile's held-out prompts)")
    e.add_argument("--document", help="the text the artifact was compiled from, if it does not hold its ids")
    e.add_argument("--sweep", type=_list_of(float, "numbers"),
                   help="more budgets to compare at, e.g. 0.005,0.01,0.02,0.05,0.1")
    e.add_argument("--methods", type=_list_of(str, "names"), help="comma-separated subset of methods (default: all)")
    e.add_argument("--out", default="eval", help="folder for eval.json, the plots and cached compiles")
    e.add_argument("--no-generate", action="store_true", help="skip greedy generation (faster)")
    e.add_argument("--gap-prompts", type=int, default=16, help="prompts for the per-layer gap probe (0: off)")
    _compile_args(e)
    _model_args(e, default=None, dtype="bfloat16")
    e.set_defaults(run=cmd_eval)

    d = sub.add_parser("demo", help="compile a bundled document, ask three questions, compare with the full cache")
    d.add_argument("-o", "--output", default="demo.nectar", help="where the demo's artifact goes (demo.nectar)")
    d.add_argument("--budget", type=float, default=0.02, help="module bytes / KV-cache bytes (default 0.02)")
    d.add_argument("--steps", type=_at_least_one, default=600, help="fitting steps (default 600)")
    d.add_argument("--model", default="smollm2-135m", help="model name or local folder (default smollm2-135m)")
    d.set_defaults(run=cmd_demo)
    return p


def _compile_args(p) -> None:
    p.add_argument("--budget", type=float, default=0.02, help="module bytes / KV-cache bytes (default 0.02)")
    p.add_argument("--steps", type=_at_least_one, default=1000, help="fitting steps (default 1000)")
    p.add_argument("--prompts", type=_at_least_one, default=320,
                   help="training prompts: 40%% recall, 30%% self-study, 30%% generic (default 320)")
    p.add_argument("--exact-share", type=float, default=CompileConfig.exact_share,
                   help="share of the budget spent on document tokens kept exact in each head, those training "
                   f"queries attend to most (default {CompileConfig.exact_share})")
    p.add_argument("--onpolicy-steps", type=int, default=CompileConfig.onpolicy_steps,
                   help="refit steps on queries captured with the fitted modules in place, as they will be at "
                   f"inference (default {CompileConfig.onpolicy_steps}; 0: off)")
    p.add_argument("--seed", type=int, default=0, help="seed of prompts, splits and fitting (default 0)")
    p.add_argument("--truncate", action="store_true", help="cut a document too long for the model (says how much)")


def _model_args(p, default, dtype) -> None:
    p.add_argument("--model", default=default, help="model name or local folder (default: the artifact's)")
    p.add_argument("--dtype", default=dtype, choices=("float32", "bfloat16"), help=f"model dtype (default {dtype})")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (the GPU if there is one)")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.run(args)
        sys.stdout.flush()
    except NectarError as e:
        print(f"nectar: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nectar: interrupted; nothing was written", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader (`| head`) left: what it did not read is not an error. Point stdout at nothing so
        # that the interpreter's own final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`nectar compile | ask | info | demo`: every failure a user can fix is one line on stderr, exit 2."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import NectarError

DEMO_TOPICS = ("assert", "pass", "del", "return", "break", "continue", "global", "nonlocal", "if", "while", "lambda")
DEMO_QUESTIONS = (
    "What does the assert statement do?",
    "What does the global statement do?",
    "When is the else clause of a while loop executed?",
)


def read_document(spec: str) -> str:
    """A UTF-8 text file, or `pydoc[:TOKENS]` for CPython's help topics (the first TOKENS tokens)."""
    if spec.startswith("pydoc"):
        return spec  # resolved once the tokenizer is loaded
    path = Path(spec)
    if not path.is_file():
        raise NectarError(f"no such file: {spec}")
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        raise NectarError(f"{spec} looks like a binary file: give a UTF-8 text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise NectarError(f"{spec} is not UTF-8 text: convert it (e.g. `iconv -t utf-8`) and retry") from None
    if not text.strip():
        raise NectarError(f"{spec} is empty: give a document with some text")
    return text


def _resolve_pydoc(spec: str, tokenizer) -> str:
    from .documents import pydoc_document

    _, _, tokens = spec.partition(":")
    try:
        return pydoc_document(tokenizer, int(tokens or 4096))
    except ValueError:
        raise NectarError(f"'{spec}': write pydoc or pydoc:TOKENS, e.g. pydoc:4096") from None


def _load(name: str, dtype: str, device: str = "auto"):
    import torch

    from .models import load_model

    return load_model(name, dtype=getattr(torch, dtype), device=device)


def _load_for(artifact, args):
    """The model the artifact was compiled for, unless --model names another."""
    return _load(args.model or artifact.manifest["model"]["fingerprint"]["name"], args.dtype, args.device)


def cmd_compile(args) -> None:
    from .artifact import Artifact  # noqa: F401  (fail early on a broken install)
    from .compiler import compile
    from .config import CompileConfig, FitConfig

    text = read_document(args.document)
    config = CompileConfig(budget=args.budget, variant=args.variant, allocation=args.allocation, seed=args.seed,
                           truncate=args.truncate, fit=FitConfig(steps=args.steps))
    model, tokenizer = _load(args.model, args.dtype, args.device)
    if text.startswith("pydoc"):
        text = _resolve_pydoc(text, tokenizer)
    artifact = compile(model, tokenizer, text, config)
    path = artifact.save(args.output)
    _summary(artifact, path)


def _summary(artifact, path=None) -> None:
    m = artifact.manifest
    fid = m["metrics"]["fidelity"]
    if path:
        print(f"wrote {path} ({Path(path).stat().st_size / 1e6:.2f} MB)")
    print(f"document: {m['document']['tokens']} tokens; modules: {_describe(m['modules'])}, "
          f"{artifact.memory_ratio():.4f} x the KV cache's bytes")
    val = m["metrics"]["validation"]
    print(f"validation: o_ctx rel err {val['o_rel']:.3f}, |lse err| {val['lse_abs']:.3f}, "
          f"merged rel err {val['merged_rel']:.4f}")
    for name, a in m["metrics"].get("questions", {}).items():
        print(f"  questions, {name:>11}: agreement {a['agreement']:.3f}, KL {a['kl']:.4f} ({a['tokens']} answer "
              "tokens, self-study + generic)")
    for kind, methods in fid.items():
        for name, parts in methods.items():
            a = parts["answer"]
            print(f"{kind:>10} answers, {name:>11}: agreement {a['agreement']:.3f}, KL {a['kl']:.4f} "
                  f"({a['tokens']} tokens)")
    print("timings (s): " + ", ".join(f"{k} {v}" for k, v in m["timings"].items()))


def _describe(modules: dict) -> str:
    if modules["variant"] == "quadrature":
        return f"quadrature, {modules['nodes']} nodes"
    t, s = modules["target_widths"], modules["score_widths"]
    widths = f"{t[0]}/{s[0]}" if len(set(t)) == 1 and len(set(s)) == 1 else f"{min(t)}-{max(t)}/{min(s)}-{max(s)}"
    return f"mlp ({modules.get('allocation', 'uniform')}), widths {widths}"


def cmd_info(args) -> None:
    from .artifact import Artifact

    artifact = Artifact.load(args.artifact)
    if args.json:
        print(json.dumps(artifact.manifest, indent=2))
    else:
        print(f"model: {artifact.manifest['model']['fingerprint']['name']}")
        _summary(artifact)


def cmd_ask(args) -> None:
    from .artifact import Artifact
    from .generate import ask

    artifact = Artifact.load(args.artifact)
    questions = read_questions(args.questions)
    if args.compare and artifact.document_ids is None:
        raise NectarError("this artifact was compiled without its document ids: recompile it, or drop --compare")
    model, tokenizer = _load_for(artifact, args)
    if args.compare:
        compare_answers(model, tokenizer, artifact, questions, args.max_new_tokens)
        return
    start = time.perf_counter()
    answers = ask(model, tokenizer, artifact, questions, max_new_tokens=args.max_new_tokens)
    for q, a in zip(questions, answers):
        print(f"Q: {q}\n  {a}\n")
    print(f"{len(questions)} answer(s) in {time.perf_counter() - start:.1f} s")


def read_questions(given: list[str]) -> list[str]:
    """The questions on the command line, or one per line from standard input for `-`."""
    if given == ["-"]:
        given = [line.strip() for line in sys.stdin]
    questions = [q for q in given if q.strip()]
    if not questions:
        raise NectarError("no questions: give them as arguments, or '-' and one per line on standard input")
    return questions


def compare_answers(model, tokenizer, artifact, questions: list[str], max_new_tokens: int) -> None:
    """Answer with nectar, then with the full cache; print each pair, then what the user compiled for:
    fidelity, memory, time."""
    from .generate import ask, ask_full

    start = time.perf_counter()
    answers = ask(model, tokenizer, artifact, questions, max_new_tokens=max_new_tokens)
    took = time.perf_counter() - start
    full = ask_full(model, tokenizer, artifact.document_ids, artifact.question_template, questions,
                    max_new_tokens=max_new_tokens)
    took_full = time.perf_counter() - start - took
    scores = [similarity(a, f) for a, f in zip(answers, full)]
    for q, a, f, score in zip(questions, answers, full, scores):
        print(f"Q: {q}\n  nectar:     {a}\n  full cache: {f}\n  similarity: {score:.3f}\n")
    print(f"similarity to the full cache: mean {sum(scores) / len(scores):.3f}, "
          f"identical answers {sum(a == f for a, f in zip(answers, full))}/{len(full)}")
    print(f"memory for the document: {artifact.nbytes() / 1e6:.2f} MB of modules and sink tokens against "
          f"{artifact.kv_bytes() / 1e6:.1f} MB of bf16 KV cache ({artifact.memory_ratio():.4f})")
    print(f"time: {took:.1f} s with nectar, {took_full:.1f} s with the full cache (including its prefill)")


def similarity(a: str, b: str) -> float:
    """Cosine similarity of MiniLM sentence embeddings, or token-set overlap if it is not installed."""
    try:
        from .semantic import cosine

        return cosine(a, b)
    except ImportError:
        sa, sb = set(a.split()), set(b.split())
        return len(sa & sb) / max(1, len(sa | sb))


def cmd_demo(args) -> None:
    from pydoc_data.topics import topics

    from .compiler import compile
    from .config import CompileConfig, FitConfig, PromptConfig

    start = time.perf_counter()
    model, tokenizer = _load(args.model, "bfloat16")
    text = "\n\n".join(f"{name}\n{topics[name].strip()}" for name in DEMO_TOPICS)
    # Fewer prompts and steps than a default compile, so that the demo ends within a few minutes.
    demo = CompileConfig(budget=args.budget, fit=FitConfig(steps=args.steps),
                         prompts=PromptConfig(recall=64, self_study=48, generic=48))
    artifact = compile(model, tokenizer, text, demo)
    path = artifact.save(args.output)
    _summary(artifact, path)
    print()
    compare_answers(model, tokenizer, artifact, list(DEMO_QUESTIONS), max_new_tokens=64)
    print(f"demo total {time.perf_counter() - start:.0f} s")


def cmd_bench(args) -> None:
    from .artifact import Artifact
    from .bench import BenchConfig, run
    from .documents import pydoc_text

    cfg = BenchConfig(attention_n=args.attention_n, decode_n=args.n, batches=args.batch, repeats=args.repeats,
                      new_tokens=args.new_tokens)
    artifact = Artifact.load(args.artifact)
    model, tokenizer = _load_for(artifact, args)
    artifact.check_compatible(model, tokenizer)
    doc_ids = tokenizer(pydoc_text(), add_special_tokens=False)["input_ids"]
    report = run(model, artifact, doc_ids, cfg, Path(args.out))
    print(f"{'n':>6} {'SDPA ms':>9} {'module ms':>10} {'speedup':>8}   (medians; min in bench.json)")
    for r in report["attention"]:
        print(f"{r['n']:>6} {r['sdpa_ms']:>9.3f} {r['module_ms']:>10.3f} {r['speedup']:>8.1f}")
    print("\nx: nectar's speed over that method, median of ratios within a round. no doc*: no document "
          "through nectar's kernel; full*: transformers' own DynamicCache + SDPA path (batch 1)")
    others = ("no_document", "no_document_nectar_kernel", "full_cache", "full_cache_stock")
    print(f"{'method':>26} {'n':>6} {'batch':>6} {'tok/s med':>10} {'tok/s best':>11} "
          f"{'x no doc':>9} {'x no doc*':>10} {'x full':>7} {'x full*':>8}")
    for r in report["decode"]:
        ratios = " ".join(f"{r[f'vs_{o}']:>{w}.2f}" if f"vs_{o}" in r else " " * w
                          for o, w in zip(others, (9, 10, 7, 8))) if r["method"] == "nectar" else ""
        print(f"{r['method']:>26} {r['n']:>6} {r['batch']:>6} {r['tok_s_median']:>10.1f} {r['tok_s_best']:>11.1f} {ratios}")
    print(f"\n{'n':>6} {'full cache MB':>14} {'nectar MB':>10} {'ratio':>8}")
    for r in report["memory"]:
        print(f"{r['n']:>6} {r['full_cache_bytes'] / 1e6:>14.2f} {r['nectar_bytes'] / 1e6:>10.2f} {r['ratio']:>8.4f}")
    gpu = f", peak GPU memory {report['peak_gpu_mb']:.0f} MB on {report['device']}" if "peak_gpu_mb" in report else ""
    print(f"\npeak RSS {report['peak_rss_mb']:.0f} MB{gpu}; wrote {args.out}/bench.json and {args.out}/bench.png")


def cmd_eval(args) -> None:
    import torch

    from .artifact import Artifact
    from .compare import Comparison, EvalConfig, read_questions, table, write_report
    from .compiler import Workbench
    from .config import CompileConfig

    config = EvalConfig(budgets=tuple(args.sweep or ()), methods=tuple(args.methods or EvalConfig.methods),
                        generate=not args.no_generate, gap_prompts=args.gap_prompts)
    questions = read_questions(args.questions) if args.questions else None  # before the slow part
    artifact = None
    if args.target.endswith(".nectar"):
        artifact = Artifact.load(args.target)
        model, tokenizer = _load_for(artifact, args)
        artifact.check_compatible(model, tokenizer)
        compiled = CompileConfig.from_dict(artifact.manifest["config"])
        ids = _document_of(artifact, args.document, model, tokenizer, compiled)
        bench = Workbench(model, tokenizer, torch.tensor(ids), compiled)
    else:
        text = read_document(args.target)
        model, tokenizer = _load(args.model or "smollm2-135m", args.dtype, args.device)
        if text.startswith("pydoc"):
            text = _resolve_pydoc(text, tokenizer)
        bench = Workbench(model, tokenizer, text, _document_config(args))
    out = Path(args.out)
    report = Comparison(bench, artifact, questions, out, config).run()
    print(table(report))
    print("wrote " + ", ".join(str(p) for p in write_report(report, out)))


def _document_config(args):
    from .config import CompileConfig, FitConfig

    return CompileConfig(budget=args.budget, truncate=args.truncate, fit=FitConfig(steps=args.steps))


def _document_of(artifact, spec: str | None, model, tokenizer, config) -> list[int]:
    """The artifact's document ids: stored in it, or re-tokenised from the text the user passes."""
    from .artifact import document_hash
    from .compiler import document_ids, templates_for

    if spec is None:
        if artifact.document_ids is None:
            raise NectarError("this artifact does not hold its document, which the baselines and the full-cache "
                              "reference need: pass --document FILE (the text it was compiled from)")
        return artifact.document_ids
    text = read_document(spec)
    if text.startswith("pydoc"):
        text = _resolve_pydoc(text, tokenizer)
    ids = document_ids(text, tokenizer, model, config, templates_for(tokenizer, config)["document"])
    if document_hash(ids) != artifact.manifest["document"]["sha256"]:
        raise NectarError(f"{spec} is not the document this artifact was compiled from: pass that one")
    return ids


def _budgets(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of numbers") from None


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _sizes(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of integers") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nectar", description="Compile a long document into small neural modules "
                                "that stand in for its KV cache, then ask questions against them.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="compile a document into an artifact")
    c.add_argument("document", help="UTF-8 text file, or pydoc[:TOKENS] for CPython's help topics")
    c.add_argument("-o", "--output", required=True, help="artifact path, e.g. manual.nectar")
    c.add_argument("--budget", type=float, default=0.02, help="module bytes / KV-cache bytes (default 0.02)")
    c.add_argument("--variant", default="mlp", help="module kind: mlp (default) or quadrature")
    c.add_argument("--allocation", default="uniform",
                   help="capacity per layer: uniform (default) or probe (by a short fit's per-layer error)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--steps", type=int, default=1000, help="fitting steps (default 1000)")
    c.add_argument("--truncate", action="store_true", help="cut a document too long for the model")
    _model_args(c, default="smollm2-135m", dtype="bfloat16")
    c.set_defaults(run=cmd_compile)

    a = sub.add_parser("ask", help="answer questions with a compiled document")
    a.add_argument("artifact")
    a.add_argument("questions", nargs="+", metavar="question", help="one or more; '-' reads one per line from stdin")
    a.add_argument("--compare", action="store_true", help="also answer with the full KV cache, and compare")
    a.add_argument("--max-new-tokens", type=int, default=128)
    _model_args(a, default=None, dtype="float32")
    a.set_defaults(run=cmd_ask)

    i = sub.add_parser("info", help="show an artifact's manifest")
    i.add_argument("artifact")
    i.add_argument("--json", action="store_true", help="the whole manifest as JSON")
    i.set_defaults(run=cmd_info)

    b = sub.add_parser("bench", help="decode speed and memory against the full KV cache, side by side")
    b.add_argument("artifact")
    b.add_argument("--out", default="bench", help="folder for bench.json and bench.png")
    b.add_argument("--n", type=_sizes, default=[1024, 2048, 4096, 8192], help="document sizes for decode")
    b.add_argument("--attention-n", type=_sizes, default=[1024, 2048, 4096, 8192, 16384, 32768],
                   help="document sizes for the attention-only timing (synthetic keys)")
    b.add_argument("--batch", type=_sizes, default=[1, 16], help="decode batch sizes")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--new-tokens", type=int, default=32)
    _model_args(b, default=None, dtype="bfloat16")
    b.set_defaults(run=cmd_bench)

    e = sub.add_parser("eval", help="fidelity against the full cache, beside every baseline at the same bytes")
    e.add_argument("target", help="an artifact (.nectar), or a document to compile first (file or pydoc:TOKENS)")
    e.add_argument("--questions", help="JSON list of questions (default: the held-out prompts of the compile)")
    e.add_argument("--document", help="the text the artifact was compiled from, if it does not hold its ids")
    e.add_argument("--sweep", type=_budgets, help="more budgets to compare at, e.g. 0.005,0.01,0.02,0.05,0.1")
    e.add_argument("--methods", type=_names, help="comma-separated subset of methods (default: all)")
    e.add_argument("--budget", type=float, default=0.02, help="budget when TARGET is a document (default 0.02)")
    e.add_argument("--steps", type=int, default=1000, help="fitting steps of each compile (default 1000)")
    e.add_argument("--out", default="eval", help="folder for eval.json, the plots and cached compiles")
    e.add_argument("--no-generate", action="store_true", help="skip greedy generation (faster)")
    e.add_argument("--gap-prompts", type=int, default=16, help="prompts for the per-layer gap probe (0: off)")
    e.add_argument("--truncate", action="store_true", help="cut a document too long for the model")
    _model_args(e, default=None, dtype="bfloat16")
    e.set_defaults(run=cmd_eval)

    d = sub.add_parser("demo", help="compile a bundled document, ask three questions, compare with the full cache")
    d.add_argument("-o", "--output", default="demo.nectar")
    d.add_argument("--budget", type=float, default=0.02)
    d.add_argument("--steps", type=int, default=600)
    d.add_argument("--model", default="smollm2-135m")
    d.set_defaults(run=cmd_demo)
    return p


def _model_args(p, default, dtype) -> None:
    p.add_argument("--model", default=default, help="model name or local folder (default: the artifact's)")
    p.add_argument("--dtype", default=dtype, choices=("float32", "bfloat16"))
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (the GPU if there is one)")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except NectarError as e:
        print(f"nectar: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nectar: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What each `nectar` command does, once its arguments are parsed: check them, load, run, print.

Each command checks its arguments (document source, output path, numbers) before it imports torch or
loads a model, so a typo costs a second, not a minute.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from ..config import CompileConfig, at_effort, parse_settings, with_changes
from ..model.documents import early_text, load_text, parse_source
from ..errors import NectarError
from ..files import check_writable

DEMO_TOPICS = ("assert", "pass", "del", "return", "break", "continue", "global", "nonlocal", "if", "while", "lambda")
DEMO_QUESTIONS = (
    "What does the assert statement do?",
    "What does the global statement do?",
    "When is the else clause of a while loop executed?",
)


def _load(name: str, dtype: str, device: str = "auto"):
    from ..model.models import load_model

    return load_model(name, dtype=dtype, device=device)


def _note_dtype(model, requested: str, expect: str = "--effort quick is the cheapest") -> None:
    """Say why a compile will be slow before it starts: "auto" chose fp32 on a CPU without bf16 units."""
    from ..model.models import dtype_name

    if requested == "auto" and model.device.type == "cpu" and dtype_name(model.dtype) == "float32":
        print("[nectar] this CPU has no bf16 units (AVX512-BF16 or AMX): compiling in fp32, ~4-5x slower than on one "
              f"that has them ({expect})", flush=True)


def _load_for(artifact, args):
    """The model the artifact was compiled for, unless --model names another (then it must match)."""
    model, tokenizer = _load(args.model or artifact.manifest["model"]["fingerprint"]["name"], args.dtype, args.device)
    artifact.check_compatible(model, tokenizer)
    return model, tokenizer


def _compile_config(args) -> CompileConfig:
    """The CompileConfig the flags ask for: built (and so validated) before anything slow runs."""
    base = replace(at_effort(args.effort), budget=args.budget, seed=args.seed, truncate=args.truncate)
    return with_changes(base, parse_settings(args.set))


def cmd_compile(args) -> int:
    config = _compile_config(args)
    from ..compiler.corpus import is_corpus

    if args.out or is_corpus(args.document):
        return _compile_corpus(args, config)
    if not args.output:
        raise NectarError("say where the artifact goes: -o NAME.nectar (or --out DIR to compile a corpus)")
    source = parse_source(args.document[0])
    check_writable(args.output, "--output")
    text = early_text(source)
    from ..compiler.pipeline import compile
    from .summary import brief

    model, tokenizer = _load(args.model, args.dtype, args.device)
    _note_dtype(model, args.dtype)
    artifact = compile(model, tokenizer, load_text(source, tokenizer, text), config)
    print(brief(artifact, artifact.save(args.output)))
    return 0


def _compile_corpus(args, config: CompileConfig) -> int:
    """Every document the arguments name, into --out; the exit code is the number that failed."""
    from ..compiler.corpus import CorpusJob, discover

    if args.output:
        raise NectarError("-o names one artifact; a corpus goes to a folder: --out DIR")
    if not args.out:
        raise NectarError("several documents need a folder for their artifacts: --out DIR")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise NectarError(f"--out {out} is a file: give a folder")
    check_writable(out / "index.json", "--out")
    sources = discover(args.document)
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    job = CorpusJob(sources, out, args.model, config, args.dtype, device, use_ray=not args.no_ray,
                    ray_address=args.ray_address, cpus_per_task=args.cpus_per_task)
    start = time.perf_counter()
    result = job.run()
    print(f"{len(sources)} document(s): {result['compiled']} compiled, {len(result['failed'])} failed, "
          f"{result['up_to_date']} up to date, {len(result['removed'])} removed, in {time.perf_counter() - start:.0f} s"
          f"; index: {out / 'index.json'}")
    for name in result["removed"]:
        print(f"removed: {name} (its file is gone)")
    return min(len(result["failed"]), 125)


def cmd_info(args) -> None:
    from ..artifact import Artifact
    from .summary import brief, summary

    artifact = Artifact.load(args.artifact)
    if args.json:
        print(json.dumps(artifact.manifest, indent=2))
    else:
        print(f"model: {artifact.manifest['model']['fingerprint']['name']}")
        print(summary(artifact) if args.verbose else brief(artifact, args.artifact, wrote=False))


def cmd_ask(args) -> None:
    from ..compiler.prompts import read_questions

    _positive("--max-new-tokens", args.max_new_tokens)
    questions = read_questions(args.questions)
    from ..artifact import Artifact
    from ..runtime.ask import ask
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

    from ..compiler.pipeline import compile
    from .summary import brief, compare_answers

    check_writable(args.output, "--output")
    demo = replace(at_effort(args.effort), budget=args.budget)  # quick by default: the demo ends in minutes
    start = time.perf_counter()
    model, tokenizer = _load(args.model, "auto")
    _note_dtype(model, "auto", expect="the demo takes minutes more")
    text = "\n\n".join(f"{name}\n{topics[name].strip()}" for name in DEMO_TOPICS)
    artifact = compile(model, tokenizer, text, demo)
    print(brief(artifact, artifact.save(args.output)) + "\n")
    print(compare_answers(model, tokenizer, artifact, list(DEMO_QUESTIONS), max_new_tokens=64))
    print(f"demo total {time.perf_counter() - start:.0f} s")


def cmd_bench(args) -> None:
    from ..eval.bench import BenchConfig

    config = BenchConfig(attention_n=args.attention_n, decode_n=args.n, batches=args.batch, repeats=args.repeats,
                         new_tokens=args.new_tokens)
    check_writable(Path(args.out) / "bench.json", "--out")
    from ..artifact import Artifact
    from ..eval.bench import run
    from ..eval.bench_report import table, write_report
    from ..model.documents import pydoc_text
    from ..model.templates import encode

    artifact = Artifact.load(args.artifact)
    model, tokenizer = _load_for(artifact, args)
    report = run(model, artifact, encode(tokenizer, pydoc_text()), config)
    print(table(report))
    print("wrote " + ", ".join(str(p) for p in write_report(report, Path(args.out))))


def cmd_eval(args) -> None:
    from ..eval.runner import EvalConfig
    from ..compiler.prompts import read_questions

    config = EvalConfig(budgets=tuple(args.sweep or ()), methods=tuple(args.methods or EvalConfig.methods),
                        generate=not args.no_generate, gap_prompts=args.gap_prompts,
                        max_new_tokens=args.max_new_tokens)
    questions = read_questions(args.questions) if args.questions else None
    is_artifact = args.target.endswith(".nectar")
    if is_artifact and args.set:
        raise NectarError("--set changes a compile, and an artifact was compiled with its own settings: eval the "
                          "document instead (nectar eval DOC --set ...), or name an ablation in --methods")
    spec = args.document if is_artifact else args.target  # the document's text: read before any model loads
    source = None if spec is None else parse_source(spec)
    text = early_text(source)
    compiled = None if is_artifact else _compile_config(args)
    check_writable(Path(args.out) / "eval.json", "--out")
    from ..artifact import Artifact
    from ..eval.runner import Comparison
    from ..eval.report import table, write_report
    from ..compiler.workspace import Workspace
    from ..model.models import resolve_dtype

    artifact = Artifact.load(args.target) if is_artifact else None
    if artifact is not None:
        model, tokenizer = _load_for(artifact, args)
        compiled = CompileConfig.from_dict(artifact.manifest["config"])
        compiled = replace(compiled, **{field: None for field in artifact.manifest.get("defaulted", [])})
        given = None if source is None else load_text(source, tokenizer, text)
        context = _document_of(artifact, args.document, given, model, tokenizer, compiled)
    else:
        model, tokenizer = _load(args.model or "smollm2-135m", args.dtype, args.device)
        _note_dtype(model, args.dtype)
        context = load_text(source, tokenizer, text)
    same = model.dtype == resolve_dtype(args.eval_dtype, model.device)
    judge = model if same else _load(model.name_or_path, args.eval_dtype, args.device)[0]
    out = Path(args.out)
    report = Comparison(Workspace(model, tokenizer, context, compiled), artifact, questions, out, config, judge).run()
    print(table(report))
    print("wrote " + ", ".join(str(p) for p in write_report(report, out)))


def _document_of(artifact, spec: str | None, text: str | None, model, tokenizer, config):
    """The artifact's document ids (a tensor, used verbatim): stored in it, or from `text`, that of the
    document the user names as `spec`."""
    import torch

    from ..artifact import document_hash
    from ..model.documents import document_ids
    from ..model.templates import templates_for

    if spec is None:
        if artifact.document_ids is None:
            raise NectarError("this artifact does not hold its document, which the baselines and the full-cache "
                              "reference need: pass --document FILE (the text it was compiled from)")
        return torch.tensor(artifact.document_ids)
    ids = document_ids(text, tokenizer, model, config.truncate, templates_for(tokenizer, config)["document"])
    if document_hash(ids) != artifact.manifest["document"]["sha256"]:
        raise NectarError(f"{spec} is not the document this artifact was compiled from: pass that one")
    return torch.tensor(ids)


def _positive(flag: str, value: int) -> None:
    if value < 1:
        raise NectarError(f"{flag} must be at least 1, got {value}")


def cmd_serve(args) -> None:
    paths = [Path(p) for p in args.artifacts]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise NectarError(f"no artifact or folder at {', '.join(missing)}: compile one with `nectar compile DOC -o "
                          "NAME.nectar`")
    try:
        from ..serve.server import ServeConfig, serve
    except ImportError as e:
        raise NectarError(f"serving needs {e.name}: pip install 'nectar[serve]'") from None
    config = ServeConfig(host=args.host, port=args.port, api_key=args.api_key, max_batch=args.max_batch,
                         max_tokens=args.max_tokens, max_body=args.max_body)
    _check_port(config.host, config.port)
    model, tokenizer = _load(args.model or _model_of(paths), args.dtype, args.device)
    from ..model.models import layer_windows

    if any(layer_windows(model.config)):
        raise NectarError(f"{model.config.model_type} has sliding-window layers, which `nectar serve` does not batch "
                          "yet: ask its documents with `nectar ask`")
    serve(model, tokenizer, paths, config)


def _check_port(host: str, port: int) -> None:
    """Fail before the model loads if the address is taken or cannot be bound."""
    import socket

    try:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise NectarError(f"cannot listen on {host}:{port} ({e.strerror}): pick another --port or --host") from None


def _model_of(paths: list[Path]) -> str:
    """The model of the first artifact found: a server runs one model, named by --model or its documents."""
    from ..artifact import Artifact

    for path in paths:
        for file in sorted(path.glob("*.nectar")) if path.is_dir() else [path]:
            try:
                return Artifact.load(file).manifest["model"]["fingerprint"]["name"]
            except NectarError:
                continue
    raise NectarError(f"no readable artifact in {', '.join(map(str, paths))}: pass --model to serve an empty folder")

"""What each `nectar` command does, once its arguments are parsed: check them, load, run, print.

Each command checks its arguments (document source, output path, numbers) before it imports torch or
loads a model, so a typo costs a second, not a minute.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from ..config import CompileConfig, at_effort, parse_settings, with_changes
from ..model.documents import check_length, early_text, load_text, parse_source
from ..errors import NectarError
from ..files import check_writable
from ..manifest import check_model_for, read_header, useless_warning
from ..questions import read_questions
from ..model.registry import check_model, positions_of

LARGE_BUDGET = 0.5  # past this share of the cache's bytes an artifact saves little: say so before compiling

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


def _open(path: str, args, needs_document: str | None = None) -> tuple[dict, str]:
    """(manifest, model to load) for an artifact, read from its header before torch is imported: a missing
    or unreadable file, a --model it was not compiled for, or (when `needs_document` names what needs them)
    absent document ids are refused at once; an artifact measured no better than no document is flagged."""
    manifest, tensors = read_header(path)
    model = check_model_for(manifest, getattr(args, "model", None))
    if needs_document and "document.ids" not in tensors:
        raise NectarError(f"this artifact was compiled with --no-document: {needs_document}")
    _warn(useless_warning(manifest))
    return manifest, model


def _warn(line: str | None) -> None:
    if line:
        print(line, file=sys.stderr, flush=True)


def _load_for(path: str, model_name: str, args):
    """(artifact, model, tokenizer): the artifact verified, and the model it was compiled for."""
    from ..artifact import Artifact

    artifact = Artifact.load(path)
    model, tokenizer = _load(model_name, args.dtype, args.device)
    artifact.check_compatible(model, tokenizer)
    return artifact, model, tokenizer


def _compile_config(args) -> CompileConfig:
    """The CompileConfig the flags ask for: built (and so validated) before anything slow runs."""
    base = replace(at_effort(args.effort), budget=args.budget, seed=args.seed, truncate=args.truncate)
    return with_changes(base, parse_settings(args.set))


def cmd_compile(args) -> int:
    config = _compile_config(args)
    from ..compiler.sources import is_corpus

    check_model(args.model)
    if args.out or is_corpus(args.document):
        return _compile_corpus(args, config)
    if not args.output:
        raise NectarError("say where the artifact goes: -o NAME.nectar (or --out DIR to compile a corpus)")
    source = parse_source(args.document[0])
    check_length(source, positions_of(args.model), config.truncate)
    check_writable(args.output, "--output")
    text = early_text(source)
    _warn_budget(config.budget)
    from ..compiler.pipeline import compile
    from .summary import brief

    model, tokenizer = _load(args.model, args.dtype, args.device)
    _note_dtype(model, args.dtype)
    artifact = compile(model, tokenizer, load_text(source, tokenizer, text), config)
    if args.no_document:
        artifact.document_ids = None
    print(brief(artifact, artifact.save(args.output)))
    return 0


def _warn_budget(budget: float) -> None:
    if budget > LARGE_BUDGET:
        _warn(f"[nectar] warning: --budget {budget} makes the artifact {budget:.0%} of the KV cache's bytes, about "
              "as large as the cache it stands in for; a few percent (e.g. 0.02) is what nectar is for")


def _compile_corpus(args, config: CompileConfig) -> int:
    """Every document the arguments name, into --out; the exit code is the number that failed."""
    from ..compiler.corpus import CorpusJob
    from ..compiler.sources import discover

    if args.output:
        raise NectarError("-o names one artifact; a corpus goes to a folder: --out DIR")
    if not args.out:
        raise NectarError("several documents need a folder for their artifacts: --out DIR")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise NectarError(f"--out {out} is a file: give a folder")
    check_writable(out / "index.json", "--out")
    sources = discover(args.document)
    _warn_budget(config.budget)
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    job = CorpusJob(sources, out, args.model, config, args.dtype, device, use_ray=not args.no_ray,
                    ray_address=args.ray_address, cpus_per_task=args.cpus_per_task,
                    keep_document=not args.no_document)
    start = time.perf_counter()
    result = job.run()
    print(f"{len(sources)} document(s): {result['compiled']} compiled, {len(result['failed'])} failed, "
          f"{result['up_to_date']} up to date, {len(result['removed'])} removed, in {time.perf_counter() - start:.0f} s"
          f"; index: {out / 'index.json'}")
    for name in result["removed"]:
        print(f"removed: {name} (its file is gone)")
    return min(len(result["failed"]), 125)


def cmd_info(args) -> None:
    _open(args.artifact, args)
    from ..artifact import Artifact
    from .summary import brief, summary

    artifact = Artifact.load(args.artifact)
    if args.json:
        print(json.dumps(artifact.manifest, indent=2))
    else:
        print(f"model: {artifact.manifest['model']['fingerprint']['name']}")
        print(summary(artifact) if args.verbose else brief(artifact, args.artifact, wrote=False))


def cmd_ask(args) -> None:
    questions = read_questions(args.questions)
    _, name = _open(args.artifact, args, needs_document=args.compare and "--compare answers with the full KV "
                    "cache, which needs the document: drop --compare, or compile an artifact that keeps it")
    from ..runtime.ask import ask
    from .summary import compare_answers, indent

    artifact, model, tokenizer = _load_for(args.artifact, name, args)
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
    _, name = _open(args.artifact, args)
    check_writable(Path(args.out) / "bench.json", "--out")
    from ..eval.bench import BenchConfig, run
    from ..eval.bench_report import table, write_report
    from ..model.documents import pydoc_text
    from ..model.templates import encode

    config = BenchConfig(attention_n=args.attention_n, decode_n=args.n, batches=args.batch, repeats=args.repeats,
                         new_tokens=args.new_tokens)
    artifact, model, tokenizer = _load_for(args.artifact, name, args)
    report = run(model, artifact, encode(tokenizer, pydoc_text()), config)
    print(table(report))
    print("wrote " + ", ".join(str(p) for p in write_report(report, Path(args.out))))


def cmd_eval(args) -> None:
    questions = read_questions(args.questions) if args.questions else None
    is_artifact = args.target.endswith(".nectar")
    if is_artifact and args.set:
        raise NectarError("--set changes a compile, and an artifact was compiled with its own settings: eval the "
                          "document instead (nectar eval DOC --set ...), or name an ablation in --methods")
    spec = args.document if is_artifact else args.target  # the document's text: read before any model loads
    source = None if spec is None else parse_source(spec)
    if is_artifact:
        _, name = _open(args.target, args, needs_document=None if spec else "the baselines and the full-cache "
                        "reference need the document: pass --document FILE (the text it was compiled from)")
    else:
        name = args.model or "smollm2-135m"
        check_model(name)
    compiled = None if is_artifact else _compile_config(args)
    if not is_artifact:
        check_length(source, positions_of(name), compiled.truncate)
    text = early_text(source)
    check_writable(Path(args.out) / "eval.json", "--out")
    from ..eval.runner import Comparison, EvalConfig

    config = EvalConfig(budgets=tuple(args.sweep or ()), methods=tuple(args.methods or EvalConfig.methods),
                        generate=not args.no_generate, gap_prompts=args.gap_prompts,
                        max_new_tokens=args.max_new_tokens)
    from ..eval.report import table, write_report
    from ..compiler.workspace import Workspace
    from ..model.models import resolve_dtype

    artifact = None
    if is_artifact:
        artifact, model, tokenizer = _load_for(args.target, name, args)
        compiled = CompileConfig.from_dict(artifact.manifest["config"])
        compiled = replace(compiled, **{field: None for field in artifact.manifest.get("defaulted", [])})
        given = None if source is None else load_text(source, tokenizer, text)
        context = _document_of(artifact, args.document, given, model, tokenizer, compiled)
    else:
        model, tokenizer = _load(name, args.dtype, args.device)
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


def cmd_serve(args) -> None:
    paths = [Path(p) for p in args.artifacts]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise NectarError(f"no artifact or folder at {', '.join(missing)}: compile one with `nectar compile DOC -o "
                          "NAME.nectar`")
    if args.model:
        check_model(args.model)
    model_name = _model_of(paths, args.model)
    if args.host not in LOOPBACK and not args.api_key:
        _warn(f"[nectar] warning: --host {args.host} without --api-key: anyone who can reach this machine can read "
              "the documents served; pass --api-key KEY")
    try:
        from ..serve.server import ServeConfig, serve
    except ImportError as e:
        raise NectarError(f"serving needs {e.name}: pip install 'nectar[serve]'") from None
    config = ServeConfig(host=args.host, port=args.port, api_key=args.api_key, max_batch=args.max_batch,
                         max_tokens=args.max_tokens, max_body=args.max_body)
    _check_port(config.host, config.port)
    model, tokenizer = _load(model_name, args.dtype, args.device)
    serve(model, tokenizer, paths, config)


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _check_port(host: str, port: int) -> None:
    """Fail before the model loads if the address is taken or cannot be bound."""
    import socket

    try:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise NectarError(f"cannot listen on {host}:{port} ({e.strerror}): pick another --port or --host") from None


def _model_of(paths: list[Path], wanted: str | None = None) -> str:
    """The one model of the artifacts found (read from their headers): a server runs one model, named by
    --model (`wanted`) or by its documents; a folder that mixes models without --model, artifacts none of
    which fits the model asked, or none readable, is refused."""
    from ..manifest import model_name, read_manifest

    names, manifests, reasons = {}, [], []
    for path in paths:
        for file in sorted(path.glob("*.nectar")) if path.is_dir() else [path]:
            try:
                manifests.append(read_manifest(file))
                names.setdefault(model_name(manifests[-1]), file)
            except NectarError as e:
                reasons.append(str(e))
    if wanted:
        if manifests and not any(_fits(m, wanted) for m in manifests):
            found = ", ".join(f"{name} ({file})" for name, file in names.items())
            raise NectarError(f"no artifact here was compiled for {wanted}: found {found}; drop --model, or compile "
                              f"the documents for {wanted}")
        return wanted
    if len(names) > 1:
        found = ", ".join(f"{name} ({file})" for name, file in names.items())
        raise NectarError(f"these artifacts are for different models: {found}; a server runs one model: pass "
                          "--model NAME to serve that model's, or serve each model's folder on its own port")
    if names:
        return next(iter(names))
    if reasons:
        raise NectarError(f"no readable artifact in {', '.join(map(str, paths))}: {reasons[0]}"
                          + (f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else ""))
    raise NectarError(f"no artifact in {', '.join(map(str, paths))}: pass --model to serve an empty folder, then "
                      "compile into it and POST /v1/reload")


def _fits(manifest: dict, model: str) -> bool:
    from ..manifest import check_model_for

    try:
        check_model_for(manifest, model)
        return True
    except NectarError:
        return False

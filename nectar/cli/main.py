"""`nectar compile | ask | info | bench | eval | serve | demo`: the arguments of each command.

A fixable failure is one line on stderr and exit code 2, whether argparse or the command finds it.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from .commands import cmd_ask, cmd_bench, cmd_compile, cmd_demo, cmd_eval, cmd_info, cmd_serve
from dataclasses import fields

from ..config import EFFORT_HELP, CompileConfig, describe
from ..errors import NectarError


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


def _at_least(low: int, many: bool = False):
    """An argparse type: a whole number (or comma-separated list of them, `many`), each at least `low`."""
    def parse(text: str):
        values = _list_of(int, "whole numbers")(text) if many else [_whole(text)]
        if min(values) < low:
            raise argparse.ArgumentTypeError(f"'{text}': {'each ' if many else ''}must be at least {low}")
        return values if many else values[0]
    return parse


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None


_at_least_one = _at_least(1)


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
                       description="Compile a document. The questions it is compiled for follow the model's chat "
                       "template; a base model with no chat template (gemma3-270m) gets the document, then "
                       "'\\n\\nQuestion: ...\\nAnswer:'. Known models: smollm2-135m (default), gemma3-270m (32k "
                       "context; its sliding-window layers keep their window's tail exact, modules learn the global "
                       "ones). Every other setting: --set FIELD=VALUE (--set help lists them).")
    c.add_argument("document", nargs="+", help="UTF-8 text file, or pydoc[:TOKENS] for CPython's help topics; "
                   "several files, folders or globs compile a corpus into --out")
    c.add_argument("-o", "--output", help="artifact path for one document, e.g. manual.nectar")
    c.add_argument("--out", help="folder for a corpus: one artifact per document and index.json; a re-run "
                   "compiles only what changed, and removes the artifacts of documents that are gone")
    c.add_argument("--no-ray", action="store_true", help="compile a corpus in this process, one document at a time")
    c.add_argument("--ray-address", help="HOST:PORT of a Ray cluster's head (default: start a local one)")
    c.add_argument("--cpus-per-task", type=_at_least_one, default=1, help="CPUs each corpus task asks Ray for")
    c.add_argument("--no-document", action="store_true", help="leave the document's token ids out of the artifact "
                   "(they are in it by default, for `ask --compare` and `eval`): share the artifact without "
                   "sharing the text")
    _compile_args(c)
    _model_args(c, default="smollm2-135m", dtype="auto")
    c.set_defaults(run=cmd_compile)

    a = sub.add_parser("ask", help="answer questions with a compiled document",
                       description="Answer questions greedily with a compiled document (fp32 by default: answers "
                       "are compared word for word with the full cache's, where bf16 rounding would show).")
    a.add_argument("artifact")
    a.add_argument("questions", nargs="+", metavar="question", help="one or more; '-' reads one per line from stdin")
    a.add_argument("--compare", action="store_true",
                   help="also answer with the full KV cache; print MiniLM cosine, memory and time")
    a.add_argument("--max-new-tokens", type=_at_least_one, default=128, help="longest answer, in tokens (default 128)")
    _model_args(a, default=None, dtype="float32")
    a.set_defaults(run=cmd_ask)

    i = sub.add_parser("info", help="show an artifact's manifest")
    i.add_argument("artifact")
    i.add_argument("--json", action="store_true", help="the whole manifest as JSON")
    i.add_argument("-v", "--verbose", action="store_true", help="every measurement: per prompt kind, per layer, "
                   "per stage")
    i.set_defaults(run=cmd_info)

    b = sub.add_parser("bench", help="decode speed and memory against the full KV cache, side by side")
    b.add_argument("artifact")
    b.add_argument("--out", default="bench", help="folder for bench.json and bench.png")
    b.add_argument("--n", type=_at_least(16, many=True), default=[1024, 2048, 4096, 8192],
                   help="document sizes for decode (default 1024,2048,4096,8192)")
    b.add_argument("--attention-n", type=_at_least(16, many=True), default=[1024, 2048, 4096, 8192, 16384, 32768],
                   help="document sizes for the attention-only timing (synthetic keys)")
    b.add_argument("--batch", type=_at_least(1, many=True), default=[1, 16], help="decode batch sizes (default 1,16)")
    b.add_argument("--repeats", type=_at_least_one, default=3,
                   help="rounds; every case runs once a round, and min/median are over rounds (default 3)")
    b.add_argument("--new-tokens", type=_at_least(2), default=32, help="tokens generated per decode timing (default 32)")
    _model_args(b, default=None, dtype="auto")
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
    e.add_argument("--gap-prompts", type=_at_least(0), default=16, help="prompts for the per-layer gap probe (0: off)")
    e.add_argument("--max-new-tokens", type=_at_least_one, default=40,
                   help="longest full-cache answer, in tokens: what every method is judged on, teacher-forced and "
                   "greedy (default 40)")
    _compile_args(e)
    _model_args(e, default=None, dtype="auto")
    e.add_argument("--eval-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="dtype every method, the full cache included, answers in (default float32, as `nectar ask` "
                   "and `serve` answer; --dtype is the compile's)")
    e.set_defaults(run=cmd_eval)

    s = sub.add_parser("serve", help="answer questions about compiled documents over an OpenAI-compatible HTTP API",
                       description="Serve compiled documents: each is a model id in GET /v1/models, asked through "
                       "POST /v1/chat/completions (the last user message is the question) or /v1/completions (raw "
                       "text after the document). Concurrent requests share one decode batch, across documents. "
                       "POST /v1/reload picks up artifacts added to a folder since the start.")
    s.add_argument("artifacts", nargs="+", metavar="ART_OR_DIR", help="artifacts, or folders of *.nectar files")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every request")
    s.add_argument("--max-batch", type=_at_least_one, default=32, help="rows decoded together (default 32; 1: "
                   "one request at a time)")
    s.add_argument("--max-tokens", type=_at_least_one, default=512, help="largest answer a request may ask for, "
                   "and the default (default 512)")
    s.add_argument("--max-body", type=_at_least_one, default=1 << 20, help="largest request body in bytes (1 MiB)")
    _model_args(s, default=None, dtype="float32")
    s.set_defaults(run=cmd_serve)

    d = sub.add_parser("demo", help="compile a bundled document, ask three questions, compare with the full cache")
    d.add_argument("-o", "--output", default="demo.nectar", help="where the demo's artifact goes (demo.nectar)")
    d.add_argument("--budget", type=float, default=0.02, help="module bytes / KV-cache bytes (default 0.02)")
    d.add_argument("--effort", default="quick", metavar="LEVEL",
                   help="compile effort, as for compile (default quick: about a minute; default: the full fidelity)")
    d.add_argument("--model", default="smollm2-135m", help="model name or local folder (default smollm2-135m)")
    d.set_defaults(run=cmd_demo)
    return p


def _help(name: str, cls=CompileConfig) -> str:
    """A config field's meaning and default, as its metadata says (nectar.config)."""
    f = next(f for f in fields(cls) if f.name == name)
    return f"{f.metadata['meaning']} (default {f.default})"


class _Settings(argparse.Action):
    """--set FIELD=VALUE, repeatable; --set help lists every field and exits."""

    def __call__(self, parser, namespace, value, option_string=None):
        if value == "help":
            print("Config fields, set with --set FIELD=VALUE (repeatable):\n" + describe())
            parser.exit()
        setattr(namespace, self.dest, [*getattr(namespace, self.dest), value])  # never the shared default list


def _compile_args(p) -> None:
    p.add_argument("--effort", default="default", metavar="LEVEL", help=EFFORT_HELP)
    p.add_argument("--budget", type=float, default=CompileConfig.budget, help=_help("budget"))
    p.add_argument("--seed", type=int, default=CompileConfig.seed, help=_help("seed"))
    p.add_argument("--truncate", action="store_true", help=_help("truncate"))
    p.add_argument("--set", action=_Settings, default=[], metavar="FIELD=VALUE",
                   help="any other config field, e.g. --set variant=quadrature --set fit.steps=600 --set prompts=208; "
                   "--set help lists them")


def _model_args(p, default, dtype) -> None:
    p.add_argument("--model", default=default, help="model name or local folder (default: the artifact's)")
    p.add_argument("--dtype", default=dtype, choices=("auto", "float32", "bfloat16"),
                   help=f"model dtype (default {dtype}" + ("; auto: bfloat16 where the GPU or CPU runs it natively "
                   "(AVX512-BF16, AMX), float32 where it would be emulated)" if dtype == "auto" else ")"))
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (the GPU if there is one)")


class _Terminated(Exception):
    """SIGTERM (a scheduler, `kill`), turned into an exception so that it unwinds like Ctrl-C: every
    half-written file is removed on the way out."""


def _on_sigterm(signum, frame):
    raise _Terminated


def main(argv: list[str] | None = None) -> int:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        args = parser().parse_args(argv)
        code = args.run(args) or 0
        sys.stdout.flush()
    except NectarError as e:
        print(f"nectar: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nectar: interrupted; no half-written file was left", file=sys.stderr)
        return 130
    except _Terminated:
        print("nectar: terminated; no half-written file was left", file=sys.stderr)
        return 143
    except BrokenPipeError:
        # The reader (`| head`) left: what it did not read is not an error. Point stdout at nothing so
        # that the interpreter's own final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())

"""Issue 55's bad-input matrix, re-run against the real CLI: each case a subprocess, judged as a user would.

    python benchmarks/bad_inputs.py ARTIFACT.nectar [--out bad_inputs.json]

ARTIFACT is any compiled SmolLM2 artifact (the cases that name one only read its header). A case is good
when it exits 2 with one `nectar: error:` line that names what to do, bad on a traceback, another exit
code or more than one line; the seconds each takes are reported beside it (the bar: ≤ 1 s without a model).
Cases that need a whole compile to show their warning are covered by tests/test_bad_input.py instead.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def cases(art: str, tmp: Path) -> list[tuple[str, list[str], str]]:
    """(what a user tried, argv after `nectar`, a word the error must hold)."""
    (tmp / "pydoc:512").write_text("my own notes")
    (tmp / "broken").mkdir()
    (tmp / "broken" / "config.json").write_text("{not json")
    (tmp / "corrupt").mkdir()
    (tmp / "corrupt" / "a.nectar").write_bytes(b"\x00" * 64)
    (tmp / "empty.txt").write_text("")
    bad = str(tmp / "bad.nectar")
    Path(bad).write_bytes(Path(art).read_bytes()[:-100])
    return [
        ("a file named pydoc:512 in the folder", ["compile", "pydoc:512", "-o", "x.nectar"], "./pydoc:512"),
        ("a model folder with broken config.json", ["compile", "pydoc:512", "-o", "x.nectar", "--model", "broken"],
         "config"),
        ("ask with another known model", ["ask", art, "hi", "--model", "gemma3-270m"], "compiled for"),
        ("compile - from an empty stdin", ["compile", "-", "-o", "x.nectar"], "standard input"),
        ("pydoc past the window", ["compile", "pydoc:99999999", "-o", "x.nectar"], "--truncate"),
        ("an empty question on stdin", ["ask", art, "-"], "standard input"),
        ("ask a folder", ["ask", str(tmp), "hi"], "name an artifact file"),
        ("bench --batch 0", ["bench", art, "--batch", "0"], "--batch"),
        ("bench --new-tokens -3", ["bench", art, "--new-tokens", "-3"], "--new-tokens"),
        ("serve a folder of corrupt artifacts", ["serve", "corrupt"], "a.nectar"),
        ("a missing document", ["compile", "missing.txt", "-o", "x.nectar"], "no such file"),
        ("an empty document", ["compile", "empty.txt", "-o", "x.nectar"], "empty"),
        ("a missing artifact", ["ask", "missing.nectar", "hi"], "compile one"),
        ("a cut artifact", ["info", bad], "nectar"),
        ("a budget of 7", ["compile", "pydoc:600", "--budget", "7", "-o", "x.nectar"], "budget"),
        ("an unknown model", ["compile", "pydoc:600", "--model", "gpt-17", "-o", "x.nectar"], "model"),
        ("an unknown setting", ["compile", "pydoc:600", "--set", "fit.stepz=3", "-o", "x.nectar"], "stepz"),
        ("a bad setting value", ["compile", "pydoc:600", "--set", "fit.steps=many", "-o", "x.nectar"], "steps"),
        ("an output that is a folder", ["compile", "pydoc:600", "-o", "broken"], "is a folder"),
        ("an output under a file", ["compile", "pydoc:600", "-o", "empty.txt/x.nectar"], "is a file"),
        ("ask --max-new-tokens 0", ["ask", art, "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
        ("eval without questions file", ["eval", art, "--questions", "none.json"], "none.json"),
        ("serve a missing folder", ["serve", "nowhere"], "nowhere"),
    ]


def run(argv: list[str], cwd: Path) -> tuple[int, str, float]:
    start = time.perf_counter()
    done = subprocess.run([str(Path(sys.executable).parent / "nectar"), *argv], cwd=cwd, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return done.returncode, done.stderr.strip(), time.perf_counter() - start


def judge(code: int, err: str, word: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    if "Traceback" in err:
        return "bad: traceback"
    if code != 2 or len(lines) != 1 or not lines[0].startswith("nectar: error:"):
        return f"bad: exit {code}, {len(lines)} lines"
    return "good" if word.lower() in lines[0].lower() else f"so-so: does not name {word!r}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--out", default="bad_inputs.json")
    args = parser.parse_args()
    art = str(Path(args.artifact).resolve())
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        for what, argv, word in cases(art, tmp):
            code, err, seconds = run(argv, tmp)
            verdict = judge(code, err, word)
            rows.append({"case": what, "argv": argv, "exit": code, "stderr": err, "seconds": seconds,
                         "verdict": verdict})
            print(f"{seconds:5.2f} s  {verdict:<28} {what}: {err.splitlines()[-1][:100] if err else ''}")
    bad = sum(r["verdict"].startswith("bad") for r in rows)
    print(f"{len(rows)} cases: {len(rows) - bad} good or so-so, {bad} bad; slowest {max(r['seconds'] for r in rows):.2f} s")
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

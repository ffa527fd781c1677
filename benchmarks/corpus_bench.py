"""Corpus compile on the default model: Ray against a plain loop, on documents cut from pydoc.

    python benchmarks/corpus_bench.py OUT [--docs 8] [--tokens 1024] [compile flags...]

Writes OUT/docs/*.txt (consecutive ~TOKENS-token cuts of CPython's help topics), then runs
`nectar compile OUT/docs --out OUT/ray` and `... --out OUT/loop --no-ray` one after the other, and
prints wall time, time per document and each document's fidelity from both indexes.
"""
import json
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    out = Path(sys.argv[1])
    args = sys.argv[2:]
    docs, tokens = 8, 1024
    if "--docs" in args:
        i = args.index("--docs")
        docs = int(args[i + 1])
        del args[i:i + 2]
    if "--tokens" in args:
        i = args.index("--tokens")
        tokens = int(args[i + 1])
        del args[i:i + 2]
    sys.path.insert(0, str(Path(__file__).parent.parent))
    from nectar.model.documents import pydoc_document
    from nectar.model.models import load_model

    _, tokenizer = load_model("smollm2-135m")
    folder = out / "docs"
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(docs):
        (folder / f"pydoc{k}.txt").write_text(pydoc_document(tokenizer, tokens, offset=k * tokens))
    report = {}
    for mode, extra in (("ray", []), ("loop", ["--no-ray"])):
        start = time.perf_counter()
        code = subprocess.call([sys.executable, "-m", "nectar.cli.main", "compile", str(folder), "--out",
                                str(out / mode), *extra, *args])
        wall = time.perf_counter() - start
        index = json.loads((out / mode / "index.json").read_text())["documents"]
        report[mode] = {"exit": code, "wall_s": wall, "per_doc_s": wall / docs,
                        "task_s": {n: e["seconds"] for n, e in index.items()},
                        "fidelity": {n: e.get("fidelity") for n, e in index.items()}}
        print(json.dumps({mode: report[mode]}, indent=1), flush=True)
    report["speedup"] = report["loop"]["wall_s"] / report["ray"]["wall_s"]
    report["same_fidelity"] = report["ray"]["fidelity"] == report["loop"]["fidelity"]
    (out / "corpus_bench.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("speedup", "same_fidelity")}))


if __name__ == "__main__":
    main()

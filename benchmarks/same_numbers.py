"""Do two versions of nectar compute the same numbers? For refactors that must change no number.

    python benchmarks/same_numbers.py compile DIR      # the tiny test model under four configs -> DIR/*.nectar
    python benchmarks/same_numbers.py eval DIR         # a small `nectar eval` on it -> DIR/report.json
    python benchmarks/same_numbers.py compare A B      # tensor for tensor, manifest for manifest (timings aside)

Run `compile`/`eval` once with an older checkout first on PYTHONPATH (and TESTS=its tests/ folder, whose
conftest builds the tiny model), once with this one; then `compare`. `compare` also takes folders of real
artifacts, e.g. two `nectar compile pydoc:1024` outputs.
"""
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, os.environ.get("TESTS", str(Path(__file__).parent.parent / "tests")))


def _configs():
    from conftest import FAST

    return {"fast": FAST,
            "gap": replace(FAST, allocation="gap", exact_share=None, refine_steps=4, probe_steps=20, probe_prompts=2,
                           probe_recall=1, head_gap_layers=2),
            "probe": replace(FAST, allocation="probe", exact_share=0.3, probe_steps=20),
            "quad": replace(FAST, variant="quadrature", exact_share=0.3)}


def compile_all(out: Path) -> None:
    import nectar
    from conftest import sample_document, tiny_llama, tiny_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    for name, config in _configs().items():
        nectar.compile(tiny_llama(), tiny_tokenizer(), sample_document(1500), config).save(out / f"{name}.nectar")


def evaluate(out: Path) -> None:
    from conftest import sample_document, tiny_llama, tiny_tokenizer
    try:
        from nectar.compiler.workspace import Workspace as Bench
        from nectar.eval.runner import Comparison, EvalConfig
    except ImportError:  # before the packages (69c4b30 and earlier)
        from nectar.compare import Comparison, EvalConfig
        from nectar.compiler import Workbench as Bench

    methods = ("nectar", "nectar_quadrature", "nectar+exact_share=0.3", "no_document", "streaming_llm",
               "attention_matching", "knorm")
    config = replace(_configs()["gap"], budget=0.05)
    questions = ["What does assert do?", "When does the else clause of a while loop run?"]
    report = Comparison(Bench(tiny_llama(), tiny_tokenizer(), sample_document(1500), config), None, questions, out,
                        EvalConfig(budgets=(0.1,), methods=methods, gap_prompts=2, max_new_tokens=8),
                        tiny_llama(seed=1)).run()
    for row in report["rows"]:
        for key in ("seconds", "fit_seconds", "workbench_timings", "shared_timings"):
            row.pop(key, None)
    (out / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True))


def _manifest(path: Path) -> dict:
    from safetensors import safe_open

    manifest = json.loads(safe_open(path, "pt").metadata()["nectar"])
    for key in ("timings", "sha256", "created", "nectar_version"):
        manifest.pop(key, None)
    return manifest


def compare(a: Path, b: Path) -> int:
    from safetensors.torch import load_file

    different = 0
    for file in sorted(a.glob("*.nectar")):
        ta, tb = load_file(file), load_file(b / file.name)
        tensors = sorted(set(ta) ^ set(tb)) + [k for k in ta if k in tb and not (
            ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape and bool((ta[k] == tb[k]).all()))]
        ma, mb = _manifest(file), _manifest(b / file.name)
        fields = sorted(k for k in set(ma) | set(mb) if ma.get(k) != mb.get(k))
        print(f"{file.name}: {len(ta)} tensors, {len(tensors)} differ {tensors[:5]}; manifest fields differ: {fields}")
        different += bool(tensors or fields)
    if (a / "report.json").is_file():
        same = (a / "report.json").read_bytes() == (b / "report.json").read_bytes()
        print(f"report.json: {'identical' if same else 'DIFFERENT'}")
        different += not same
    print("IDENTICAL" if not different else f"{different} DIFFERENT")
    return int(bool(different))


if __name__ == "__main__":
    command, *paths = sys.argv[1:]
    if command == "compare":
        sys.exit(compare(Path(paths[0]), Path(paths[1])))
    {"compile": compile_all, "eval": evaluate}[command](Path(paths[0]))

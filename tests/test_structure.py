"""The package reads top-down: every file has one job said in its docstring, stays short, and imports
only from files earlier in the pipeline (lazy imports inside functions included)."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "nectar"
PIPELINE = [
    # foundations
    "errors", "config", "files", "timing", "padding", "templates", "documents", "graphs", "kernels", "attention", "gguf_tokenizer", "models",
    "semantic",
    "metrics",
    # document side, then decode side
    "prefill", "binding", "decode",
    # compile: prompts -> capture -> modules -> fit -> evaluate -> artifact
    "prompts", "capture", "selection", "quant", "tokenstore", "budget", "modules", "fused", "quadrature", "schedule", "fit", "refine", "evaluate", "probe", "artifact", "compiler",
    # a whole corpus, one task per document
    "corpus",
    # what uses a compiled document
    "baselines", "generate", "summary", "plots", "compare_report", "compare", "bench", "bench_report",
    # serving: many documents, one decode batch
    "rowbanks", "engine", "api", "server",
    "commands", "cli",
]
FILES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def test_every_file_has_a_place_in_the_pipeline():
    assert sorted(PIPELINE) == FILES


def _imports(name: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{name}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nectar."):
            found.add(node.module.split(".")[1])
    return found


@pytest.mark.parametrize("name", FILES)
def test_imports_only_from_earlier_stages(name):
    later = {m for m in _imports(name) if PIPELINE.index(m) >= PIPELINE.index(name)}
    assert not later, f"{name}.py imports from later stages: {sorted(later)}"


@pytest.mark.parametrize("name", FILES)
def test_short_and_says_its_job(name):
    source = (PACKAGE / f"{name}.py").read_text()
    assert len(source.splitlines()) <= 350
    doc = ast.get_docstring(ast.parse(source))
    assert doc and "DESIGN" not in source and "issue " not in source.lower()

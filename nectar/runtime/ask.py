"""The end of the path: answer questions about a compiled document, or, for reference, with its full cache."""
from __future__ import annotations

import torch

from .decode import generate_text
from ..errors import NectarError
from .prefill import prefill
from ..model.templates import question_ids


def _check(max_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise NectarError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


def ask(model, tokenizer, artifact, questions: list[str], max_new_tokens: int = 128, batch_size: int = 16) -> list[str]:
    """Greedy answers to `questions` about the compiled document, without its KV cache."""
    _check(max_new_tokens)
    artifact.check_compatible(model, tokenizer)
    prompts = [question_ids(tokenizer, artifact.question_template, q) for q in questions]
    return generate_text(model, tokenizer, prompts, artifact.n, artifact.providers(model), max_new_tokens, batch_size)


def ask_full(model, tokenizer, artifact, questions: list[str], max_new_tokens: int = 128,
             batch_size: int = 16) -> list[str]:
    """The reference: greedy answers with the document's full KV cache, from the ids the artifact stores."""
    _check(max_new_tokens)
    if artifact.document_ids is None:
        raise NectarError("this artifact was compiled without its document ids (keep_document=False), which the "
                          "full-cache answers need: recompile it with them")
    artifact.check_compatible(model, tokenizer)
    prompts = [question_ids(tokenizer, artifact.question_template, q) for q in questions]
    full = prefill(model, torch.tensor(artifact.document_ids))
    return generate_text(model, tokenizer, prompts, artifact.n, (full, None), max_new_tokens, batch_size)

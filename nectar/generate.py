"""Batched greedy (or sampled) generation after an n-token document served by any context provider."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .attach import bound, generation_inputs, prefill
from .attention import ContextProvider, ExactContext


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids, mask


def right_pad(seqs: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, valid) with each sequence at the left; for teacher-forced passes, where pads come last."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    valid = torch.zeros((len(seqs), width), dtype=torch.bool)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        valid[row, : len(seq)] = True
    return ids, valid


def stop_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>"):
        tid = tokenizer.convert_tokens_to_ids(token) if token in tokenizer.get_vocab() else None
        ids.add(tid)
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate_ids(
    model,
    tokenizer,
    prompts: list[list[int]],
    n: int,
    context: ContextProvider,
    kept: ExactContext | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    sample: bool = False,
    desc: str | None = None,
) -> list[list[int]]:
    """New token ids for each prompt, stopped at the first end-of-turn token (not included)."""
    stops = stop_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    answers: list[list[int]] = []
    batches = range(0, len(prompts), batch_size)
    with bound(model, context):
        for start in tqdm(batches, desc=desc, disable=desc is None, leave=False):
            ids, mask = left_pad(prompts[start: start + batch_size], pad)
            inputs = generation_inputs(model, ids, mask, n, kept)
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=sample,
                temperature=0.8 if sample else None,
                top_p=0.95 if sample else None,
                top_k=None,
                eos_token_id=stops,
                pad_token_id=pad,
            )
            answers.extend(_until_stop(row.tolist(), stops) for row in out[:, inputs["input_ids"].shape[1]:])
    return answers


def _until_stop(ids: list[int], stops: list[int]) -> list[int]:
    for i, tid in enumerate(ids):
        if tid in stops:
            return ids[:i]
    return ids


def question_ids(tokenizer, template: str, question: str) -> list[int]:
    # str.replace, not str.format: questions may contain braces.
    return tokenizer(template.replace("{question}", question), add_special_tokens=False)["input_ids"]


def ask(model, tokenizer, artifact, questions: list[str], max_new_tokens: int = 128, batch_size: int = 16) -> list[str]:
    """Greedy answers to `questions` about the compiled document, without its KV cache."""
    artifact.check_compatible(model, tokenizer)
    prompts = [question_ids(tokenizer, artifact.question_template, q) for q in questions]
    ids = generate_ids(model, tokenizer, prompts, artifact.n, *artifact.providers(model),
                       max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [tokenizer.decode(a, skip_special_tokens=True).strip() for a in ids]


def ask_full(model, tokenizer, document_ids: list[int], template: str, questions: list[str],
             max_new_tokens: int = 128, batch_size: int = 16) -> list[str]:
    """The reference: greedy answers with the document's full KV cache."""
    prompts = [question_ids(tokenizer, template, q) for q in questions]
    ids = generate_ids(model, tokenizer, prompts, len(document_ids), prefill(model, torch.tensor(document_ids)),
                       max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [tokenizer.decode(a, skip_special_tokens=True).strip() for a in ids]

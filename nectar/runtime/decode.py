"""Batched greedy (or sampled) generation after an n-token document served by any context provider."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from ..providers.attention import ContextProvider, ExactContext
from .binding import bound, cacheable, generation_inputs
from ..errors import NectarError
from ..model.padding import left_pad


def stop_ids(tokenizer) -> list[int]:
    """End-of-sequence and end-of-turn ids of the families nectar knows."""
    ids = {tokenizer.eos_token_id}
    vocab = tokenizer.get_vocab()
    for token in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>"):
        if token in vocab:
            ids.add(tokenizer.convert_tokens_to_ids(token))
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate_ids(
    model,
    tokenizer,
    prompts: list[list[int]],
    n: int,
    context: ContextProvider,
    sinks: ExactContext | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    sample: bool = False,
    desc: str | None = None,
) -> list[list[int]]:
    """New token ids for each prompt, stopped at the first end-of-turn token (not included)."""
    check_room(model, n, prompts, max_new_tokens)
    stops = stop_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    answers: list[list[int]] = []
    batches = range(0, len(prompts), batch_size)
    cached = sinks if cacheable(model, sinks) else None  # else bound, and read beside the local keys each step
    with bound(model, context, sinks=None if cached is not None else sinks):
        for start in tqdm(batches, desc=desc, disable=desc is None, leave=False):
            batch = prompts[start: start + batch_size]
            if cached is None and len({tuple(p) for p in batch}) < len(batch):
                inputs = shared_prompt_inputs(model, batch, pad, n)
            else:
                inputs = generation_inputs(model, *left_pad(batch, pad), n, cached)
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


def shared_prompt_inputs(model, batch: list[list[int]], pad: int, n: int) -> dict:
    """`generate` keywords for a batch whose rows repeat prompts (sampled questions about one chunk): each
    distinct prompt is read once, and its cache is copied to the rows that ask it. Call it bound."""
    distinct = {tuple(p): i for i, p in enumerate(dict.fromkeys(tuple(p) for p in batch))}
    ids, mask = left_pad([list(p) for p in distinct], pad)
    inputs = generation_inputs(model, ids, mask, n)
    cache = DynamicCache(config=model.config)
    # All but the last token: `generate` needs one uncached token to start from.
    model(**{k: v[:, :-1] for k, v in inputs.items()}, past_key_values=cache, use_cache=True)
    rows = torch.tensor([distinct[tuple(p)] for p in batch], device=model.device)
    cache.reorder_cache(rows)
    return {**{k: v[rows] for k, v in inputs.items()}, "past_key_values": cache}


def check_room(model, n: int, prompts: list[list[int]], max_new_tokens: int) -> None:
    """Refuse a prompt that, after the n-token document and with its answer, passes the model's window."""
    window = model.config.max_position_embeddings
    for i, prompt in enumerate(prompts):
        if n + len(prompt) + max_new_tokens > window:
            raise NectarError(f"question {i + 1} is {len(prompt)} tokens: after the document's {n} and with "
                              f"{max_new_tokens} answer tokens it passes the model's window of {window}: shorten "
                              "it, or lower --max-new-tokens")


def _until_stop(ids: list[int], stops: list[int]) -> list[int]:
    for i, tid in enumerate(ids):
        if tid in stops:
            return ids[:i]
    return ids


def generate_text(model, tokenizer, prompts: list[list[int]], n: int, method, max_new_tokens: int,
                  batch_size: int = 16, desc: str | None = None) -> list[str]:
    """Greedy answers as text, for a method = (context, sinks)."""
    ids = generate_ids(model, tokenizer, prompts, n, *method, max_new_tokens=max_new_tokens, batch_size=batch_size,
                       desc=desc)
    return [tokenizer.decode(a, skip_special_tokens=True).strip() for a in ids]

"""Documents that ship with every Python: CPython's help topics (pydoc_data.topics, ~113k tokens)."""
from __future__ import annotations


def pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(f"{name}\n{'=' * len(name)}\n{text.strip()}" for name, text in sorted(topics.items()))


def pydoc_document(tokenizer, tokens: int = 4096, offset: int = 0) -> str:
    """About `tokens` tokens of the help topics, starting `offset` tokens in, cut at a line break."""
    ids = tokenizer(pydoc_text(), add_special_tokens=False)["input_ids"][offset: offset + tokens]
    text = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    return text[: text.rfind("\n")] if "\n" in text else text

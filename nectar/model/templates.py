"""The token layout around a document and its questions, taken from the model's chat template.

The document opens the user turn and each question follows it in the same turn, so the document is a
fixed prefix and everything after it is what the user types and the model answers. A base model with
no chat template gets a plain layout: `{document}` then `\\n\\nQuestion: {question}\\nAnswer:`.
"""
from __future__ import annotations

DOC_SLOT, QUESTION_SLOT = "\x00DOCUMENT\x00", "\x00QUESTION\x00"


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def chat(tokenizer, content: str, plain_reply: str = "\nAnswer:") -> str:
    """`content` as one user turn with the assistant's reply to follow; for a base model, plain text
    followed by `plain_reply`."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    return _bos(tokenizer) + content + plain_reply


def _bos(tokenizer) -> str:
    """The BOS text where the tokenizer starts every text with it: base models (Gemma's) expect it first."""
    bos = tokenizer.bos_token_id
    return tokenizer.bos_token if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else ""


def default_templates(tokenizer) -> tuple[str, str]:
    """(document_template, question_template) cut from `chat` around the two slots."""
    before, rest = chat(tokenizer, f"{DOC_SLOT}\n\nQuestion: {QUESTION_SLOT}").split(DOC_SLOT)
    middle, after = rest.split(QUESTION_SLOT)
    return before + "{document}", middle + "{question}" + after


def templates_for(tokenizer, config) -> dict[str, str]:
    """The config's templates where it sets them, the model's own elsewhere."""
    document, question = default_templates(tokenizer)
    return {"document": config.document_template or document, "question": config.question_template or question}


def question_ids(tokenizer, template: str, question: str) -> list[int]:
    # str.replace, not str.format: questions may contain braces.
    return encode(tokenizer, template.replace("{question}", question))

"""Text -> document token ids: a user's file or CPython's bundled help, cut to what the model can hold.

`pydoc` or `pydoc:TOKENS` names CPython's help topics (pydoc_data.topics, ~113k tokens, on every
machine with Python); any other argument is a path. The two never mix: a file named `pydoc_notes.txt`
is a file, and a file whose text begins with "pydoc" is that text.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import NectarError
from .templates import encode

QUESTION_ROOM = 512  # positions left after the document for a question and its answer (or a quarter)


@dataclass(frozen=True)
class Pydoc:
    """The first `tokens` tokens of CPython's help topics."""

    tokens: int = 4096


@dataclass(frozen=True)
class Stdin:
    """`-`: the document is read from standard input."""


Source = Pydoc | Stdin | Path


def parse_source(arg: str) -> Source:
    """A `Pydoc` for `pydoc` / `pydoc:TOKENS`, `Stdin` for `-`, else the path of a file that must exist
    (checked here)."""
    if arg == "-":
        return Stdin()
    match = re.fullmatch(r"pydoc(?::(.*))?", arg)
    if match and Path(arg).exists():
        raise NectarError(f"'{arg}' names CPython's help topics, and a file here has that name too: write ./{arg} "
                          "for the file, or run from another folder for the help topics")
    if match:
        count = match.group(1)
        if count is None:
            return Pydoc()
        if not count.isdigit() or int(count) < 1:
            raise NectarError(f"'{_short(arg)}': write pydoc or pydoc:TOKENS with TOKENS a positive whole "
                              "number, e.g. pydoc:4096")
        return Pydoc(int(count))
    path = Path(arg)
    if not path.is_file():
        raise NectarError(f"no such file: {_short(arg)}" + (" (a folder: give a text file)" if path.is_dir() else ""))
    return path


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def read_text(path: Path) -> str:
    """A UTF-8 text file's content; binary, non-UTF-8 and empty files are refused with what to do."""
    return _decoded(path.read_bytes(), str(path))


def read_stdin() -> str:
    if sys.stdin is None or sys.stdin.isatty():
        raise NectarError("'-' reads the document from standard input: pipe one in, e.g. `nectar compile - -o "
                          "doc.nectar < doc.txt`")
    return _decoded(sys.stdin.buffer.read(), "standard input")


def _decoded(data: bytes, where: str) -> str:
    if b"\x00" in data[:8192]:
        raise NectarError(f"{where} looks like a binary file: give UTF-8 text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise NectarError(f"{where} is not UTF-8 text: convert it (e.g. `iconv -t utf-8`) and retry") from None
    if not text.strip():
        raise NectarError(f"{where} is empty: give a document with some text")
    return text


def load_text(source: Source, tokenizer, text: str | None = None) -> str:
    """The document's text; `text` is a file's, already read by `early_text`."""
    if text is not None:
        return text
    return pydoc_document(tokenizer, source.tokens) if isinstance(source, Pydoc) else read_text(source)


def early_text(source: Source | None) -> str | None:
    """A file's (or standard input's) text, read (so a bad one is refused) before any model loads; None for
    pydoc, whose text needs the tokenizer."""
    if isinstance(source, Stdin):
        return read_stdin()
    return read_text(source) if isinstance(source, Path) else None


def check_length(source: Source, positions: int | None, truncate: bool) -> None:
    """Refuse `pydoc:TOKENS` past the model's window before the model loads (a file's length needs the
    tokenizer: `document_ids` checks it)."""
    if isinstance(source, Pydoc) and positions and not truncate and source.tokens > _limit(positions):
        raise NectarError(f"pydoc:{source.tokens} is longer than the {_limit(positions)} tokens this model holds "
                          f"before a question: ask for pydoc:{_limit(positions)} or fewer, or pass --truncate")


def _limit(positions: int) -> int:
    return positions - min(QUESTION_ROOM, positions // 4)


def pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(f"{name}\n{'=' * len(name)}\n{text.strip()}" for name, text in sorted(topics.items()))


def pydoc_document(tokenizer, tokens: int = 4096, offset: int = 0) -> str:
    """About `tokens` tokens of the help topics, starting `offset` tokens in, cut at a line break."""
    ids = encode(tokenizer, pydoc_text())[offset: offset + tokens]
    text = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    return text[: text.rfind("\n")] if "\n" in text else text


def document_ids(context, tokenizer, model, truncate: bool, template: str) -> list[int]:
    """Token ids of the document: a 1-D tensor verbatim, or text wrapped by the document template."""
    import torch  # here, so that the CLI checks its arguments before paying for torch's import

    limit = _limit(model.config.max_position_embeddings)
    if isinstance(context, torch.Tensor):
        if context.dim() != 1 or context.numel() == 0 or context.is_floating_point():
            raise NectarError("a token-id context must be a non-empty 1-D integer tensor")
        ids = context.tolist()
        return _fit_length(ids, limit, truncate, len(ids))
    if not isinstance(context, str) or not context.strip():
        raise NectarError("the document is empty: give a text with some content")
    before, after = template.split("{document}")
    pre, body, post = encode(tokenizer, before), encode(tokenizer, context), encode(tokenizer, after)
    room = limit - len(pre) - len(post)
    return pre + _fit_length(body, room, truncate, len(pre) + len(body) + len(post)) + post


def _fit_length(ids: list[int], limit: int, truncate: bool, total: int) -> list[int]:
    if len(ids) <= limit:
        return ids
    if not truncate:
        raise NectarError(f"the document has {total} tokens, more than the {limit} this model can hold before "
                          f"a question: pass --truncate to keep the first {limit}")
    print(f"[nectar] truncated the document: kept the first {limit} of its {len(ids)} tokens", file=sys.stderr)
    return ids[:limit]

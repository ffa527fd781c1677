"""A user's questions, read from the command line, standard input or a file, and checked: no torch here, so
that a bad questions file is refused before the model loads."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .errors import NectarError


def read_questions(source: str | os.PathLike | list[str]) -> list[str]:
    """A user's questions: a list (["-"] reads one a line from standard input), or a file holding a JSON
    list (of strings, or of objects with a "question"), {"questions": [...]}, or plain text, one a line.

    Blank lines of plain text are skipped; an empty or repeated question is refused.
    """
    if isinstance(source, list):
        if source == ["-"]:
            return _checked([line.strip() for line in sys.stdin if line.strip()], "standard input")
        return _checked([q for q in source if q.strip()], "the command line")
    path = Path(source)
    if not path.is_file():
        raise NectarError(f"no such question file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise NectarError(f"{path} is not UTF-8 text: convert it and retry") from None
    if not text.lstrip().startswith(("[", "{")):
        return _checked([line.strip() for line in text.splitlines() if line.strip()], str(path))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise NectarError(f"{path} is not valid JSON ({e}): write a list of questions, e.g. [\"What is ...?\"]") \
            from None
    if isinstance(data, dict):
        data = data.get("questions", [])
    items = [q.get("question") if isinstance(q, dict) else q for q in data] if isinstance(data, list) else []
    if not all(isinstance(q, str) for q in items):
        raise NectarError(f"{path}: every question must be a string (or an object with a \"question\")")
    return _checked([q.strip() for q in items], str(path))


def _checked(questions: list[str], where: str) -> list[str]:
    if not questions:
        raise NectarError(f"no questions in {where}: give at least one, e.g. [\"What is ...?\"] or one a line")
    empty = [i + 1 for i, q in enumerate(questions) if not q.strip()]
    if empty:
        raise NectarError(f"question {empty[0]} in {where} is empty: remove it or write the question")
    seen = set()
    for q in questions:
        if q in seen:
            raise NectarError(f"the question \"{q[:60]}\" appears twice in {where}: keep one")
        seen.add(q)
    return questions

"""Which documents a corpus compile names: folders (their text files, recursively), globs and files.

Free of torch, so that the CLI refuses a bad path before paying for torch's import.
"""
from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

from ..errors import NectarError

SUFFIXES = (".txt", ".md", ".rst", ".text")


@dataclass(frozen=True)
class Source:
    path: Path
    name: str  # the artifact's file name without .nectar

    @property
    def artifact(self) -> str:
        return self.name + ".nectar"


def is_corpus(specs: list[str]) -> bool:
    """Several documents, a folder or a glob: what the corpus path (not a single compile) handles."""
    return len(specs) > 1 or any(Path(s).is_dir() or glob.has_magic(s) for s in specs)


def discover(specs: list[str]) -> list[Source]:
    """The documents that folders (their *.txt, *.md, *.rst files, recursively), globs and files name."""
    found: dict[Path, str] = {}
    for spec in specs:
        path = Path(spec)
        if spec == "-":
            raise NectarError("'-' (standard input) compiles one document on its own: name files or folders for a "
                              "corpus")
        if glob.has_magic(spec):
            files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
            if not files:
                raise NectarError(f"'{spec}' matches no file: check the pattern (quote it so the shell leaves it)")
            found.update((f, f.stem) for f in files)
        elif path.is_dir():
            files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)
            if not files:
                raise NectarError(f"{path} holds no document ({', '.join(SUFFIXES)}): add some, or name files")
            found.update((f, "--".join(f.relative_to(path).with_suffix("").parts)) for f in files)
        elif path.is_file():
            found[path] = path.stem
        else:
            raise NectarError(f"no such file or folder: {spec}")
    names: dict[str, Path] = {}
    for file, name in found.items():
        if name in names:
            raise NectarError(f"{names[name]} and {file} would both compile to {name}.nectar: rename one")
        names[name] = file
    return [Source(file, name) for name, file in sorted(names.items())]

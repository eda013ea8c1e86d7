"""Text sources: where pretraining documents come from, and how a mixture names them.

A source is a file, a directory, a glob, a JSONL file with a named text field, a `datasets` name
(online), or `python-stdlib`: the `.py` files of the running interpreter's standard library
(without its generated tables), real code and prose that every machine has. Documents come out
in a fixed order, so that a cache key of the source and the tokenizer identifies the token stream.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PYTHON_STDLIB = "python-stdlib"
# Installed packages are not the standard library; encodings/ and pydoc_data/ are generated tables
# and a dump of the docs, which a small model learns to repeat instead of learning Python.
STDLIB_EXCLUDED = {"site-packages", "dist-packages", "encodings", "pydoc_data"}
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".c", ".h", ".cpp", ".js", ".ts", ".java", ".go", ".rs", ".sh", ".toml", ".yaml", ".yml", ".json", ".html", ".tex")


@dataclass
class Source:
    """One source of a mixture.

    Args:
        path: `python-stdlib`, a file, a directory (its text files, recursively), a glob, a `.jsonl`
            file, or `hf:<dataset name>[:<split>]` (needs a network or the local datasets cache).
        weight: share of the mixture's training tokens (weights are normalised over sources).
        text_field: the field that holds the text in JSONL records and datasets.
        name: label for logs; defaults to the path's last component.
    """

    path: str
    weight: float = 1.0
    text_field: str = "text"
    name: str | None = None

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise ValueError(f"source {self.path!r}: weight must be > 0, got {self.weight}")
        if self.name is None:
            self.name = self.path if self.is_builtin or self.is_hub else Path(self.path.rstrip("/")).name or self.path

    @property
    def is_builtin(self) -> bool:
        return self.path == PYTHON_STDLIB

    @property
    def is_hub(self) -> bool:
        return self.path.startswith("hf:")

    def files(self) -> list[Path]:
        """The files this source reads, sorted; raises if there are none."""
        if self.is_hub:
            return []
        if self.is_builtin:
            root = Path(sysconfig.get_paths()["stdlib"])
            found = [p for p in root.rglob("*.py") if not STDLIB_EXCLUDED & set(p.relative_to(root).parts)]
        elif any(ch in self.path for ch in "*?["):
            found = [Path(p) for p in glob.glob(self.path, recursive=True) if Path(p).is_file()]
        else:
            path = Path(self.path)
            if not path.exists():
                raise FileNotFoundError(
                    f"data source {self.path!r} does not exist. Give a file, a directory, a glob, a .jsonl "
                    f"file, 'hf:<dataset>' or {PYTHON_STDLIB!r}."
                )
            found = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES + (".jsonl",)]
        if not found:
            raise ValueError(f"data source {self.path!r} matches no text files (looked for {', '.join(TEXT_SUFFIXES)}, .jsonl)")
        return sorted(found)

    def fingerprint(self) -> str:
        """A hash of what the source reads: paths, sizes and modification times (or the dataset name)."""
        h = hashlib.sha256(f"{self.path}|{self.text_field}".encode())
        for f in self.files():
            st = f.stat()
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

    def documents(self) -> Iterator[str]:
        """Yield the source's documents in a fixed order."""
        if self.is_hub:
            yield from self._hub_documents()
            return
        for f in self.files():
            if f.suffix == ".jsonl":
                yield from _jsonl_texts(f, self.text_field)
            else:
                text = f.read_text(encoding="utf-8", errors="replace")
                if text.strip():
                    yield text

    def _hub_documents(self) -> Iterator[str]:
        import datasets

        name, _, split = self.path[3:].partition(":")
        ds = datasets.load_dataset(name, split=split or "train")
        if self.text_field not in ds.column_names:
            raise ValueError(f"dataset {name!r} has no field {self.text_field!r}; fields: {ds.column_names}")
        for row in ds:
            if row[self.text_field]:
                yield row[self.text_field]


def _jsonl_texts(path: Path, field: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict) or field not in record:
                raise ValueError(f"{path}:{lineno}: record has no text field {field!r}")
            if record[field]:
                yield str(record[field])


def as_sources(spec: str | Source | dict | list, kind: type[Source] = Source) -> list[Source]:
    """Normalise a source spec (a path string, a `Source`, a dict, or a list of them) to a list of `kind`."""
    items = spec if isinstance(spec, list | tuple) else [spec]
    sources = [s if isinstance(s, kind) else kind(**s) if isinstance(s, dict) else kind(os.fspath(s)) for s in items]
    if not sources:
        raise ValueError("no data sources given")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"data source names must be unique, got {names}; set `name` on each")
    return sources

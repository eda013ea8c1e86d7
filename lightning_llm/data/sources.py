"""Text sources: where pretraining documents come from, and how a mixture names them.

A source is a file, a directory, a glob, a JSONL file with a named text field, a dataset that
`datasets.load_dataset` reads (`hf:` + a hub id or a local dataset folder; with a config, a split,
streaming), or `python-stdlib`: the `.py` files of the running interpreter's standard library
(without its generated tables), real code and prose that every machine has. Documents come out
in a fixed order, so that a cache key of the source and the tokenizer identifies the token stream.
"""

from __future__ import annotations

import codecs
import fnmatch
import glob
import hashlib
import json
import math
import os
import sysconfig
import threading
import tokenize
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

PYTHON_STDLIB = "python-stdlib"
# Installed packages are not the standard library; encodings/ and pydoc_data/ are generated tables
# and a dump of the docs, which a small model learns to repeat instead of learning Python.
# tokenizedata/ (and, in older releases, the same files directly in test/) holds the test suite's
# deliberately malformed source: invalid UTF-8, unknown encoding declarations.
STDLIB_EXCLUDED = {"site-packages", "dist-packages", "encodings", "pydoc_data", "tokenizedata"}
STDLIB_EXCLUDED_FILES = ("bad_coding*.py", "badsyntax_pep3120.py")
DEFAULT_ENCODING = "utf-8"
DECODE_ERRORS = ("strict", "replace")
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".c", ".h", ".cpp", ".js", ".ts", ".java", ".go", ".rs", ".sh", ".toml", ".yaml", ".yml", ".json", ".html", ".tex")


@dataclass
class Source:
    """One source of a mixture.

    Args:
        path: `python-stdlib`, a file, a directory (its text files, recursively), a glob, a `.jsonl`
            file, or `hf:<dataset>[:<split>]`: what `datasets.load_dataset` reads, a hub id (online, or
            in the local datasets cache) or a local dataset folder (its json/csv/parquet files, or a
            README declaring configs).
        weight: share of the mixture's training tokens (weights are normalised over sources).
        text_field: the field that holds the text in JSONL records and datasets.
        config: an `hf:` dataset's configuration (subset) name, e.g. "en" for `hf:allenai/c4`.
        split: an `hf:` dataset's split, with `datasets`' slicing ("train", "train[:10%]");
            default "train". Give it here or in the path, not both.
        streaming: read an `hf:` dataset's rows as they download instead of downloading and
            converting the whole dataset first (the same rows, in the same order).
        name: label for logs; defaults to the path's last component.
        encoding: the files' text encoding (a Python codec name: "utf-8", "latin-1", "utf-16", ...).
            With the default, a `.py` file's own PEP 263 declaration (`# -*- coding: ... -*-`) counts,
            as it does for Python.
        errors: "strict" (default): a byte sequence that is not valid in `encoding` is an error naming
            the file and its byte offset; "replace": it becomes U+FFFD, and the number of replaced
            characters is reported in the data module's setup table.
    """

    path: str
    weight: float = 1.0
    text_field: str = "text"
    name: str | None = None
    encoding: str = DEFAULT_ENCODING
    errors: Literal["strict", "replace"] = "strict"
    config: str | None = None
    split: str | None = None
    streaming: bool = False
    # Characters replaced by the last full pass of `documents()` (errors="replace").
    replaced: int = field(default=0, init=False, compare=False, repr=False)
    # The files a directory source reads, by suffix (a class constant, not a field).
    read_suffixes: ClassVar[tuple[str, ...]] = (*TEXT_SUFFIXES, ".jsonl")

    def __post_init__(self) -> None:
        # (a quoted YAML number is a string, and an infinite weight makes every share NaN)
        if isinstance(self.weight, bool) or not isinstance(self.weight, int | float) or not 0 < self.weight < math.inf:
            raise ValueError(f"source {self.path!r}: weight must be a finite number > 0, got {self.weight!r}")
        if self.errors not in DECODE_ERRORS:
            raise ValueError(f"source {self.path!r}: errors={self.errors!r}; use one of {', '.join(map(repr, DECODE_ERRORS))}")
        try:
            codecs.lookup(self.encoding)
        except LookupError as err:
            raise ValueError(f"source {self.path!r}: unknown encoding {self.encoding!r}; give a Python codec name "
                             "such as 'utf-8', 'latin-1' or 'utf-16'") from err
        self._check_hub_options()
        if self.name is None:
            self.name = self.path if self.is_builtin or self.is_hub else Path(self.path.rstrip("/")).name or self.path

    def _check_hub_options(self) -> None:
        given = {key: value for key, value in self.hub_options().items() if value not in (None, False)}
        if not self.is_hub:
            if given:
                raise ValueError(f"source {self.path!r}: {', '.join(f'{k}={v!r}' for k, v in given.items())} applies to "
                                 "hf: sources only (path: 'hf:<hub id or dataset folder>')")
            return
        name, _, split = self.path[3:].partition(":")
        if not name:
            raise ValueError(f"source {self.path!r}: no dataset after 'hf:'; write 'hf:<hub id or dataset folder>'")
        if split and self.split is not None:
            raise ValueError(f"source {self.path!r}: the split is given twice ({split!r} in the path, split={self.split!r}); "
                             "give it once")
        for key in ("config", "split"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"source {self.path!r}: {key} must be a non-empty string, got {value!r}")
        if not isinstance(self.streaming, bool):
            raise ValueError(f"source {self.path!r}: streaming must be true or false, got {self.streaming!r}")

    def hub_options(self) -> dict[str, Any]:
        """The options that only `hf:` sources take."""
        return {"config": self.config, "split": self.split, "streaming": self.streaming}

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
            found = [p for p in root.rglob("*.py")
                     if not STDLIB_EXCLUDED & set(p.relative_to(root).parts) and not any(fnmatch.fnmatch(p.name, pattern) for pattern in STDLIB_EXCLUDED_FILES)]
        elif any(ch in self.path for ch in "*?["):
            found = [Path(p) for p in glob.glob(self.path, recursive=True) if Path(p).is_file()]
        else:
            path = Path(self.path)
            if not path.exists():
                raise FileNotFoundError(
                    f"data source {self.path!r} does not exist. Give a file, a directory, a glob, a .jsonl "
                    f"file, 'hf:<dataset>' or {PYTHON_STDLIB!r}."
                )
            found = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and p.suffix in self.read_suffixes]
        if not found:
            raise ValueError(f"data source {self.path!r} matches no text files (looked for {', '.join(self.read_suffixes)})")
        return sorted(found)

    def unread_files(self) -> Counter[str]:
        """Files in a directory source that it does not read (their names end in none of `read_suffixes`),
        counted by suffix ("" for none); hidden files and folders (`.git/`) are not counted."""
        path = Path(self.path)
        if self.is_builtin or self.is_hub or not path.is_dir():
            return Counter()
        return Counter(p.suffix for p in path.rglob("*") if p.is_file() and p.suffix not in self.read_suffixes
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))

    def fingerprint(self) -> str:
        """A hash of what the source reads: paths, sizes and modification times (or the dataset name; and
        the files of a local dataset folder)."""
        decoding = "" if (self.encoding, self.errors) == (DEFAULT_ENCODING, "strict") else f"|{self.encoding}|{self.errors}"
        # (streaming gives the same rows; config and split enter the key only when given, so that the
        # token files of sources written before they existed stay valid)
        subset = "".join(f"|{key}={value}" for key, value in (("config", self.config), ("split", self.split)) if value is not None)
        h = hashlib.sha256(f"{self.path}|{self.text_field}{decoding}{subset}".encode())
        for f in self.files() + self._local_dataset_files():
            st = f.stat()
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

    def documents(self) -> Iterator[str]:
        """Yield the source's documents in a fixed order (and count replaced characters in `replaced`)."""
        if self.is_hub:
            yield from self._hub_documents()
            return
        self.replaced = 0
        for f in self.files():
            text, replaced = decode_file(f, self.encoding, self.errors)
            self.replaced += replaced
            if f.suffix == ".jsonl":
                yield from _jsonl_texts(f, text, self.text_field)
            elif text.strip():
                yield text

    def _local_dataset_files(self) -> list[Path]:
        """The files of an `hf:` source that is a local dataset folder (a hub id has none here)."""
        folder = Path(self.path[3:].partition(":")[0]) if self.is_hub else None
        return sorted(p for p in folder.rglob("*") if p.is_file()) if folder is not None and folder.is_dir() else []

    def hub_rows(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(location, row) pairs of an `hf:` source, in the dataset's order."""
        import datasets

        name, _, split = self.path[3:].partition(":")
        split = self.split or split or "train"
        try:
            rows = datasets.load_dataset(name, self.config, split=split, streaming=self.streaming)
        except (ValueError, OSError) as err:  # an unknown config or split, no such dataset, no network
            raise ValueError(f"data source {self.path!r} (config={self.config!r}, split={split!r}, streaming={self.streaming}): "
                             f"{err}") from err
        for i, row in enumerate(rows):
            yield f"{name}[{split}][{i}]", row

    def _hub_documents(self) -> Iterator[str]:
        for location, row in self.hub_rows():
            if self.text_field not in row:
                raise ValueError(f"{location}: no text field {self.text_field!r}; fields: {sorted(row)}. Set text_field")
            if text := document_text(row[self.text_field], location, self.text_field):
                yield text


def _count_and_replace(err: UnicodeError) -> tuple[str, int]:
    _replaced.count += 1
    return "\ufffd", err.end


# errors="replace" that counts: codecs look error handlers up by name, so the count lives beside it.
_replaced = threading.local()
codecs.register_error("lightning_llm.count_replace", _count_and_replace)


def decode_file(path: Path, encoding: str = DEFAULT_ENCODING, errors: str = "strict") -> tuple[str, int]:
    """The text of `path` and the number of replaced characters (always 0 with errors="strict").

    Raises ValueError naming the file, the byte offset and the remedies when a byte sequence is not
    valid in the encoding and `errors` is "strict"."""
    data = path.read_bytes()
    if encoding == DEFAULT_ENCODING and path.suffix == ".py":
        encoding = python_source_encoding(path, data)
    _replaced.count = 0
    try:
        text = data.decode(encoding, errors="strict" if errors == "strict" else "lightning_llm.count_replace")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path}: not valid {encoding} at byte offset {err.start} ({err.reason}: {data[err.start:err.end + 3]!r}). "
            "Give the source its encoding (e.g. encoding: latin-1, utf-16), or errors: replace to replace "
            "undecodable bytes by U+FFFD (counted in the setup table)"
        ) from None
    return text, _replaced.count


def python_source_encoding(path: Path, data: bytes) -> str:
    """A Python file's declared source encoding (PEP 263; UTF-8 without a declaration)."""
    lines = iter(data.splitlines(keepends=True)[:2])
    try:
        return tokenize.detect_encoding(lambda: next(lines, b""))[0]
    except SyntaxError as err:
        raise ValueError(f"{path}: {err.msg}") from None


def _jsonl_texts(path: Path, text: str, text_field: str) -> Iterator[str]:
    # Split on newlines only: a JSON string may hold U+2028, which str.splitlines would cut at.
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
        if not isinstance(record, dict) or text_field not in record:
            raise ValueError(f"{path}:{lineno}: record has no text field {text_field!r}")
        if text := document_text(record[text_field], f"{path}:{lineno}", text_field):
            yield text


def document_text(value: Any, location: str, text_field: str) -> str:
    """A record's text field as a document ("" for null); any other value than a string is refused: its
    printed form ("['a', 'b']", "{'k': 1}") is no text anyone wrote."""
    if value is None or isinstance(value, str):
        return value or ""
    raise ValueError(f"{location}: text field {text_field!r} holds a {type(value).__name__} ({str(value)[:60]!r}), "
                     "not a string; set text_field to the field that holds the text, or write it as one string")


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

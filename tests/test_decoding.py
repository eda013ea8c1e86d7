"""Strict decoding of text sources: bytes that are not valid in the source's encoding are an error naming the
file and the byte offset; `encoding` reads other encodings; errors="replace" only on request, counted."""

from __future__ import annotations

import json
import logging
import random

import pytest

from lightning_llm.data.instruct import InstructionSource
from lightning_llm.data.pretrain import PretrainDataModule
from lightning_llm.data.sources import Source

TEXT = "Le café naïf du résumé: déjà vu à Noël.\nплохо 12 €\n"


def first_bad_byte(data: bytes, encoding: str = "utf-8") -> int:
    """The oracle: the offset Python's own codec reports for the first invalid sequence."""
    try:
        data.decode(encoding)
    except UnicodeDecodeError as err:
        return err.start
    raise AssertionError("the data decodes")


def test_a_latin1_file_is_an_error_unless_its_encoding_is_given(tmp_path):
    path = tmp_path / "latin.txt"
    latin = "Le café naïf du résumé: déjà vu à Noël.\n" * 50
    path.write_bytes(latin.encode("latin-1"))
    offset = latin.encode("latin-1").index("é".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{path}: not valid utf-8 at byte offset {offset} .*encoding: latin-1"):
        list(Source(str(path)).documents())
    assert list(Source(str(path), encoding="latin-1").documents()) == [latin]
    source = Source(str(path), errors="replace")
    (text,) = source.documents()
    non_ascii = sum(ord(ch) > 127 for ch in latin)  # each a lone latin-1 byte: one invalid sequence each
    assert source.replaced == non_ascii == text.count("\ufffd") and non_ascii > 0


def test_a_utf16_file_is_an_error_unless_its_encoding_is_given(tmp_path):
    path = tmp_path / "wide.md"
    path.write_bytes((TEXT * 20).encode("utf-16"))
    with pytest.raises(ValueError, match=rf"{path}: not valid utf-8 at byte offset 0 "):
        list(Source(str(path)).documents())
    (text,) = Source(str(path), encoding="utf-16").documents()
    assert text == TEXT * 20 and "\x00" not in text


def test_random_bytes_are_an_error_naming_the_offset(tmp_path):
    data = bytes(random.Random(0).getrandbits(8) for _ in range(4096))
    (tmp_path / "a.txt").write_text(TEXT)  # a good file first: the error names the bad one
    (tmp_path / "b.txt").write_bytes(data)
    with pytest.raises(ValueError, match=rf"{tmp_path / 'b.txt'}: not valid utf-8 at byte offset {first_bad_byte(data)} "):
        list(Source(str(tmp_path)).documents())


def test_jsonl_and_instruction_files_are_decoded_strictly(tmp_path):
    record = json.dumps({"text": "café", "prompt": "café?", "completion": "oui"}, ensure_ascii=False) + "\n"
    path = tmp_path / "data.jsonl"
    path.write_bytes((record * 3).encode("latin-1"))
    offset = first_bad_byte((record * 3).encode("latin-1"))
    for source in (Source(str(path)), InstructionSource(str(path))):
        reader = source.documents if type(source) is Source else source.records
        with pytest.raises(ValueError, match=rf"{path}: not valid utf-8 at byte offset {offset} "):
            list(reader())
    assert list(Source(str(path), encoding="cp1252").documents()) == ["café"] * 3
    assert [r for _, r in InstructionSource(str(path), encoding="latin-1").records()][0]["prompt"] == "café?"
    with pytest.raises(ValueError, match="unknown encoding 'utf-9'"):
        Source(str(path), encoding="utf-9")
    with pytest.raises(ValueError, match="errors='ignore'"):
        Source(str(path), errors="ignore")


def test_replaced_characters_are_counted_in_the_setup_table(tmp_path, corpus_dir, caplog):
    bad = tmp_path / "bad"
    bad.mkdir()
    text = (TEXT * 400).encode("latin-1", errors="replace")  # (€ and Cyrillic become "?")
    (bad / "notes.txt").write_bytes(text)
    expected = sum(b > 127 for b in text)
    sources = [{"path": str(corpus_dir)}, {"path": str(bad), "errors": "replace"}]
    for _ in range(2):  # tokenized, then from the cache: the count comes with the token file
        dm = PretrainDataModule(sources, vocab_size=300, block_size=16, batch_size=2, cache_dir=str(tmp_path / "cache"))
        with caplog.at_level(logging.INFO):
            caplog.clear()
            dm.setup("fit")
        table = caplog.text
        assert "replaced chars" in table
        assert any(line.startswith("bad") and line.rstrip().endswith(f"{expected:,}") for line in table.splitlines())
    with pytest.raises(ValueError, match=f"{bad / 'notes.txt'}: not valid utf-8"):
        PretrainDataModule(str(bad), vocab_size=300, block_size=16, cache_dir=str(tmp_path / "cache")).setup("fit")


def test_the_standard_library_decodes_strictly():
    # .py files honour their PEP 263 declaration (a few stdlib test modules are latin-1 or koi8-r).
    source = Source("python-stdlib")
    assert sum(1 for _ in source.documents()) > 100 and source.replaced == 0

"""Tokenization over several processes: the token file is byte for byte the one a single process writes
(the oracle), decoding errors still name their file, the count of workers is validated, the setup table
reports the speed."""

from __future__ import annotations

import logging
import os
import shutil

import pytest

from lightning_llm.data.pretrain import PretrainDataModule
from lightning_llm.data.sources import Source
from lightning_llm.data.tokens import load_tokens, tokenize_to_file


def test_two_processes_write_the_file_one_process_writes(corpus_dir, tokenizer, tmp_path):
    source = Source(str(corpus_dir))
    one, two = tmp_path / "one.bin", tmp_path / "two.bin"
    # One document per batch: the batches finish out of order in the workers, and come back in order.
    tokenize_to_file(source, tokenizer, one, workers=1)
    run = tokenize_to_file(source, tokenizer, two, workers=2, max_docs=1)
    assert one.read_bytes() == two.read_bytes() and one.with_suffix(".json").read_bytes() == two.with_suffix(".json").read_bytes()
    # ... and both are the documents tokenized one by one, each followed by EOS.
    naive = [t for doc in source.documents() for t in tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    assert load_tokens(two).tolist() == naive
    assert run.tokens == len(naive) and run.workers == 2
    assert run.text_bytes == sum(f.stat().st_size for f in source.files())  # (the files are UTF-8)


def test_the_data_module_gives_the_same_blocks_with_any_number_of_workers(corpus_dir, tokenizer, tmp_path, caplog):
    tokenizer.save_pretrained(tmp_path / "tok")
    modules = {}
    for workers in (1, 2):
        dm = PretrainDataModule(str(corpus_dir), tokenizer=str(tmp_path / "tok"), block_size=32, batch_size=4,
                                cache_dir=str(tmp_path / f"cache{workers}"), tokenize_workers=workers)
        with caplog.at_level(logging.INFO):
            dm.setup("fit")
        modules[workers] = dm
        assert f"MB/s, {workers} proc" in caplog.text
        caplog.clear()
    one, two = modules[1], modules[2]
    assert len(one.train_set) == len(two.train_set) > 0
    for i in range(len(one.train_set)):
        assert one.train_set[i]["input_ids"].equal(two.train_set[i]["input_ids"])
    again = PretrainDataModule(str(corpus_dir), tokenizer=str(tmp_path / "tok"), block_size=32, batch_size=4,
                               cache_dir=str(tmp_path / "cache2"))
    with caplog.at_level(logging.INFO):
        again.setup("fit")
    assert "(cached)" in caplog.text and "MB/s" not in caplog.text


def test_a_decoding_error_in_a_parallel_run_names_the_file(corpus_dir, tokenizer, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(corpus_dir, corpus)
    bad = corpus / "zz_latin.txt"  # sorted last: the workers have tokenized the files before it
    bad.write_bytes("café\n".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{bad}: not valid utf-8 at byte offset 3 "):
        tokenize_to_file(Source(str(corpus)), tokenizer, tmp_path / "t.bin", workers=2, max_docs=1)
    assert not (tmp_path / "t.bin").exists() and list(tmp_path.glob("*.bin*")) == []  # nothing half-written
    replaced = {}
    for workers in (1, 2):
        path = tmp_path / f"r{workers}.bin"
        tokenize_to_file(Source(str(corpus), errors="replace"), tokenizer, path, workers=workers, max_docs=1)
        replaced[workers] = path.with_suffix(".json").read_text()
    assert replaced[1] == replaced[2] and '"replaced": 1' in replaced[2]


@pytest.mark.parametrize("workers", [0, -2, 1.5, "2", True])
def test_the_number_of_workers_is_validated(workers):
    with pytest.raises(ValueError, match=rf"tokenize_workers must be a positive integer .* got {workers!r}"):
        PretrainDataModule(tokenize_workers=workers)



class DiesInWorkers:
    """A tokenizer whose process dies as it tokenizes, as a worker killed for lack of memory does."""

    eos_token_id = 0

    def __len__(self) -> int:
        return 256

    def __call__(self, texts, add_special_tokens=False):
        os._exit(9)


def test_a_worker_that_dies_is_an_error_not_a_hang(corpus_dir, tmp_path):
    with pytest.raises(RuntimeError, match="a tokenizing worker process died .* fewer tokenize_workers"):
        tokenize_to_file(Source(str(corpus_dir)), DiesInWorkers(), tmp_path / "t.bin", workers=2, max_docs=1)
    assert list(tmp_path.iterdir()) == []

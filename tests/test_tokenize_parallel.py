"""Tokenization over several processes: the token file is byte for byte the one a single process writes
(the oracle), decoding errors still name their file, the count of workers is validated, the setup table
reports the speed; instruction data gets the same examples in the same order, and the same first error."""

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


def test_instruction_data_gives_the_same_examples_with_any_number_of_workers(tokenizer, tmp_path, monkeypatch):
    """Records of every format with bad ones among them, 3 per batch so that the workers finish out of order:
    the examples, their order, the counts of dropped records and the first error are one process's, and the
    examples are each record tokenized on its own (the oracle)."""
    import random

    from lightning_llm.data import instruct
    from test_instruct_data import qa, random_record, write_jsonl

    monkeypatch.setattr(instruct, "RECORDS_PER_BATCH", 3)
    rng = random.Random(1)
    records = [random_record(rng)[0] for _ in range(40)]
    bad = {5: '{"messages": [', 17: {"instruction": "Add."}, 23: qa("Say nothing.", ""), 31: {"conversations": "no turns"}}
    lines = [bad.get(i, record) for i, record in enumerate(records)]
    path = write_jsonl(tmp_path / "chat.jsonl", lines)
    tokenizer.save_pretrained(tmp_path / "tok")

    def data(workers, on_error="skip"):
        return instruct.InstructionDataModule(str(path), tokenizer=str(tmp_path / "tok"), block_size=512, batch_size=2,
                                              on_error=on_error, tokenize_workers=workers)

    modules = {}
    for workers in (1, 2):
        modules[workers] = dm = data(workers)
        with pytest.warns(UserWarning, match=r"chat\.jsonl:6: not valid JSON"):
            dm.setup()
    one, two = modules[1], modules[2]
    assert one.stats == two.stats and two.stats["chat.jsonl"]["dropped"] == 4
    chat = instruct.use_chat_template(tokenizer.__class__.from_pretrained(tmp_path / "tok"))
    naive = [instruct.training_sample(*instruct.tokenize_conversation(chat, instruct.to_messages(r)), 512, True)
             for i, r in enumerate(records) if i not in bad]
    assert len(two.train_set.samples) == len(naive)
    for (ids, targets), (ids1, targets1), (ids2, targets2) in zip(naive, one.train_set.samples, two.train_set.samples):
        assert ids.tolist() == ids1.tolist() == ids2.tolist() and targets.tolist() == targets1.tolist() == targets2.tolist()
    assert [b.tolist() for b in one.train_set.blocks] == [b.tolist() for b in two.train_set.blocks]
    for workers in (1, 2):  # strict: the first bad record stops the run, named by its line, whoever tokenized it
        with pytest.raises(instruct.BadRecord, match=r"chat\.jsonl:6: not valid JSON"):
            data(workers, on_error="raise").setup()


@pytest.mark.parametrize("workers", [0, -1, "2"])
def test_the_instruction_data_workers_are_validated(workers):
    from lightning_llm.data.instruct import InstructionDataModule

    with pytest.raises(ValueError, match=rf"tokenize_workers must be a positive integer .* got {workers!r}"):
        InstructionDataModule("x.jsonl", tokenize_workers=workers)

"""data/: sources, the cached tokenizer, packed blocks, the weighted mixture and bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lightning_llm.data import pretrain as pretrain_data
from lightning_llm.data.pretrain import PretrainDataModule, mixture_index, split_blocks
from lightning_llm.data.sources import Source
from lightning_llm.data.tokenizer import trained_tokenizer


def test_stdlib_source_is_the_interpreters_standard_library():
    files = Source("python-stdlib").files()
    names = {f.name for f in files}
    assert {"os.py", "textwrap.py"} <= names
    assert files == sorted(files) and not any("site-packages" in f.parts for f in files)


def test_blocks_are_inputs_and_shifted_targets(corpus_dir, tmp_path):
    dm = PretrainDataModule(str(corpus_dir), vocab_size=300, block_size=32, batch_size=4, cache_dir=str(tmp_path))
    dm.setup("fit")
    stream = pretrain_data.load_tokens(dm.token_file(dm.sources[0]))
    item = dm.train_set[0]
    s, b = dm.train_set.index[0]
    expected = stream[b * 32 : b * 32 + 33].astype(np.int64)
    assert item["input_ids"].tolist() == expected[:-1].tolist()
    assert item["targets"].tolist() == expected[1:].tolist()
    # the stream is the documents joined with EOS, token for token
    docs = list(dm.sources[0].documents())
    first = dm.tokenizer(docs[0], add_special_tokens=False)["input_ids"] + [dm.tokenizer.eos_token_id]
    assert stream[: len(first)].tolist() == first


def test_split_is_deterministic_and_disjoint():
    train, val = split_blocks(1000, 0.05)
    again_train, again_val = split_blocks(1000, 0.05)
    assert (train == again_train).all() and (val == again_val).all()
    assert not set(train) & set(val) and len(train) + len(val) == 1000
    assert 0.03 < len(val) / 1000 < 0.07


def test_the_validation_share_is_the_one_asked_for_on_small_sources_too():
    """The held-out count is `val_fraction` of the blocks within one chunk, a chunk being at most 16 blocks
    and at most a quarter of the share (at least 1). Before, 16-block chunks and 1 / round(1 / val_fraction)
    held out 1 block of 100 for 0.1, 1 of 300 for 0.02 and half the blocks for 0.4."""
    for f in (0.01, 0.02, 0.05, 0.07, 0.1, 0.15, 0.25, 0.3, 0.4, 0.5):
        for n in range(max(2, math.ceil(1 / f)), 3000, 7):
            train, val = split_blocks(n, f)
            assert len(train) and abs(len(val) - f * n) <= max(1, min(16, f * n / 4)), (n, f, len(val))
    assert [len(split_blocks(n, f)[1]) for n, f in ((100, 0.1), (300, 0.02), (100, 0.4))] == [10, 6, 40]


def test_a_large_source_keeps_the_split_it_had():
    """Where the share holds 4 chunks of 16 blocks or more, and val_fraction is 1/k, the split is the one
    earlier versions made (every k-th chunk of 16): the checkpoints of runs on such corpora resume on it."""
    for k in (2, 4, 10, 20, 50):
        for n in range(64 * k, 64 * k + 2000, 13):
            blocks = np.arange(n)
            assert (split_blocks(n, 1 / k)[1] == blocks[(blocks // 16) % k == k - 1]).all(), (n, k)


def test_mixture_is_measured_in_tokens():
    """70/30 by weight means 70/30 of the blocks (all blocks hold the same number of tokens),
    whatever the sources' own sizes: the small source is upsampled, the large one subsampled."""
    prose, code = np.arange(100), np.arange(5000)
    index = mixture_index([prose, code], [0.7, 0.3], total=2000, seed=0)
    counts = np.bincount(index[:, 0], minlength=2)
    assert counts.tolist() == [1400, 600]
    assert set(index[index[:, 0] == 0, 1]) == set(prose)  # every prose block used, repeatedly
    assert len(set(index[index[:, 0] == 1, 1])) == 600  # code subsampled without repeats


def test_two_sources_mix_by_weight(corpus_dir, tmp_path):
    jsonl = tmp_path / "prose.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": f"Paragraph {i}: the quick brown fox jumps over the lazy dog."}) for i in range(300)))
    dm = PretrainDataModule([{"path": str(jsonl), "weight": 0.7, "text_field": "body"}, {"path": str(corpus_dir), "weight": 0.3}],
                            vocab_size=300, block_size=32, cache_dir=str(tmp_path / "cache"), train_blocks=1000)
    dm.setup("fit")
    assert dm.stats["prose.jsonl"]["mixture_tokens"] == 700 * 32
    assert dm.stats[corpus_dir.name]["mixture_tokens"] == 300 * 32


def test_token_files_are_cached(corpus_dir, tmp_path, monkeypatch):
    kwargs = dict(sources=str(corpus_dir), vocab_size=300, block_size=32, cache_dir=str(tmp_path))
    PretrainDataModule(**kwargs).setup("fit")
    monkeypatch.setattr(pretrain_data, "tokenize_to_file", lambda *a, **k: pytest.fail("tokenized twice"))
    dm = PretrainDataModule(**kwargs)
    dm.setup("fit")
    assert len(dm.train_set) > 0
    assert len(list((tmp_path / "tokenizers").iterdir())) == 1


def test_missing_source(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data source '.*nope' does not exist.*python-stdlib"):
        PretrainDataModule(str(tmp_path / "nope"), cache_dir=str(tmp_path)).setup("fit")


def test_empty_corpus(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(ValueError, match="matches no text files"):
        Source(str(tmp_path / "empty")).files()


def test_corpus_smaller_than_one_block(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tok")
    (tmp_path / "small.txt").write_text("def f(): pass\n")
    dm = PretrainDataModule(str(tmp_path / "small.txt"), tokenizer=str(tmp_path / "tok"), block_size=256, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"fewer than one block of block_size \+ 1 = 257"):
        dm.setup("fit")


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        list(Source(str(path)).documents())


@pytest.mark.parametrize("kwargs, match", [({"block_size": 0}, "block_size must be a positive integer"),
                                           ({"val_fraction": 1.5}, r"val_fraction must be in \[0, 1\)"),
                                           ({"sources": [{"path": "python-stdlib", "weight": 0}]}, "weight must be a finite number > 0"),
                                           # before: TypeError "'>' not supported between 'str' and 'int'", and NaN shares
                                           ({"sources": [{"path": "python-stdlib", "weight": "0.5"}]}, "weight must be a finite number > 0, got '0.5'"),
                                           ({"sources": [{"path": "python-stdlib", "weight": float("inf")}]},
                                            "weight must be a finite number > 0, got inf")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PretrainDataModule(**kwargs)


def test_a_tokenizer_save_killed_midway_leaves_no_half_tokenizer(tmp_path):
    # A child trains the BPE and is killed (os._exit: no cleanup runs) after writing part of it; the name
    # must not exist, and the next run removes the dead writer's temporary and caches a whole tokenizer.
    import subprocess
    import sys
    import textwrap

    child = textwrap.dedent(f"""
        import os
        from transformers import PreTrainedTokenizerFast
        from lightning_llm.data.tokenizer import trained_tokenizer

        def killed(self, folder, *args, **kwargs):
            open(os.path.join(folder, "tokenizer.json"), "w").write('{{"trunc')
            os._exit(9)

        PreTrainedTokenizerFast.save_pretrained = killed
        trained_tokenizer(["def f(x):\\n    return x\\n"] * 50, 300, "k", {str(tmp_path)!r})
    """)
    assert subprocess.run([sys.executable, "-c", child], timeout=300).returncode == 9
    folder = tmp_path / "tokenizers"
    assert [p for p in folder.iterdir() if not p.name.startswith(".")] == []  # no name holds half a tokenizer
    tokenizer = trained_tokenizer(["def f(x):\n    return x\n"] * 50, 300, "k", tmp_path)
    assert tokenizer.decode(tokenizer.encode("return x")) == "return x"
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []  # the dead writer's temporary is gone


def test_a_folders_unread_files_are_announced_with_the_glob_that_reads_them(tmp_path, tokenizer, corpus_dir):
    """A folder stands for its files: those it leaves out (no text suffix) were dropped without a word.
    The count is checked against the files written here; the tokens against the one file that is read."""
    import warnings

    tokenizer.save_pretrained(tmp_path / "tok")
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / ".git").mkdir()
    text = (corpus_dir / "bisect.py").read_text()
    (folder / "bisect.py").write_text(text)
    unread = ("README", "sub/Makefile", "notes.csv", "stubs.pyi")
    for name in (*unread, ".git/HEAD"):  # (a hidden folder is no data)
        (folder / name).write_text("text that is not read\n")
    dm = PretrainDataModule(str(folder), tokenizer=str(tmp_path / "tok"), block_size=16, cache_dir=str(tmp_path))
    with pytest.warns(UserWarning, match=r"4 file\(s\) in .* are not read \(2 without suffix, 1 \.csv, 1 \.pyi\).*"
                                         + r"give them as a file or a glob \(e\.g\. '.*corpus/\*\*/\*'"):
        dm.setup("fit")
    assert dm.stats["corpus"]["tokens"] == len(tokenizer(text)["input_ids"]) + 1  # (+ EOS) the .py file alone
    for name in unread:
        (folder / name).unlink()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*are not read")
        PretrainDataModule(str(folder), tokenizer=str(tmp_path / "tok"), block_size=16, cache_dir=str(tmp_path)).setup("fit")


@pytest.mark.parametrize(("value", "kind"), [(["def g():", "  pass"], "list"), ({"code": "x = 1"}, "dict"), (42, "int"), (True, "bool")])
def test_a_text_field_that_is_no_string_is_refused_naming_its_line(tmp_path, value, kind):
    """Its printed form ("['def g():', '  pass']") was trained on as if someone had written it."""
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ({"text": "def f(): pass"}, {"text": None}, {"text": value})) + "\n")
    with pytest.raises(ValueError, match=rf"docs.jsonl:3: text field 'text' holds a {kind} .*not a string; set text_field"):
        list(Source(str(path)).documents())
    path.write_text("\n".join(json.dumps(r) for r in ({"text": "def f(): pass"}, {"text": None}, {"text": ""}, {"text": "x"})) + "\n")
    assert list(Source(str(path)).documents()) == ["def f(): pass", "x"]  # null and "" hold no document


def test_a_source_without_text_is_named(tmp_path, tokenizer, corpus_dir):
    """Empty and whitespace-only files tokenize to no token: the run stopped on numpy's "cannot mmap an empty
    file", naming no source, and on every later run (the empty token file is cached)."""
    tokenizer.save_pretrained(tmp_path / "tok")
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "empty.txt").write_text("")
    (tmp_path / "blank" / "spaces.md").write_text("  \n\t\n")
    for sources in (str(tmp_path / "blank"), [str(corpus_dir), str(tmp_path / "blank")]):
        for _ in range(2):  # the second time from the cache
            dm = PretrainDataModule(sources, tokenizer=str(tmp_path / "tok"), block_size=16, cache_dir=str(tmp_path / "cache"))
            with pytest.raises(ValueError, match="data source 'blank' has no text: its files are empty or hold only whitespace"):
                dm.setup("fit")

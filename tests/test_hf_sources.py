"""`hf:` sources with a config, a split and streaming, read offline from dataset folders the tests write
(the oracle: the rows written); bad options are errors naming the value."""

from __future__ import annotations

import json

import datasets
import pytest

from lightning_llm.data.instruct import InstructionSource
from lightning_llm.data.pretrain import PretrainDataModule, source_settings
from lightning_llm.data.sources import Source
from lightning_llm.data.tokens import load_tokens

# Each config and split holds distinct text, so reading the wrong one cannot pass.
ROWS = {(config, split): [f"def {config}_{split}_{i}(x):\n    return x * {i}  # {config} {split}\n" for i in range(n)]
        for config in ("en", "de") for split, n in (("train", 40), ("validation", 3))}
README = """---
configs:
""" + "".join(f"""- config_name: {config}
  data_files:
  - split: train
    path: {config}/train.jsonl
  - split: validation
    path: {config}/validation.jsonl
""" for config in ("en", "de")) + "---\n"


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path, monkeypatch):
    """`datasets` converts what it loads into its cache: the tests' own folder, never the user's."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture
def dataset_dir(tmp_path):
    """A dataset folder with two configs (en, de), each with a train and a validation split, as JSONL."""
    root = tmp_path / "ds"
    for (config, split), texts in ROWS.items():
        (root / config).mkdir(parents=True, exist_ok=True)
        (root / config / f"{split}.jsonl").write_text("".join(json.dumps({"content": t, "n": i}) + "\n" for i, t in enumerate(texts)))
    (root / "README.md").write_text(README)
    return root


@pytest.mark.parametrize("streaming", [False, True])
def test_config_and_split_choose_the_rows(dataset_dir, streaming):
    for (config, split), texts in ROWS.items():
        source = Source(f"hf:{dataset_dir}", text_field="content", config=config, split=split, streaming=streaming)
        assert list(source.documents()) == texts
    # the split in the path, the older form, reads the same rows; "train" is the default split
    assert list(Source(f"hf:{dataset_dir}:validation", text_field="content", config="de").documents()) == ROWS["de", "validation"]
    assert list(Source(f"hf:{dataset_dir}", text_field="content", config="de").documents()) == ROWS["de", "train"]


def test_a_parquet_folder_and_split_slicing(tmp_path):
    root = tmp_path / "pq"
    root.mkdir()
    for split in ("train", "validation"):
        datasets.Dataset.from_list([{"text": t} for t in ROWS["en", split]]).to_parquet(str(root / f"{split}.parquet"))
    assert list(Source(f"hf:{root}", split="validation").documents()) == ROWS["en", "validation"]
    assert list(Source(f"hf:{root}", split="train[:5]").documents()) == ROWS["en", "train"][:5]
    assert [row["text"] for _, row in Source(f"hf:{root}", streaming=True).hub_rows()] == ROWS["en", "train"]


@pytest.mark.parametrize("options, match", [
    ({"config": "fr"}, r"config='fr'.*BuilderConfig 'fr' not found. Available: \['en', 'de'\]"),
    ({"config": "en", "split": "test"}, r"split='test'.*Unknown split \"test\""),
    ({"config": "en", "split": "test", "streaming": True}, r"split='test', streaming=True.*test.*\['train', 'validation'\]"),
    ({}, r"(?s)config=None.*Config name is missing.*\['en', 'de'\]"),
])
def test_an_unknown_config_or_split_is_an_error_naming_it(dataset_dir, options, match):
    with pytest.raises(ValueError, match=match):
        list(Source(f"hf:{dataset_dir}", text_field="content", **options).documents())


def test_bad_options_are_errors_naming_the_value(dataset_dir, tmp_path):
    with pytest.raises(ValueError, match=r"the split is given twice \('validation' in the path, split='train'\)"):
        Source(f"hf:{dataset_dir}:validation", split="train")
    with pytest.raises(ValueError, match=r"config='en', streaming=True applies to hf: sources only"):
        Source(str(tmp_path), config="en", streaming=True)
    with pytest.raises(ValueError, match=r"no dataset after 'hf:'"):
        Source("hf:")
    with pytest.raises(ValueError, match=r"streaming must be true or false, got 'yes'"):
        Source(f"hf:{dataset_dir}", streaming="yes")
    with pytest.raises(ValueError, match=r"split must be a non-empty string, got ''"):
        Source(f"hf:{dataset_dir}", split="")
    with pytest.raises(ValueError, match=r"\[validation\]\[0\]: no text field 'text'; fields: \['content', 'n'\]"):
        list(Source(f"hf:{dataset_dir}", config="en", split="validation").documents())


def test_streaming_tokenizes_to_the_same_file_and_data_order(dataset_dir, tokenizer, tmp_path):
    """Streaming reads the same rows: the same token file (the non-streaming one is the oracle), the same
    data order; the config and split are part of both."""
    tokenizer.save_pretrained(tmp_path / "tok")
    files = {}
    for streaming in (False, True):
        spec = {"path": f"hf:{dataset_dir}", "text_field": "content", "config": "en", "streaming": streaming}
        dm = PretrainDataModule([spec], tokenizer=str(tmp_path / "tok"), block_size=16, batch_size=2,
                                cache_dir=str(tmp_path / f"cache-{streaming}"), tokenize_workers=2)
        dm.setup("fit")
        files[streaming] = dm.token_file(dm.sources[0])
        assert source_settings(dm.sources[0]) == {"path": f"hf:{dataset_dir}", "weight": 1.0, "text_field": "content",
                                                  "encoding": "utf-8", "errors": "strict", "config": "en"}
    assert files[False].name == files[True].name and files[False].read_bytes() == files[True].read_bytes()
    naive = [t for doc in ROWS["en", "train"] for t in tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    assert load_tokens(files[True]).tolist() == naive
    other = Source(f"hf:{dataset_dir}", text_field="content", config="de")
    assert other.fingerprint() != dm.sources[0].fingerprint()  # another config, another token file
    before = dm.sources[0].fingerprint()
    with (dataset_dir / "en" / "train.jsonl").open("a") as f:
        f.write(json.dumps({"content": "one more row", "n": 40}) + "\n")
    assert dm.sources[0].fingerprint() != before  # an edited local dataset is tokenized again, not read stale


def test_instruction_sources_read_the_config_and_split(tmp_path):
    root = tmp_path / "chat"
    (root / "alpaca").mkdir(parents=True)
    records = [{"instruction": f"Say {i}.", "output": str(i)} for i in range(4)]
    (root / "alpaca" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "README.md").write_text("---\nconfigs:\n- config_name: alpaca\n  data_files:\n  - split: test\n    path: alpaca/test.jsonl\n---\n")
    for streaming in (False, True):
        source = InstructionSource(f"hf:{root}", config="alpaca", split="test", streaming=streaming)
        assert [row for _, row in source.records()] == records

"""What can be checked without data is checked before tokenizing or training, and the CLI says it in one
or two lines with the fix (LIGHTNING_LLM_TRACEBACK=1 shows the traceback)."""

from __future__ import annotations

import pytest
import yaml
from lightning.pytorch import Trainer
from test_cli import tiny_config

from lightning_llm.cli import main
from lightning_llm.lightning_cli import check_precision_device
from lightning_llm.models import PRESETS, build_config
from lightning_llm.precision import MixedPrecision


def write_config(tmp_path, corpus_dir, **data_args) -> str:
    config = tiny_config(tmp_path, corpus_dir)
    config["data"]["init_args"].update(data_args)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def fails_before_reading_data(tmp_path, args, capsys) -> str:
    """Run the CLI, expect exit 1 with a two-line message, and that nothing was tokenized (the cache is empty)."""
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 2
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(cache.rglob("*")), "tokenized before the check"
    return err


def test_a_block_longer_than_the_models_window_fails_before_tokenizing(tmp_path, corpus_dir, capsys):
    window = PRESETS["tiny"]["max_position_embeddings"]
    config = write_config(tmp_path, corpus_dir, block_size=window + 1)
    err = fails_before_reading_data(tmp_path, ["fit", "--config", config], capsys)
    assert f"block_size {window + 1} exceeds the model's max_position_embeddings {window}; use block_size <= {window}" in err


def test_an_unknown_preset_fails_before_tokenizing_with_the_choices(tmp_path, corpus_dir, capsys):
    config = write_config(tmp_path, corpus_dir)
    err = fails_before_reading_data(tmp_path, ["fit", "--config", config, "--model.model=llama-5M"], capsys)
    assert "unknown model 'llama-5M'" in err and "did you mean 'llama-5m'?" in err
    assert ", ".join(PRESETS) in err and "'org/name'" in err and "./llama-5M" in err


def test_names_offline_are_presets_paths_or_hub_ids():
    with pytest.raises(ValueError, match=r"unknown model 'tinyy' .*did you mean 'tiny'\?.*hub id such as 'org/name'"):
        build_config("tinyy")
    # 'org/name' is a hub id (offline in the tests: a clear error, not "no such file")
    with pytest.raises(ValueError, match=r"unknown model 'some-org/some-model' \(not a preset nor a local path, and as a hub id"):
        build_config("some-org/some-model")
    with pytest.raises(FileNotFoundError, match=r"model './some-org/config.json': no such file"):
        build_config("./some-org/config.json")


def test_a_precision_plugin_for_another_device_fails_before_fit():
    plugin = MixedPrecision("bf16-mixed", device="cpu")
    plugin.device = "cuda"  # as a config written for a GPU machine would make it there
    trainer = Trainer(accelerator="cpu", devices=1, plugins=[plugin], logger=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match=r"MixedPrecision\(device='cuda'\) but the model is on 'cpu': pass device='cpu'"):
        check_precision_device(trainer)


def test_the_traceback_is_shown_on_request(tmp_path, corpus_dir, monkeypatch):
    config = write_config(tmp_path, corpus_dir)
    monkeypatch.setenv("LIGHTNING_LLM_TRACEBACK", "1")
    with pytest.raises(ValueError, match="unknown model 'llama-5M'"):
        main(["fit", "--config", config, "--model.model=llama-5M"])

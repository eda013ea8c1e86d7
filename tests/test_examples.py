"""The example configs: their outputs follow `trainer.default_root_dir`, an export another example reads is
not replaced silently, and the GPU versions parse."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from test_cli import tiny_config

from lightning_llm.cli import main
from lightning_llm.lightning_cli import ROOT, LLMCLI
from lightning_llm.data.pretrain import PretrainDataModule
from lightning_llm.modules.pretrain import PretrainModule

EXAMPLES = Path(__file__).parent.parent / "examples"
RUN_EXAMPLES = ["pretrain_tiny", "sft_tiny", "lora_tiny", "qlora_tiny"]


def outputs(example: str, *args: str) -> dict[str, str]:
    """Where the example would write: its logger, checkpoints, export and adapter (built, not run)."""
    cli = LLMCLI(PretrainModule, PretrainDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
                 args=["--config", str(EXAMPLES / f"{example}.yaml"), *args])
    trainer = cli.trainer
    found = {"root": trainer.default_root_dir}
    if trainer.logger is not None:
        found["logs"] = trainer.logger.save_dir
    found["checkpoints"] = next(c.dirpath for c in trainer.callbacks if isinstance(c, ModelCheckpoint))
    if cli.config.get("export_dir"):
        found["export"] = cli.config["export_dir"]
    adapter = [c.adapter_dir for c in trainer.callbacks if hasattr(c, "adapter_dir")]
    if adapter:
        found["adapter"] = str(adapter[0])
    return found


@pytest.mark.parametrize("example", RUN_EXAMPLES)
def test_every_output_follows_the_default_root_dir(example, tmp_path):
    # (a preset for the model: the finetuning examples' base is another example's export, absent here)
    moved = outputs(example, "--trainer.default_root_dir", str(tmp_path / "elsewhere"), "--model.init_args.model=tiny")
    root = str(tmp_path / "elsewhere")
    assert moved.pop("root") == root
    assert moved and all(str(Path(path)).startswith(root) for path in moved.values()), moved
    assert not any(ROOT in str(path) for path in moved.values())


def test_the_readme_run_writes_where_the_readme_says():
    assert outputs("pretrain_tiny") == {"root": "runs/pretrain_tiny", "logs": "runs/pretrain_tiny",
                                        "checkpoints": str(Path("runs/pretrain_tiny/checkpoints").resolve()),
                                        "export": "runs/pretrain_tiny/hf"}


def test_an_existing_export_is_refused_before_fit_unless_overwrite_is_asked(tmp_path, corpus_dir, capsys):
    config = tiny_config(tmp_path, corpus_dir)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    export = tmp_path / "hf"
    export.mkdir()
    (export / "config.json").write_text("{}")  # an export another run reads
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(tmp_path / "run.yaml")])
    assert info.value.code == 1
    assert "--export_overwrite=true" in capsys.readouterr().err
    assert (export / "config.json").read_text() == "{}" and not (tmp_path / "ckpt").exists()  # nothing trained
    main(["fit", "--config", str(tmp_path / "run.yaml"), "--export_overwrite=true"])
    assert (export / "model.safetensors").exists()


@pytest.mark.parametrize("example", ["pretrain_tiny_gpu", "sft_tiny_gpu"])
def test_the_gpu_examples_parse(example, capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(EXAMPLES / f"{example}.yaml"), "--print_config"])
    assert info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["accelerator"] == "gpu"
    assert printed["model"]["init_args"]["attn_implementation"] == "lightning_fa2"
    assert printed["model"]["init_args"]["compile"] is True
    assert printed["trainer"]["plugins"][0]["init_args"]["precision"] == "bf16-mixed"

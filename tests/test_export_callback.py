"""HFExport and RunSummary: `Trainer.fit` ends in a folder that `from_pretrained` loads, and a summary."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoModelForCausalLM, AutoTokenizer

from _precision_helpers import free_port
from lightning_llm import HFExport, PretrainDataModule, PretrainModule, RunSummary

BLOCK, BATCH, STEPS = 32, 4, 3


@pytest.fixture
def datamodule(corpus_dir, tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    return PretrainDataModule(str(corpus_dir), tokenizer=str(tmp_path / "tok"), block_size=BLOCK, batch_size=BATCH,
                              cache_dir=str(tmp_path / "cache"))


def make_trainer(tmp_path, callbacks, **kwargs):
    options = dict(accelerator="cpu", devices=1, max_steps=STEPS, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=2, val_check_interval=2,
                   default_root_dir=tmp_path, callbacks=callbacks)
    return Trainer(**{**options, **kwargs})


def assert_export_has_the_live_logits(export: Path, module) -> None:
    loaded = AutoModelForCausalLM.from_pretrained(export)
    ids = AutoTokenizer.from_pretrained(export)("def f(x):\n    return x", return_tensors="pt")["input_ids"]
    module.model.eval()
    with torch.no_grad():
        # The same fp32 model on the same CPU: only the order of a few reductions may differ between the two
        # instances, a few ulps of logits of size ~10 (fp32 eps 1.2e-7 x 10 x ~8 terms).
        torch.testing.assert_close(loaded(ids).logits, module.model(ids).logits, rtol=0, atol=1e-5)


def test_fit_writes_an_export_with_the_trained_logits_and_a_summary(datamodule, tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, monitor="val/loss")
    summary, export = RunSummary(), HFExport()
    module = PretrainModule("tiny", warmup_steps=1)
    # the summary is listed first: it must still see the export written after it
    make_trainer(tmp_path, [summary, export, checkpoint]).fit(module, datamodule=datamodule)
    assert export.path == tmp_path / "hf"  # the default: under trainer.default_root_dir
    assert_export_has_the_live_logits(export.path, module)
    rows = dict(summary.lines)
    assert rows["checkpoint (last)"] == checkpoint.last_model_path and Path(checkpoint.last_model_path).exists()
    assert rows["checkpoint (best)"].startswith(checkpoint.best_model_path) and Path(checkpoint.best_model_path).exists()
    assert rows["export"] == str(tmp_path / "hf")
    assert rows["tokens"].startswith(f"{STEPS * BATCH * BLOCK:,} ")
    assert rows["best val/loss"].startswith(f"{float(checkpoint.best_model_score):.4f}")


def test_an_existing_export_stops_the_run_before_training(datamodule, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.safetensors").write_text("an earlier export")
    trainer = make_trainer(tmp_path, [HFExport(tmp_path / "out")])
    with pytest.raises(FileExistsError, match="out' exists and is not empty.*overwrite=True"):
        trainer.fit(PretrainModule("tiny", warmup_steps=1), datamodule=datamodule)
    assert trainer.global_step == 0 and (tmp_path / "out" / "model.safetensors").read_text() == "an earlier export"
    module = PretrainModule("tiny", warmup_steps=1)
    make_trainer(tmp_path, [HFExport(tmp_path / "out", overwrite=True)], limit_val_batches=0).fit(module, datamodule=datamodule)
    assert_export_has_the_live_logits(tmp_path / "out", module)


def test_overwrite_into_the_run_folder_stops_the_run_before_training_and_deletes_nothing(datamodule, tmp_path):
    # HFExport(dirpath=<the run folder>, overwrite=True) would replace the folder that holds the checkpoints.
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    make_trainer(tmp_path, [checkpoint], limit_val_batches=0).fit(PretrainModule("tiny", warmup_steps=1), datamodule=datamodule)
    trainer = make_trainer(tmp_path, [HFExport(tmp_path, overwrite=True)])
    with pytest.raises(FileExistsError, match="overwrite replaces an earlier export.*holds checkpoints.*last.ckpt"):
        trainer.fit(PretrainModule("tiny", warmup_steps=1), datamodule=datamodule)
    assert trainer.global_step == 0 and (tmp_path / "ckpt" / "last.ckpt").exists()


class Fail(Callback):
    """Raises at a step, or leaves a NaN in a weight when training ends."""

    def __init__(self, step: int | None = None) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("planted failure")

    def on_train_end(self, trainer, pl_module):
        if self.step is None:
            with torch.no_grad():
                pl_module.model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")


def test_a_failed_run_or_a_non_finite_model_exports_nothing(datamodule, tmp_path):
    with pytest.warns(UserWarning, match="ended with RuntimeError; nothing was exported"):
        with pytest.raises(RuntimeError, match="planted failure"):
            make_trainer(tmp_path, [HFExport(), Fail(step=1)]).fit(PretrainModule("tiny"), datamodule=datamodule)
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.up_proj\.weight \(1 of"):
        make_trainer(tmp_path, [HFExport(), Fail()], limit_val_batches=0).fit(PretrainModule("tiny"), datamodule=datamodule)
    assert not (tmp_path / "hf").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".hf")] == []  # no temporary left either


def test_a_model_that_is_not_a_whole_transformers_model_is_refused_before_training(datamodule, tmp_path):
    class Adapted(PretrainModule):  # as a LoRA run leaves it: a wrapper around the model, not the model
        def configure_model(self):
            super().configure_model()
            self.model = torch.nn.ModuleDict({"base_model": self.model})

    trainer = make_trainer(tmp_path, [HFExport()])
    with pytest.raises(TypeError, match="Adapted.model: it is a ModuleDict, not a transformers PreTrainedModel.*LoRACallback"):
        trainer.fit(Adapted("tiny"), datamodule=datamodule)
    assert trainer.global_step == 0 and not (tmp_path / "hf").exists()


# -- two ranks: ZeRO-3 (sharded parameters) and a 2-stage pipeline (each rank holds half the layers) ------------


def _two_rank_worker(rank: int, port: int, out: str, corpus: str, tok: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    ids = torch.arange(3, 40).unsqueeze(0)
    for strategy in ("zero3", "pipeline"):
        torch.manual_seed(0)
        module = PretrainModule("tiny", warmup_steps=1)
        data = PretrainDataModule(corpus, tokenizer=tok, block_size=BLOCK, batch_size=BATCH,
                                  cache_dir=str(Path(out) / "cache"))
        Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=STEPS, logger=False, enable_progress_bar=False,
                enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                default_root_dir=Path(out) / strategy, callbacks=[HFExport()]).fit(module, datamodule=data)
        with torch.no_grad():
            if strategy == "zero3":  # every rank takes part in the sharded forward (the root unit gathers)
                live = {"logits": module(ids)}
            else:  # each rank's own stages, under the single-process names
                # (a stage is sharded by ZeRO over its data-parallel ranks, here one: its full tensors)
                live = {"weights": {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                                    for k, v in module.model.state_dict().items()}}
        torch.save(live, Path(out) / f"{strategy}-rank{rank}.pt")


def test_two_ranks_export_the_whole_model(corpus_dir, tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    # (the token cache is built once here, so the two ranks only read it)
    PretrainDataModule(str(corpus_dir), tokenizer=str(tmp_path / "tok"), block_size=BLOCK, batch_size=BATCH,
                       cache_dir=str(tmp_path / "cache")).prepare_data()
    mp.spawn(_two_rank_worker, args=(free_port(), str(tmp_path), str(corpus_dir), str(tmp_path / "tok")), nprocs=2,
             join=True)
    ids = torch.arange(3, 40).unsqueeze(0)
    live = torch.load(tmp_path / "zero3-rank0.pt")["logits"]
    with torch.no_grad():
        # gathered shards are the same numbers; the sharded forward may sum in another order (see above)
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "zero3" / "hf")(ids).logits, live,
                                   rtol=0, atol=1e-5)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "pipeline" / "hf").state_dict()
    stages = [torch.load(tmp_path / f"pipeline-rank{r}.pt")["weights"] for r in range(2)]
    assert set(exported) == set(stages[0]) | set(stages[1])  # both halves, nothing else
    for weights in stages:
        for name, value in weights.items():
            assert torch.equal(exported[name], value), name

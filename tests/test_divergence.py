"""The divergence guard: a non-finite loss or gradient norm stops the run (nothing saved or exported) or
skips the step (weights, optimizer state and LR schedule unchanged), in every precision and on every rank."""

from __future__ import annotations

import math
import os
import re

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from _precision_helpers import PlantOverflow, TinyLM, free_port, loader, pattern_batches
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from test_cli import tiny_config

from lightning_llm.cli import main
from lightning_llm.divergence import DivergenceGuard, NonFiniteError
from lightning_llm.export import load_checkpoint
from lightning_llm.precision import MasterWeightsPrecision, MixedPrecision

PLANTED = 2


class PoisonedLM(TinyLM):
    """TinyLM whose loss is NaN on the given optimizer steps (a batch that makes the forward pass blow up)."""

    def __init__(self, poison_steps: set[int]) -> None:
        super().__init__(warmup=10)
        self.poison_steps = poison_steps

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * math.nan if self.global_step in self.poison_steps else loss


def precision_plugins():
    return {
        "fp32": [],
        "bf16-mixed": [MixedPrecision("bf16-mixed", device="cpu")],
        "fp16-mixed": [MixedPrecision("fp16-mixed", device="cpu")],
        "bf16-master": [MasterWeightsPrecision()],
    }


def fit(module, guard, plugins, steps, callbacks=()):
    trainer = Trainer(accelerator="cpu", devices=1, plugins=plugins, max_steps=steps, callbacks=[guard, *callbacks],
                      logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader(pattern_batches(steps)))
    return trainer


@pytest.mark.parametrize("precision", list(precision_plugins()))
def test_a_nan_batch_stops_the_run_before_its_step_is_applied(precision):
    plant = PlantOverflow(set())  # (plants nothing: only its snapshots around each step are used)
    module = PoisonedLM({PLANTED})
    with pytest.raises(NonFiniteError, match=f"non-finite loss nan .*at step {PLANTED}") as info:
        fit(module, DivergenceGuard("stop"), precision_plugins()[precision], 5, [plant])
    assert "no checkpoint was written" in str(info.value)
    before = plant.before[PLANTED]["weights"]
    for name, value in module.state_dict().items():
        assert torch.equal(value, before[name]) and value.isfinite().all(), name


@pytest.mark.parametrize("precision", list(precision_plugins()))
def test_skip_mode_skips_the_nan_batch_like_an_overflow(precision):
    plant = PlantOverflow(set())
    module = PoisonedLM({PLANTED})
    guard = DivergenceGuard("skip")
    fit(module, guard, precision_plugins()[precision], 5, [plant])
    assert guard.skipped_steps == 1 and guard.consecutive_skips == 0
    before, after = plant.before[PLANTED], plant.after[PLANTED]
    for name, value in after["weights"].items():
        assert torch.equal(value, before["weights"][name]), name
    assert after["optimizer"]["state"].keys() == before["optimizer"]["state"].keys()
    for index, state in after["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(before["optimizer"]["state"][index][key])), key
    # The LR schedule is held on the skipped step, and moves again on the next one.
    assert after["lr"] == before["lr"] and plant.after[PLANTED + 1]["lr"] > after["lr"]
    # The other steps trained, and the model stayed finite.
    assert not all(torch.equal(v, plant.before[PLANTED + 1]["weights"][k]) for k, v in plant.after[PLANTED + 1]["weights"].items())
    assert all(v.isfinite().all() for v in module.state_dict().values())


def test_a_nonfinite_gradient_is_skipped_in_fp32_and_left_to_the_loss_scaler_in_fp16():
    guard = DivergenceGuard("skip")
    plant = PlantOverflow({PLANTED}, value=math.nan)
    fit(TinyLM(warmup=10), guard, [], 4, [plant])
    assert guard.skipped_steps == 1
    assert all(torch.equal(v, plant.before[PLANTED]["weights"][k]) for k, v in plant.after[PLANTED]["weights"].items())
    guard, scaler = DivergenceGuard("stop"), MixedPrecision("fp16-mixed", device="cpu")
    fit(TinyLM(warmup=10), guard, [scaler], 4, [PlantOverflow({PLANTED})])  # an overflow: no error
    assert scaler.skipped_steps == 1 and guard.skipped_steps == 0


def test_skip_mode_stops_after_max_nonfinite_skips_in_a_row():
    guard = DivergenceGuard("skip", max_nonfinite_skips=3)
    with pytest.raises(NonFiniteError, match=r"3 optimizer steps in a row skipped \(max_nonfinite_skips=3\).*at step 3"):
        fit(PoisonedLM({1, 2, 3, 4, 5}), guard, [], 8)
    with pytest.raises(ValueError, match="on_nonfinite='ignore'"):
        DivergenceGuard("ignore")


def test_cli_divergence_stops_with_the_step_and_exports_nothing(tmp_path, corpus_dir, capsys):
    config = tiny_config(tmp_path, corpus_dir)
    config["model"]["init_args"]["lr"] = 1000.0
    config["trainer"]["max_steps"] = 30
    config["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 3
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(tmp_path / "run.yaml")])
    assert info.value.code == 1
    err = capsys.readouterr().err
    # Which goes first, the loss or the gradient norm, and to nan or inf, depends on the init's dynamics.
    step = int(re.search(r"non-finite (?:loss|gradient norm) (?:nan|-?inf).* at step (\d+)", err).group(1))
    assert not (tmp_path / "hf").exists()  # export_dir: nothing exported
    # The checkpoint the message names is the last one, written before the bad step, and finite.
    last = tmp_path / "ckpt" / "last.ckpt"
    assert f"the last checkpoint, {last}, is finite" in err
    checkpoint = load_checkpoint(last)
    assert checkpoint["global_step"] < step
    assert all(value.isfinite().all() for value in checkpoint["state_dict"].values())


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    results = {}
    for mode in ("skip", "stop"):
        plant = PlantOverflow({PLANTED} if rank == 1 else set(), value=math.nan)
        guard, module = DivergenceGuard(mode), TinyLM(warmup=10)
        trainer = Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend="gloo"),
                          max_steps=4, callbacks=[guard, plant], logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False)
        try:
            trainer.fit(module, loader(pattern_batches(4, seed=rank)))
            error = None
        except NonFiniteError as err:
            error = str(err)
        results[mode] = dict(error=error, skipped=guard.skipped_steps, weights=module.state_dict(),
                             unchanged=all(torch.equal(v, plant.before[PLANTED]["weights"][k])
                                           for k, v in module.state_dict().items()) if mode == "stop" else
                             all(torch.equal(v, plant.before[PLANTED]["weights"][k])
                                 for k, v in plant.after[PLANTED]["weights"].items()))
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    if dist.is_initialized():
        dist.destroy_process_group()


def test_ddp_ranks_agree_when_only_one_sees_a_nan_gradient(tmp_path):
    mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    for result in ranks:
        assert result["skip"]["error"] is None and result["skip"]["skipped"] == 1 and result["skip"]["unchanged"]
        # Rank 0's own gradients were finite: it stops because rank 1's were not.
        assert f"at step {PLANTED}" in result["stop"]["error"] and result["stop"]["unchanged"]
    assert "gradient norm non-finite on another rank" in ranks[0]["stop"]["error"]
    for key, value in ranks[0]["skip"]["weights"].items():
        assert torch.equal(value, ranks[1]["skip"]["weights"][key]), key


class CorruptWeights(Callback):
    """Sets one weight to NaN after optimizer step `step`: weights gone non-finite with a finite loss and
    gradient up to that point (the guard's loss and gradient checks have not seen anything)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.get_input_embeddings().weight[3, 5] = math.nan


def test_a_checkpoint_of_non_finite_weights_is_refused_and_the_last_one_kept(tmp_path):
    # A checkpoint after every step, `last.ckpt` among them (ModelCheckpoint runs after the other callbacks,
    # so it would save the corrupted weights of step 3); the step-2 file is the oracle of what must remain.
    checkpoints = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=1, save_top_k=-1, save_last=True)
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=6, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[DivergenceGuard(), CorruptWeights(3), checkpoints])
    with pytest.raises(NonFiniteError, match=r"refusing to save the checkpoint of step 3: \d weight tensors hold inf or "
                                             r"NaN: model\.model\.embed_tokens\.weight \(1 of \d+\).*; nothing was written, "
                                             rf"the last checkpoint, {re.escape(str(tmp_path / 'last.ckpt'))}, is finite"):
        trainer.fit(TinyLM(), loader(pattern_batches(6)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "step=1.ckpt", "step=2.ckpt"]
    last, step2 = load_checkpoint(tmp_path / "last.ckpt"), load_checkpoint(tmp_path / "step=2.ckpt")
    assert last["global_step"] == 2
    for name, tensor in step2["state_dict"].items():
        assert torch.equal(last["state_dict"][name], tensor), name


def test_generate_evaluate_and_export_refuse_a_model_with_non_finite_weights(tmp_path, tokenizer, capsys):
    # The model `generate`, `evaluate` and `chat` load (cli.inference_model): a checkpoint and an export
    # directory written by another tool. Unrefused, sampling fails in torch.multinomial and greedy decoding
    # and lm-eval's scores come out silently wrong.
    from lightning_llm.cli import inference_model
    from lightning_llm.modules.pretrain import PretrainModule

    module = PretrainModule("tiny", vocab_size=len(tokenizer))
    module.configure_model()
    module.tokenizer = tokenizer
    with torch.no_grad():
        module.model.model.norm.weight[7] = math.inf
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "diverged.ckpt")
    refused = r"refusing to use '{}': 1 weight tensors hold inf or NaN: model\.norm\.weight \(1 of \d+\)\. The run diverged"
    with pytest.raises(SystemExit) as info:
        main(["generate", "--checkpoint", str(tmp_path / "diverged.ckpt"), "--prompt", "def "])
    assert info.value.code == 1
    assert re.search(refused.format(re.escape(str(tmp_path / "diverged.ckpt"))), capsys.readouterr().err)
    # ... and `lightning-llm export` writes nothing of it
    with pytest.raises(SystemExit):
        main(["export", "--checkpoint", str(tmp_path / "diverged.ckpt"), "--out", str(tmp_path / "exported")])
    assert re.search(r"refusing to export '.*exported': 1 weight tensors hold inf or NaN: model\.norm\.weight \(1 of", capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diverged.ckpt"]
    module.model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match=refused.format(re.escape(str(tmp_path / "hf")))):
        inference_model(str(tmp_path / "hf"))

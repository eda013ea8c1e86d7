"""ZeROStrategy against single-process training: 2 processes on gloo, stages 1, 2 and 3.

Distributed launches are slow, so one 2-rank job trains every stage (recording losses, state bytes,
initial and final weights, checkpoints, logits) and one 1-rank job resumes its checkpoints and runs
the YAML config; the tests compare what they wrote against a plain PyTorch loop on one process.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp

from lightning_llm.export import load_checkpoint
from lightning_llm.strategies.zero import ZeROStrategy
from tolerances import adam_update_rtol, assert_adam_steps_close, loss_atol, reordered_sum_rtol

VOCAB, ROWS, SEQ = 512, 4, 16  # the global batch is ROWS x SEQ tokens
STEPS, SAVE_AT = 10, 5  # two epochs of SAVE_AT batches: the checkpoint is at the epoch boundary
HP = dict(lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), warmup_steps=2, min_lr_ratio=0.1, max_steps=STEPS)
CLIP = 0.2  # below the gradient norm of every step, so clipping always acts and a wrong global norm would show
RESUMED = (1, 3)  # stages whose checkpoints are resumed (stage 2 saves and loads through stage 3's code path)
# Each stage also exercises an option: stage 2 activation checkpointing and gradient accumulation over
# a whole epoch (so that the epoch's end, where Lightning always steps, closes a full accumulation),
# stage 3 CPU offload (on a CPU it stays in place).
OPTIONS = {1: {}, 2: dict(activation_checkpointing=True), 3: dict(cpu_offload=True)}
ACCUMULATE = {1: 1, 2: SAVE_AT, 3: 1}
PLANTED = 3  # the optimizer step whose gradient gets an inf on rank 1 in the fp16 runs


def global_batches() -> list[dict[str, torch.Tensor]]:
    """One epoch of global batches."""
    g = torch.Generator().manual_seed(1234)
    batches = []
    for _ in range(SAVE_AT):
        tokens = torch.randint(0, VOCAB, (ROWS, SEQ + 1), generator=g)
        batches.append({"input_ids": tokens[:, :-1], "targets": tokens[:, 1:]})
    return batches


def rank_batches(rank: int, world: int) -> list[dict[str, torch.Tensor]]:
    """Rank `rank`'s rows of every global batch (the distributed sampler is off: the split is explicit)."""
    rows = ROWS // world
    return [{k: v[rank * rows:(rank + 1) * rows] for k, v in b.items()} for b in global_batches()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- what runs in the spawned processes ----------------------------------------------------------


def _trainer(world: int, stage: int, max_steps: int, callbacks: list, ckpt_dir: Path | None = None,
             plugins: list = (), options: dict | None = None, accumulate: int | None = None):
    from lightning.pytorch.callbacks import ModelCheckpoint

    if ckpt_dir is not None:
        callbacks = [*callbacks, ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", every_n_train_steps=SAVE_AT,
                                                 save_top_k=-1, save_last=True)]
    options = OPTIONS[stage] if options is None else options
    accumulate = ACCUMULATE[stage] if accumulate is None else accumulate
    return L.Trainer(accelerator="cpu", devices=world, strategy=ZeROStrategy(stage=stage, **options),
                     plugins=list(plugins), max_steps=max_steps, accumulate_grad_batches=accumulate, logger=False,
                     enable_checkpointing=ckpt_dir is not None, enable_progress_bar=False, enable_model_summary=False,
                     use_distributed_sampler=False, gradient_clip_val=CLIP, callbacks=callbacks)


def full_weights(model) -> dict:
    """The whole model's weights, gathered from any sharding, as CPU copies (for replicated, stage 1,
    parameters on CPU the state dict holds the live tensors)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().clone() for k, v in state.items()}


def _recorder(record: dict):
    from torch.distributed.tensor import DTensor

    from lightning_llm.strategies.zero import state_bytes

    class Recorder(L.Callback):
        def on_train_start(self, trainer, pl_module):
            record["init"] = full_weights(pl_module.model)

        def on_before_backward(self, trainer, pl_module, loss):
            # FSDP2 swaps a unit's DTensor shards for whole parameters while it is gathered.
            record.setdefault("gathered", sum(p.nbytes for p in pl_module.parameters() if not isinstance(p, DTensor)))

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            record.setdefault("bytes", state_bytes(pl_module))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 1:  # right after the first optimizer step (later, with accumulation)
                record.setdefault("bytes_after_step", state_bytes(pl_module, trainer.optimizers))
            # Lightning reports the loss divided by the number of accumulated batches.
            record.setdefault("losses", []).append(outputs["loss"].item() * trainer.accumulate_grad_batches)

        def on_train_end(self, trainer, pl_module):
            record["final"] = full_weights(pl_module.model)

    return Recorder()


def _module():
    from lightning_llm.modules.pretrain import PretrainModule

    return PretrainModule("tiny", vocab_size=VOCAB, **HP)


def _loader(rank: int, world: int):
    return torch.utils.data.DataLoader(rank_batches(rank, world), batch_size=None)


def _worker(rank: int, world: int, port: int, out: str, job: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    out = Path(out)
    results: dict = {}
    if job == "train":
        for stage in (1, 2, 3):
            record: dict = {}
            torch.manual_seed(stage + 10 * rank)  # ranks draw different numbers: the shards must not depend on it
            module = _module()
            ckpt_dir = out / f"stage{stage}" if stage in RESUMED else None
            _trainer(world, stage, STEPS, [_recorder(record)], ckpt_dir).fit(module, _loader(rank, world))
            if stage == 3:
                with torch.no_grad():
                    record["logits"] = module(global_batches()[0]["input_ids"])
            results[stage] = record
            if stage in RESUMED:
                resumed: dict = {}
                _trainer(world, stage, STEPS, [_recorder(resumed)]).fit(
                    _module(), _loader(rank, world), ckpt_path=str(out / f"stage{stage}" / f"step={SAVE_AT}.ckpt"))
                results[f"resumed{stage}"] = resumed
        results.update(_precision_runs(rank, world, out))
    elif job == "resume_on_one":
        for stage in RESUMED:
            resumed = {}
            _trainer(world, stage, STEPS, [_recorder(resumed)]).fit(
                _module(), _loader(rank, world), ckpt_path=str(out / f"stage{stage}" / f"step={SAVE_AT}.ckpt"))
            results[f"resumed{stage}"] = resumed
        results.update(_resume_master_weights(world, out))
        results["cli"] = _run_yaml_config(out)
    torch.save(results, out / f"{job}-rank{rank}.pt")


def _precision_runs(rank: int, world: int, out: Path) -> dict:
    """Every stage under fp16 loss scaling (an inf planted in rank 1's gradient shard only, at step
    PLANTED) and under bf16 weights with fp32 master weights, checkpointed at SAVE_AT and resumed from
    there; no stage options, no accumulation."""
    from lightning_llm.precision import MasterWeightsPrecision, MixedPrecision

    results: dict = {}
    for stage in (1, 2, 3):
        record: dict = {}
        torch.manual_seed(stage + 10 * rank)
        plugin = MixedPrecision("fp16-mixed", device="cpu", init_scale=1024.0, growth_interval=100)
        plant = PlantInf(PLANTED if rank == 1 else None)
        _trainer(world, stage, STEPS, [_recorder(record), plant], plugins=[plugin], options={}, accumulate=1).fit(
            _module(), _loader(rank, world))
        results[f"fp16-{stage}"] = dict(record, skipped_steps=plugin.skipped_steps, scale=plugin.scaler.get_scale(),
                                        **plant.snapshots)
        record, saved, resumed, restored = {}, RecordMasters(SAVE_AT), {}, RecordMasters(None)
        torch.manual_seed(stage + 10 * rank)
        ckpt_dir = out / f"bf16-stage{stage}"
        _trainer(world, stage, STEPS, [_recorder(record), saved], ckpt_dir, plugins=[MasterWeightsPrecision("bf16")],
                 options={}, accumulate=1).fit(_module(), _loader(rank, world))
        _trainer(world, stage, STEPS, [_recorder(resumed), restored], plugins=[MasterWeightsPrecision("bf16")],
                 options={}, accumulate=1).fit(_module(), _loader(rank, world), ckpt_path=str(ckpt_dir / f"step={SAVE_AT}.ckpt"))
        results[f"bf16-{stage}"] = dict(record, masters_at_save=saved.masters)
        results[f"bf16-resumed{stage}"] = dict(resumed, masters_at_resume=restored.masters)
    return results


def _resume_master_weights(world: int, out: Path) -> dict:
    """The MasterWeightsPrecision checkpoints of the 2-rank runs, resumed on `world` ranks."""
    from lightning_llm.precision import MasterWeightsPrecision

    results: dict = {}
    for stage in (1, 2, 3):
        resumed, restored = {}, RecordMasters(None)
        _trainer(world, stage, STEPS, [_recorder(resumed), restored], plugins=[MasterWeightsPrecision("bf16")],
                 options={}, accumulate=1).fit(_module(), _loader(0, world),
                                               ckpt_path=str(out / f"bf16-stage{stage}" / f"step={SAVE_AT}.ckpt"))
        results[f"bf16-resumed{stage}"] = dict(resumed, masters_at_resume=restored.masters)
    return results


class RecordMasters(L.Callback):
    """The whole fp32 masters and their Adam moments by parameter name, after optimizer step `step`
    (None: at the start of training, i.e. right after a checkpoint is restored)."""

    def __init__(self, step: int | None) -> None:
        self.step = step
        self.masters: dict = {}

    def _record(self, trainer) -> None:
        optimizer = trainer.optimizers[0]
        for name, master in trainer.strategy._stepped_tensors().items():
            assert master.dtype == torch.float32
            state = optimizer.state[master]
            # Copies: on one rank `full_tensor` is the live tensor, which the next steps change.
            self.masters[name] = {key: t.full_tensor().clone() for key, t in
                                  dict(master=master, exp_avg=state["exp_avg"], exp_avg_sq=state["exp_avg_sq"]).items()}

    def on_train_start(self, trainer, pl_module):
        if self.step is None:
            self._record(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            self._record(trainer)


class PlantInf(L.Callback):
    """Writes an inf into this rank's own part (the last element) of one gradient after backward of
    optimizer step `step`, and keeps this rank's weights and the learning rate around that step."""

    def __init__(self, step: int | None) -> None:
        self.step = step
        self.snapshots: dict = {}

    def _snapshot(self, trainer, pl_module, when: str) -> None:
        from torch.distributed.tensor import DTensor

        weights = [(p.to_local() if isinstance(p, DTensor) else p).detach().clone() for p in pl_module.parameters()]
        self.snapshots[when] = {"weights": weights, "lr": trainer.optimizers[0].param_groups[0]["lr"]}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == PLANTED:
            self._snapshot(trainer, pl_module, "before")

    def on_after_backward(self, trainer, pl_module):
        from torch.distributed.tensor import DTensor

        if trainer.global_step == self.step:
            grad = next(pl_module.parameters()).grad
            (grad.to_local() if isinstance(grad, DTensor) else grad).view(-1)[-1] = float("inf")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == PLANTED + 1:
            self._snapshot(trainer, pl_module, "after")


class RandomTokens(L.LightningDataModule):
    """A minimal data module for the YAML run (LightningCLI instantiates it)."""

    def train_dataloader(self):
        return _loader(0, 1)


def _run_yaml_config(out: Path) -> dict:
    from lightning.pytorch.cli import LightningCLI
    from torch.distributed.tensor import DTensor

    from lightning_llm.modules.pretrain import PretrainModule

    config = out / "zero.yaml"
    config.write_text(
        "trainer:\n"
        "  accelerator: cpu\n  devices: 1\n  max_steps: 2\n  logger: false\n  enable_checkpointing: false\n"
        "  enable_progress_bar: false\n  use_distributed_sampler: false\n"
        "  strategy:\n    class_path: lightning_llm.strategies.zero.ZeROStrategy\n    init_args:\n      stage: 2\n"
        f"model:\n  model: tiny\n  vocab_size: {VOCAB}\n"
    )
    cli = LightningCLI(PretrainModule, RandomTokens, args=["fit", "--config", str(config)], save_config_callback=None)
    strategy = cli.trainer.strategy
    return {"class": type(strategy).__name__, "stage": strategy.stage, "steps": cli.trainer.global_step,
            "sharded": all(isinstance(p, DTensor) for p in cli.model.parameters())}


def _spawn(world: int, out: Path, job: str) -> list[dict]:
    mp.spawn(_worker, args=(world, free_port(), str(out), job), nprocs=world, join=True)
    return [torch.load(out / f"{job}-rank{r}.pt", weights_only=False) for r in range(world)]


# -- the single-process oracle ---------------------------------------------------------------------


def single_process_run(init: dict[str, torch.Tensor], steps: int, accumulate: int,
                       skip: int | None = None) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The same recipe in a plain PyTorch loop on one process over the whole global batch: the loss
    of every batch and the final weights after `steps` optimizer steps of `accumulate` batches each
    (step `skip` is dropped: no update, the schedule held)."""
    from torch.optim.lr_scheduler import LambdaLR

    from lightning_llm.models import build_model
    from lightning_llm.modules.pretrain import next_token_loss, parameter_groups, warmup_cosine

    model = build_model("tiny", vocab_size=VOCAB)
    model.load_state_dict(init)
    optimizer = torch.optim.AdamW(parameter_groups(model, HP["weight_decay"]), lr=HP["lr"], betas=HP["betas"])
    schedule = LambdaLR(optimizer, lambda s: warmup_cosine(s, HP["warmup_steps"], STEPS, HP["min_lr_ratio"]))
    losses = []
    epoch = global_batches()
    for step in range(steps):
        for micro in range(accumulate):
            batch = epoch[(step * accumulate + micro) % len(epoch)]
            loss = next_token_loss(model(input_ids=batch["input_ids"], use_cache=False).logits, batch["targets"])
            (loss / accumulate).backward()
            losses.append(loss.item())
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        assert norm > CLIP, f"step {step}: gradient norm {norm:.3f} does not exceed the clip value {CLIP}"
        if step != skip:
            optimizer.step()
            schedule.step()
        optimizer.zero_grad()
    return losses, {k: v.detach() for k, v in model.state_dict().items()}


# -- the tests -------------------------------------------------------------------------------------

# fp32: the ranks sum the gradient mean in another order than one process. A loss is a mean of
# ROWS x SEQ positive token losses from logits that are dot products over 64 hidden units: reordering
# either sum moves it by at most reordered_sum_rtol(fp32, 64) relative. Weights: assert_adam_steps_close.
LOSS_TOL = dict(rtol=2 * reordered_sum_rtol(torch.float32, ROWS * SEQ), atol=0)
LR_SUM = STEPS * HP["lr"]  # the warm-up and cosine steps are at most HP["lr"] each


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero")
    train = _spawn(2, out, "train")
    one = _spawn(1, out, "resume_on_one")
    return {"train": train, "one": one[0], "out": out}


def _mean_losses(records: list[dict]) -> list[float]:
    # Each rank logs the mean loss of its half of the batch (same token count): the global loss is their mean.
    return [sum(values) / len(values) for values in zip(*(r["losses"] for r in records))]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_training_equals_single_process(runs, stage):
    records = [rank[stage] for rank in runs["train"]]
    init = records[0]["init"]
    expected_losses, expected_weights = single_process_run(init, STEPS, ACCUMULATE[stage])
    torch.testing.assert_close(torch.tensor(_mean_losses(records)), torch.tensor(expected_losses), **LOSS_TOL)
    final = records[0]["final"]
    assert final.keys() == expected_weights.keys()
    for name, weight in expected_weights.items():
        assert not torch.equal(weight, init[name]), f"{name} did not train"
    assert_adam_steps_close(final, expected_weights, lr_sum=LR_SUM)


def _shard_numel(shapes: list[torch.Size], rank: int, world: int) -> int:
    """Elements of rank `rank`'s dim-0 chunk of every tensor (ceil-sized chunks, as torch.chunk cuts)."""
    total = 0
    for shape in shapes:
        rows = -(-shape[0] // world)
        total += max(0, min(rows, shape[0] - rank * rows)) * shape[1:].numel()
    return total


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_state_bytes_match_stage_formula(runs, stage):
    from lightning_llm.models import build_model

    with torch.device("meta"):
        model = build_model("tiny", vocab_size=VOCAB)
    shapes = [p.shape for p in model.parameters()]  # tied embedding once
    full = 4 * sum(s.numel() for s in shapes)  # fp32 bytes
    world = len(runs["train"])
    for rank, results in enumerate(runs["train"]):
        record = results[stage]
        shard = 4 * _shard_numel(shapes, rank, world)
        assert abs(shard - full / world) <= 4 * sum(s[1:].numel() for s in shapes)  # exact up to one row of padding
        adam = 2 * shard + 4 * len(shapes)  # exp_avg and exp_avg_sq shards, one fp32 step count per parameter
        # Whole parameters between forward and backward: every one at stages 1 and 2 (the root unit,
        # embedding and final norm, included: it once was freed and gathered again for backward when the
        # step called the module inside the root's forward); none at stage 3.
        expected = {
            1: dict(params=full, grads=full, gathered=full),
            2: dict(params=shard, grads=shard, gathered=full),
            3: dict(params=shard, grads=shard, gathered=0),
        }[stage]
        measured = dict(params=record["bytes"]["params"], grads=record["bytes"]["grads"], gathered=record["gathered"])
        assert measured == expected
        assert record["bytes_after_step"]["optimizer"] == adam


@pytest.mark.parametrize("stage", RESUMED)
def test_resume_on_two_and_on_one_rank(runs, stage):
    uninterrupted = _mean_losses([rank[stage] for rank in runs["train"]])[SAVE_AT * ACCUMULATE[stage]:]
    on_two = _mean_losses([rank[f"resumed{stage}"] for rank in runs["train"]])
    on_one = runs["one"][f"resumed{stage}"]["losses"]
    torch.testing.assert_close(torch.tensor(on_two), torch.tensor(uninterrupted), **LOSS_TOL)
    torch.testing.assert_close(torch.tensor(on_one), torch.tensor(uninterrupted), **LOSS_TOL)
    assert_adam_steps_close(runs["one"][f"resumed{stage}"]["final"], runs["train"][0][stage]["final"], lr_sum=LR_SUM)


def test_last_checkpoint_is_a_directory_that_consolidates(runs):
    last = runs["out"] / "stage3" / "last.ckpt"
    assert last.is_dir() and sorted(p.name for p in last.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    checkpoint = load_checkpoint(last)
    final = runs["train"][0][3]["final"]
    assert checkpoint["global_step"] == STEPS and "hf_config" in checkpoint and "optimizer_0" not in checkpoint
    for name, weight in final.items():
        assert torch.equal(checkpoint["state_dict"][f"model.{name}"], weight)


def test_consolidated_export_loads_in_transformers(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    from lightning_llm.export import model_from_checkpoint, save_pretrained_atomic

    checkpoint = load_checkpoint(runs["out"] / "stage3" / "last.ckpt")
    save_pretrained_atomic(model_from_checkpoint(checkpoint), tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        logits = model(global_batches()[0]["input_ids"]).logits
    torch.testing.assert_close(logits, runs["train"][0][3]["logits"], rtol=0, atol=1e-5)


def test_yaml_config_with_lightning_cli(runs):
    assert runs["one"]["cli"] == {"class": "ZeROStrategy", "stage": 2, "steps": 2, "sharded": True}


@pytest.mark.parametrize("kwargs, message", [
    (dict(stage=4), "stage must be one of (1, 2, 3), got 4"),
    (dict(stage=0), "got 0"),
    (dict(stage=1, cpu_offload=True), "cpu_offload=True needs stage 2 or 3"),
])
def test_bad_options_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ZeROStrategy(**kwargs)


def test_lightning_fp16_amp_is_refused():
    with pytest.raises(ValueError, match="16-mixed"):
        L.Trainer(accelerator="cpu", devices=1, strategy=ZeROStrategy(stage=2), precision="16-mixed")


# fp16/bf16 round the forward and backward; the oracle is fp32. Adam divides each gradient by its own
# running magnitude, so elements whose gradient is near zero move by ~lr either way: the weights are
# compared as the whole update's relative error (adam_update_rtol: 0.18 fp16, 0.5 bf16; measured <= 0.011
# and <= 0.029), the losses element by element (loss_atol: 1.6e-2 fp16, 0.125 bf16, for max|z| 8).
FP16_LOSS_TOL = dict(rtol=0, atol=loss_atol(torch.float16))
BF16_LOSS_TOL = dict(rtol=0, atol=loss_atol(torch.bfloat16))
UPDATE_TOL = {"fp16": adam_update_rtol(torch.float16, ROWS * SEQ), "bf16": adam_update_rtol(torch.bfloat16, ROWS * SEQ)}


def _update_error(init: dict, final: dict, expected: dict) -> float:
    """|final - expected| / |expected - init| over all weights (L2 norms, fp32)."""
    error = sum(((final[k].float() - v) ** 2).sum() for k, v in expected.items()) ** 0.5
    update = sum(((v - init[k].float()) ** 2).sum() for k, v in expected.items()) ** 0.5
    return (error / update).item()


def assert_one_step_skipped_on_every_rank(records: list[dict]) -> None:
    """Each rank's record of an fp16 run with one planted inf: one step skipped, the scale halved from 1024,
    and on that step neither the learning rate nor any weight moved."""
    for rank, record in enumerate(records):
        assert record["skipped_steps"] == 1 and record["scale"] == 512.0, f"rank {rank}"
        before, after = record["before"], record["after"]
        assert after["lr"] == before["lr"], f"rank {rank}: the schedule moved on a skipped step"
        for old, new in zip(before["weights"], after["weights"], strict=True):
            assert torch.equal(old, new), f"rank {rank}: weights changed on a skipped step"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_fp16_overflow_on_one_rank_skips_the_step_on_both(runs, stage):
    records = [rank[f"fp16-{stage}"] for rank in runs["train"]]
    assert_one_step_skipped_on_every_rank(records)
    # Every other step trains as fp32 does on one process with the planted step dropped.
    init = records[0]["init"]
    expected_losses, expected_weights = single_process_run(init, STEPS, 1, skip=PLANTED)
    torch.testing.assert_close(torch.tensor(_mean_losses(records)), torch.tensor(expected_losses), **FP16_LOSS_TOL)
    error = _update_error(init, records[0]["final"], expected_weights)
    assert error < UPDATE_TOL["fp16"], f"fp16 update off the fp32 one by {error:.4f}"



@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_master_weights_track_fp32(runs, stage):
    records = [rank[f"bf16-{stage}"] for rank in runs["train"]]
    init, final = records[0]["init"], records[0]["final"]
    assert all(w.dtype == torch.bfloat16 for w in final.values())
    expected_losses, expected_weights = single_process_run({k: v.float() for k, v in init.items()}, STEPS, 1)
    torch.testing.assert_close(torch.tensor(_mean_losses(records)), torch.tensor(expected_losses), **BF16_LOSS_TOL)
    error = _update_error(init, final, expected_weights)
    assert error < UPDATE_TOL["bf16"], f"bf16 update off the fp32 one by {error:.4f}"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_master_weights_resume_exactly(runs, stage):
    # The oracle is the uninterrupted run: save at SAVE_AT + resume + the rest must be that run, bit for bit.
    uninterrupted = _mean_losses([rank[f"bf16-{stage}"] for rank in runs["train"]])[SAVE_AT:]
    resumed = _mean_losses([rank[f"bf16-resumed{stage}"] for rank in runs["train"]])
    assert resumed == uninterrupted
    for rank in runs["train"]:
        saved, restored = rank[f"bf16-{stage}"]["masters_at_save"], rank[f"bf16-resumed{stage}"]["masters_at_resume"]
        assert saved.keys() == restored.keys() and "model.lm_head.weight" in saved  # tied: under both names
        for name, tensors in saved.items():
            for key, tensor in tensors.items():
                assert torch.equal(restored[name][key], tensor), f"{name} {key}"
        final = {f"model.{k}": v for k, v in rank[f"bf16-resumed{stage}"]["final"].items()}
        for name, weight in {f"model.{k}": v for k, v in rank[f"bf16-{stage}"]["final"].items()}.items():
            assert torch.equal(final[name], weight), name
    # On one rank: the same state is restored; the next losses differ only by the bf16 rounding of the
    # gradients, summed in another order (measured: <= 3.2e-4; bound: loss_atol(bf16)).
    on_one = runs["one"][f"bf16-resumed{stage}"]
    for name, tensors in runs["train"][0][f"bf16-{stage}"]["masters_at_save"].items():
        for key, tensor in tensors.items():
            assert torch.equal(on_one["masters_at_resume"][name][key], tensor), f"on one rank: {name} {key}"
    torch.testing.assert_close(torch.tensor(on_one["losses"]), torch.tensor(uninterrupted), **BF16_LOSS_TOL)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_master_weights_checkpoint_holds_the_masters(runs, stage):
    # Each rank wrote its own rows of the masters; consolidated, they are the whole fp32 masters.
    path = runs["out"] / f"bf16-stage{stage}" / f"step={SAVE_AT}.ckpt"
    assert sorted(p.name for p in path.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    sizes = [p.stat().st_size for p in path.glob("*.distcp")]
    assert min(sizes) > 0.4 * sum(sizes), f"rank shards of {sizes} bytes: not split"
    checkpoint = load_checkpoint(path)
    for name, tensors in runs["train"][0][f"bf16-{stage}"]["masters_at_save"].items():
        assert torch.equal(checkpoint["state_dict"][name], tensors["master"]), name


def test_bf16_master_weights_export_the_masters(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    from lightning_llm.export import export_checkpoint

    export_checkpoint(runs["out"] / "bf16-stage3" / f"step={SAVE_AT}.ckpt", tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    exported = model.state_dict()
    masters = runs["train"][0]["bf16-3"]["masters_at_save"]
    for name, tensors in masters.items():
        assert torch.equal(exported[name.removeprefix("model.")], tensors["master"]), name
    # The masters hold what the bf16 weights lost: exporting them is not exporting the bf16 weights.
    master = masters["model.model.layers.0.mlp.up_proj.weight"]["master"]
    assert not torch.equal(master, master.bfloat16().float())

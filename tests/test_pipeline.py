"""PipelineStrategy (ParallelStrategy's one-dimension form) against single-process training (the oracle), on 2
and 4 gloo processes.

Process launches are slow, so one 2-process job runs every pipeline-only scenario in sequence
(gpipe with validation, 1f1b with a checkpoint and a resume, interleaved, the setup errors, a YAML
run through LightningCLI) and one 4-process job runs data x pipeline parallelism; the single-process
references run in the pytest process and the comparisons are made there.

Tolerances (tests/tolerances.py): fp32 on CPU, same initial weights and batches. Splitting a batch into
micro-batches (and stages, and pipelines) changes only the order of roundings. A loss is a mean over
BATCH x SEQ = 64 positive token losses, each from logits that are dot products over 64 hidden units:
reordering either sum moves the loss by at most reordered_sum_rtol(fp32, 64) = 7.5e-6 relative, so
LOSS_RTOL is twice that. Weights after AdamW steps: `assert_adam_steps_close` (Adam turns rounding noise
on near-zero gradient elements into up to whole steps).
"""

from __future__ import annotations

import itertools
import math
import os
import socket
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_llm.models import build_model
from lightning_llm.modules.pretrain import PretrainModule
from lightning_llm.strategies.parallel import ParallelStrategy, PipelineStrategy
from lightning_llm.strategies.pipeline import balanced_split, check_split, decoder_parts
from _precision_helpers import draw_residual_branches
from tolerances import UNIT_ROUNDOFF, adam_update_rtol, assert_adam_steps_close, loss_atol, reordered_sum_rtol

VOCAB, SEQ, BATCH = 128, 16, 4
LR = 1e-2
LOSS_RTOL = 2 * reordered_sum_rtol(torch.float32, BATCH * SEQ)


class Tokens(Dataset):
    """Random token blocks; `mask` of the targets set to -100 (ignored) at random. `packed`: each block
    holds two examples, with position ids restarting at a random point (as instruction packing does)."""

    def __init__(self, n: int, mask: float = 0.2, seed: int = 0, packed: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, VOCAB, (n, SEQ + 1), generator=g)
        self.ignored = torch.rand(n, SEQ, generator=g) < mask
        self.cuts = torch.randint(4, SEQ - 4, (n,), generator=g) if packed else None

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        targets = self.x[i, 1:].clone()
        targets[self.ignored[i]] = -100
        item = {"input_ids": self.x[i, :-1], "targets": targets}
        if self.cuts is not None:
            cut = int(self.cuts[i])
            item["position_ids"] = torch.cat([torch.arange(cut), torch.arange(SEQ - cut)])
        return item


class TokenData(pl.LightningDataModule):
    def __init__(self, n: int = 20, batch_size: int = BATCH, mask: float = 0.2, val: bool = False,
                 split_by_strategy: bool = False, packed: bool = False) -> None:
        super().__init__()
        self.n, self.batch_size, self.mask, self.val, self.packed = n, batch_size, mask, val, packed
        self.split_by_strategy = split_by_strategy

    def train_dataloader(self) -> DataLoader:
        data = Tokens(self.n, self.mask, packed=self.packed)
        if not self.split_by_strategy:
            return DataLoader(data, batch_size=self.batch_size)
        # Lightning's own DistributedSampler always shuffles training data; an unshuffled one split the
        # way the strategy says keeps the batches comparable with one process.
        sampler = DistributedSampler(data, shuffle=False, **self.trainer.strategy.distributed_sampler_kwargs)
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        # 9 samples: the last validation batch holds 1, fewer than the 2 micro-batches and 2 stages.
        return DataLoader(Tokens(9, self.mask, seed=1), batch_size=self.batch_size) if self.val else []


class TinyLM(PretrainModule):
    """PretrainModule on the tiny preset with fixed initial weights read from `init_path`."""

    def __init__(self, init_path: str, layers: int = 2, lr: float = LR) -> None:
        super().__init__("tiny", vocab_size=VOCAB, lr=lr, warmup_steps=0, max_steps=100)
        # Under LightningCLI, save_hyperparameters records this class's arguments, not the parent's.
        self.hparams.update(model="tiny", vocab_size=VOCAB, lr=lr, weight_decay=0.1, betas=(0.9, 0.95),
                            warmup_steps=0, min_lr_ratio=0.1, max_steps=100, attn_implementation=None,
                            activation_checkpointing=False)
        self.init_path, self.layers = init_path, layers

    def configure_model(self) -> None:
        if self.model is None:
            self.model = build_model("tiny", vocab_size=VOCAB, num_hidden_layers=self.layers)
            self.model.load_state_dict(torch.load(self.init_path))


class StepRecorder(pl.Callback):
    """What the optimizer steps, by parameter name (under master weights the fp32 masters, the parameters'
    stand-ins in the optimizer): `values[0]` at the start, then after each step its values and the
    (clipped) gradients it took, `grads[k]` for step k + 1."""

    def __init__(self, masters=None) -> None:
        self.masters = masters
        self.grads: list[dict[str, torch.Tensor]] = []
        self.values: list[dict[str, torch.Tensor]] = []

    def on_train_start(self, trainer, module) -> None:
        optimizer = trainer.optimizers[0]
        stepped = {id(w): m for w, m in self.masters.master_weights(optimizer)} if self.masters else {}
        named = {name: stepped.get(id(p), p) for name, p in module.named_parameters()}

        def record(*_) -> None:
            self.grads.append({n: whole(t.grad) for n, t in named.items() if t.grad is not None})
            self.values.append({n: whole(t) for n, t in named.items()})

        self.values.append({n: whole(t) for n, t in named.items()})
        optimizer.register_step_post_hook(record)


class ModuleMetrics(pl.Callback):
    """The module's own training metrics after each step, and the learning rate that step used."""

    NAMES = ("train/loss", "train/ppl", "train/lr", "train/tokens")

    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.lr = trainer.optimizers[0].param_groups[0]["lr"]

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k in self.NAMES}
        self.metrics.append({**logged, "lr_used": self.lr, "loss_returned": float(outputs["loss"])})


class LossRecorder(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def fit(module: TinyLM, data: TokenData, strategy="auto", devices: int = 1, max_steps: int = 10,
        callbacks: list | None = None, ckpt_path: str | None = None, plugins: list | None = None) -> list[float]:
    from lightning.pytorch.callbacks import ModelCheckpoint

    recorder = LossRecorder()
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=max_steps,
                         gradient_clip_val=0.5, use_distributed_sampler=devices == 1, logger=False,
                         enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks or []), enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, callbacks=[recorder, *(callbacks or [])],
                         plugins=plugins)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return recorder.losses


def validate(module: TinyLM, strategy="auto", devices: int = 1) -> list[tuple[int, float]]:
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, use_distributed_sampler=False,
                         logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, datamodule=TokenData(val=True))
    return module.val_history[-1:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker, world_size: int, tmp_path: Path) -> list[dict]:
    """Run `worker(rank, tmp_path)` on `world_size` gloo processes; return each rank's saved results."""
    mp.spawn(_entry, args=(worker, world_size, free_port(), str(tmp_path)), nprocs=world_size)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def _entry(rank: int, worker, world_size: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size),
                      NODE_RANK="0", LOCAL_RANK=str(rank), GLOBAL_RANK=str(rank))
    torch.set_num_threads(1)  # 2 cores: more threads than cores stall gloo's send/recv
    results = worker(rank, Path(tmp))
    torch.save(results, Path(tmp) / f"rank{rank}.pt")


def whole(t: torch.Tensor) -> torch.Tensor:
    """A copy of `t`, whole: a ZeRO shard (`DTensor`) is gathered over its stage's data-parallel ranks."""
    t = t.detach()
    return t.full_tensor().clone() if isinstance(t, DTensor) else t.clone()


def local_weights(module: TinyLM) -> dict[str, torch.Tensor]:
    """This rank's stages' weights, whole."""
    return {k: whole(v) for k, v in module.model.state_dict().items()}


def assert_same_weights(local: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], steps: int) -> None:
    """This rank's weights against one process's, after `steps` AdamW steps at (at most) LR."""
    assert local, "no weights on this rank"
    assert_adam_steps_close(local, {key: reference[key] for key in local}, lr_sum=steps * LR)


# -- in-process checks --------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(schedule="pipedream"), "schedule='pipedream' is not known"),
    (dict(stages=1), "stages=1"),
    (dict(microbatches=0), "microbatches=0"),
    (dict(schedule="1f1b", stages_per_rank=2), "stages_per_rank=2"),
    (dict(split_points=[3, 2]), "split_points"),
    (dict(stages=2, microbatches=1, schedule="1f1b"),
     r"microbatches=1 with schedule='1f1b' and stages=2: .* use microbatches >= 2 or schedule='gpipe'"),
    (dict(stages=2, microbatches=5, schedule="interleaved-1f1b"), "microbatches=5 .* use microbatches=4 or 6"),
    (dict(stages=4, microbatches=9, schedule="interleaved-zero-bubble"), "microbatches=9 .* use microbatches=8 or 10"),
])
def test_bad_arguments_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PipelineStrategy(**kwargs)


def test_pipeline_strategy_is_the_parallel_strategy_of_one_dimension():
    """PipelineStrategy(stages=p) builds ParallelStrategy(pipeline_parallel=p, data_parallel="auto", zero_stage=2,
    empty_init=False) with the pipeline's own arguments; the degree keeps its name in errors."""
    strategy = PipelineStrategy(stages=4, microbatches=8, schedule="interleaved-1f1b", split_points=[1, 2, 3, 4, 5, 6, 7])
    assert isinstance(strategy, ParallelStrategy)
    assert (strategy.pipeline_parallel, strategy.data_parallel, strategy.tensor_parallel, strategy.context_parallel,
            strategy.expert_parallel, strategy.stage, strategy.empty_init) == (4, "auto", 1, 1, 1, 2, False)
    assert (strategy.stages, strategy.microbatches, strategy.schedule) == (4, 8, "interleaved-1f1b")
    assert (strategy._pipeline.stages_per_rank, strategy._pipeline.split_points) == (2, [1, 2, 3, 4, 5, 6, 7])
    assert PipelineStrategy(zero_stage=3, empty_init=True).stage == 3
    with pytest.raises(ValueError, match=r"zero_stage must be one of \(1, 2, 3\), got 0"):
        PipelineStrategy(zero_stage=0)


def test_balanced_split_is_optimal():
    """Against brute force over every contiguous partition."""
    for costs, n_stages, extra in [([5, 1, 1, 1, 5, 2], 3, 0), ([3, 3, 3, 3], 2, 4), ([1, 9, 1, 1, 1], 2, 0),
                                   ([2] * 7, 4, 3)]:
        def worst(points):
            bounds = [0, *points, len(costs)]
            loads = [sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])]
            loads[-1] += extra
            return max(loads)
        best = min(worst(list(p)) for p in itertools.combinations(range(1, len(costs)), n_stages - 1))
        points = balanced_split(costs, n_stages, extra)
        assert len(points) == n_stages - 1 and worst(points) == best
    with pytest.raises(ValueError, match="cannot split 2 decoder layers into 3 stages"):
        balanced_split([1, 1], 3)


def test_unsplittable_models_are_refused():
    with pytest.raises(ValueError, match="not a Hugging Face model with a pipeline plan"):
        decoder_parts(torch.nn.Linear(2, 2))
    from transformers import Gemma2Config, Gemma2ForCausalLM  # soft-capped logits: more than the Llama layout

    gemma2 = Gemma2ForCausalLM(Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                            final_logit_softcapping=1.0))
    with pytest.raises(ValueError, match="does not reproduce its logits"):
        check_split(decoder_parts(gemma2), [[0], [1]])
    llama = draw_residual_branches(build_model("tiny", vocab_size=VOCAB, num_hidden_layers=3))  # layers that count
    check_split(decoder_parts(llama), [[0], [1, 2]])  # the supported layout passes


# -- the 2-process job --------------------------------------------------------------------------


def pipeline_scenarios(rank: int, tmp: Path) -> dict:
    out: dict = {}
    init2, init4 = str(tmp / "init2.pt"), str(tmp / "init4.pt")

    def pipe(schedule: str, microbatches: int = 2, **kwargs) -> PipelineStrategy:
        return PipelineStrategy(stages=2, microbatches=microbatches, schedule=schedule, **kwargs)

    pl.seed_everything(0)
    module = TinyLM(init2)
    metrics = ModuleMetrics()
    out["gpipe_losses"] = fit(module, TokenData(val=True), pipe("gpipe"), devices=2, callbacks=[metrics])
    out["gpipe_metrics"], out["gpipe_tokens_seen"] = metrics.metrics, module.tokens_seen
    out["gpipe_val"] = module.val_history
    out["gpipe_weights"] = local_weights(module)

    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=str(tmp / "ckpt"), filename="step5", every_n_train_steps=5)
    first = TinyLM(init2)
    out["1f1b_losses"] = fit(first, TokenData(val=True), pipe("1f1b"), devices=2, max_steps=5, callbacks=[ckpt])
    module = TinyLM(init2)
    out["1f1b_losses"] += fit(module, TokenData(val=True), pipe("1f1b"), devices=2, max_steps=10,
                              ckpt_path=str(tmp / "ckpt" / "step5.ckpt"))
    out["1f1b_weights"] = local_weights(module)
    out["1f1b_val"] = first.val_history + module.val_history  # (the step-5 checkpoint was written before its validation)

    module = TinyLM(init4, layers=4)
    out["interleaved_losses"] = fit(module, TokenData(), pipe("interleaved-1f1b"), devices=2, max_steps=4)
    out["interleaved_weights"] = local_weights(module)
    out["interleaved_val"] = validate(module, pipe("interleaved-1f1b"), devices=2)
    module = TinyLM(init4, layers=4)
    out["zero-bubble_losses"] = fit(module, TokenData(), pipe("interleaved-zero-bubble"), devices=2, max_steps=4)
    out["zero-bubble_weights"] = local_weights(module)

    from lightning_llm.precision import MixedPrecision

    class PlantOverflow(pl.Callback):
        """An inf in one gradient of the last stage only, at step 2: the first stage must skip it too."""

        def on_after_backward(self, trainer, module) -> None:
            if trainer.global_rank == 1 and trainer.global_step == 2:
                grad = next(p.grad for p in module.parameters() if p.grad is not None)
                (grad.to_local() if isinstance(grad, DTensor) else grad).view(-1)[0] = float("inf")

    class Track(pl.Callback):
        def __init__(self) -> None:
            self.scales: list[float] = []
            self.weights: list[dict[str, torch.Tensor]] = []
            self.lrs: list[float] = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            self.scales.append(trainer.precision_plugin.scaler.get_scale())
            self.weights.append(local_weights(module))
            self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    track = Track()
    module = TinyLM(init2)
    out["fp16_losses"] = fit(module, TokenData(), pipe("1f1b"), devices=2, max_steps=4, callbacks=[PlantOverflow(), track],
                             plugins=[MixedPrecision("fp16-mixed", init_scale=1024.0)])
    out["fp16_scales"], out["fp16_weights"], out["fp16_lrs"] = track.scales, track.weights, track.lrs

    from lightning_llm.precision import MasterWeightsPrecision

    module, masters = TinyLM(init2), MasterWeightsPrecision("bf16")
    steps = StepRecorder(masters)
    out["masters_losses"] = fit(module, TokenData(), pipe("1f1b"), devices=2, max_steps=4, plugins=[masters],
                                callbacks=[steps])
    out["masters_dtypes"] = {p.dtype for p in module.parameters()}
    out["masters_grads"], out["masters"] = steps.grads, steps.values

    for name, strategy, data in [
        ("too_many_stages", pipe("interleaved-1f1b", stages_per_rank=2), TokenData()),
        ("indivisible", pipe("1f1b", microbatches=3), TokenData()),
    ]:
        try:
            fit(TinyLM(init2), data, strategy, devices=2, max_steps=1)
        except ValueError as err:
            out[name] = str(err)

    from lightning.pytorch.cli import LightningCLI

    config = tmp / "pipeline.yaml"
    config.write_text(textwrap.dedent(f"""
        seed_everything: 0
        model:
          class_path: {__name__}.TinyLM
          init_args: {{init_path: {init2}}}
        data:
          class_path: {__name__}.TokenData
        trainer:
          accelerator: cpu
          devices: 2
          default_root_dir: {tmp}
          max_steps: 3
          gradient_clip_val: 0.5
          use_distributed_sampler: false
          logger: false
          enable_checkpointing: false
          enable_progress_bar: false
          strategy:
            class_path: lightning_llm.strategies.pipeline.PipelineStrategy
            init_args: {{stages: 2, microbatches: 4, schedule: 1f1b}}
          callbacks:
            - class_path: {__name__}.LossRecorder
    """))
    cli = LightningCLI(args=["fit", "--config", str(config)], save_config_callback=None)
    out["yaml_losses"] = next(c for c in cli.trainer.callbacks if isinstance(c, LossRecorder)).losses
    return out


@pytest.fixture(scope="module")
def two_stage_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    torch.manual_seed(0)
    torch.save(build_model("tiny", vocab_size=VOCAB).state_dict(), tmp / "init2.pt")
    torch.save(build_model("tiny", vocab_size=VOCAB, num_hidden_layers=4).state_dict(), tmp / "init4.pt")
    ref: dict = {}

    class KeepStep5(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            if trainer.global_step == 5:
                ref["weights5"] = local_weights(module)

    module = TinyLM(str(tmp / "init2.pt"))
    ref["losses"] = fit(module, TokenData(val=True), callbacks=[KeepStep5()])
    ref["val"], ref["weights"] = module.val_history, local_weights(module)
    from lightning_llm.precision import MasterWeightsPrecision

    masters = MasterWeightsPrecision("bf16")
    steps = StepRecorder(masters)
    ref["masters_losses"] = fit(TinyLM(str(tmp / "init2.pt")), TokenData(), max_steps=4, plugins=[masters],
                                callbacks=[steps])
    ref["masters_grads"], ref["masters"] = steps.grads, steps.values
    module = TinyLM(str(tmp / "init4.pt"), layers=4)
    ref["interleaved_losses"] = fit(module, TokenData(), max_steps=4)
    ref["interleaved_weights"] = local_weights(module)
    ref["interleaved_val"] = validate(module)
    return spawn(pipeline_scenarios, 2, tmp), ref, tmp


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved", "zero-bubble"])
def test_two_stages_match_one_process(two_stage_run, schedule):
    """10 optimizer steps (4 interleaved and zero bubble, 2 chunks per rank) on 2 stages = one process: losses and weights.
    For 1f1b the run is 5 steps, a checkpoint, a resume and 5 more: equal to the uninterrupted run."""
    ranks, ref, _ = two_stage_run
    key = "interleaved_" if schedule in ("interleaved", "zero-bubble") else ""
    for out in ranks:
        assert out[f"{schedule}_losses"] == pytest.approx(ref[f"{key}losses"], rel=LOSS_RTOL)
        assert_same_weights(out[f"{schedule}_weights"], ref[f"{key}weights"], steps=4 if key else 10)
    # Each stage holds its own layers only; the tied embedding sits on both ends.
    assert "lm_head.weight" not in ranks[0][f"{schedule}_weights"]
    assert "model.embed_tokens.weight" in ranks[1][f"{schedule}_weights"]


def test_the_module_logs_its_metrics_through_the_pipeline(two_stage_run):
    """The last stage computes the module's own loss; every rank logs the module's metrics of each step: the
    batch loss, its perplexity, the learning rate the step used and the tokens seen (every stage sees the
    whole batch of BATCH x SEQ tokens; one pipeline, one data-parallel replica)."""
    import math

    ranks, _, _ = two_stage_run
    for out in ranks:
        assert len(out["gpipe_metrics"]) == 10 and out["gpipe_tokens_seen"] == 10 * BATCH * SEQ
        for step, logged in enumerate(out["gpipe_metrics"]):
            assert logged.keys() == {*ModuleMetrics.NAMES, "lr_used", "loss_returned"}
            assert logged["train/loss"] == pytest.approx(logged["loss_returned"], rel=1e-6)
            assert logged["train/ppl"] == pytest.approx(math.exp(logged["train/loss"]), rel=1e-6)
            assert logged["train/lr"] == pytest.approx(logged["lr_used"], rel=1e-6)  # (logged as fp32)
            assert logged["train/tokens"] == (step + 1) * BATCH * SEQ


def test_fp16_overflow_on_one_stage_skips_the_step_on_both(two_stage_run):
    """An inf planted in the last stage's gradients at step 2: both stages skip (weights unchanged, the
    learning rate held), both halve the loss scale; the other steps track the fp32 run."""
    ranks, ref, _ = two_stage_run
    for out in ranks:
        assert out["fp16_scales"] == [1024.0, 1024.0, 512.0, 512.0]
        skipped_before, skipped_after = out["fp16_weights"][1], out["fp16_weights"][2]
        for key, value in skipped_after.items():
            assert torch.equal(value, skipped_before[key]), key
        assert not torch.equal(out["fp16_weights"][3][key], skipped_after[key])
        assert out["fp16_lrs"][2] == out["fp16_lrs"][1] != out["fp16_lrs"][3]
    assert ranks[0]["fp16_losses"] == ranks[1]["fp16_losses"]
    # Before the plant the fp16 run follows fp32 (same data and initial weights) to fp16's precision.
    assert ranks[0]["fp16_losses"][:3] == pytest.approx(ref["losses"][:3], abs=loss_atol(torch.float16))


TIED = "model.model.embed_tokens.weight"  # also the LM head's weight: on the first and the last stage
BF16_U = UNIT_ROUNDOFF[torch.bfloat16]


def test_master_weights_on_two_stages_track_one_process(two_stage_run):
    """MasterWeightsPrecision("bf16") on 2 stages: each stage keeps bf16 weights with an fp32 master for
    each of its own parameters; gradients, masters and losses follow the one-process master-weights run.

    In bf16 the micro-batch split changes roundings at u = 2^-8 (not fp32's 2^-24), and Adam turns that
    into whole steps on the elements whose gradient the noise can flip, so the bounds are these:
    - the first step's gradients (same weights, same batch) per tensor, in norm: each element is the bf16
      rounding of a sum of bf16 micro-batch gradients that a bf16 backward chain made; two orders differ
      by a few u of the terms (measured 0.9u, 1.8u between two CPU kernels of one process): 8u;
    - the masters after 4 steps, in norm over all elements, relative to the update:
      adam_update_rtol(bf16, 64 token terms) = 0.5 (measured 0.06, and 0.10 between two CPU kernels of
      one process: bf16 training is not reproducible to better);
    - the losses: loss_atol(bf16) = 32u (max|z| 8; measured 1.6e-3 = 0.4u with the earlier init).
    """
    ranks, ref, _ = two_stage_run
    for out in ranks:
        assert out["masters_dtypes"] == {torch.bfloat16}
        assert all(m.dtype == torch.float32 for m in out["masters"][-1].values())
        for name, grad in out["masters_grads"][0].items():
            expected = ref["masters_grads"][0][name]
            assert (grad - expected).norm() <= 8 * BF16_U * expected.norm(), name
        names = list(out["masters"][-1])
        diff = torch.cat([(out["masters"][-1][n] - ref["masters"][-1][n]).flatten() for n in names])
        moved = torch.cat([(ref["masters"][-1][n] - ref["masters"][0][n]).flatten() for n in names])
        assert diff.norm() <= adam_update_rtol(torch.bfloat16, BATCH * SEQ) * moved.norm()
        assert out["masters_losses"] == pytest.approx(ref["masters_losses"], abs=loss_atol(torch.bfloat16))
    # The tied embedding's two copies take identical steps; every other master lives on one stage only.
    assert torch.equal(ranks[0]["masters"][-1][TIED], ranks[1]["masters"][-1][TIED])
    assert ranks[0]["masters"][-1].keys() & ranks[1]["masters"][-1].keys() == {TIED}


def test_master_weights_clip_by_one_process_norm(two_stage_run):
    """Clipping at 0.5, below every step's gradient norm (about 2), under master weights: the gradients the
    two stages' optimizers step, with the tied embedding counted once, have one process's norm.

    Once clipped, that norm is the clip value whatever the bf16 noise in the gradients; the two runs
    differ only by the fp32 rounding of the norm computation, a sum of N positive squares:
    reordered_sum_rtol(fp32, N). Leaving out the tied copy by identity with its bf16 weight (which the
    optimizer no longer holds: it steps the fp32 master) counted it twice: 0.40 instead of 0.5."""
    ranks, ref, _ = two_stage_run

    def norm(grads) -> float:
        return float(torch.cat([g.flatten().double() for g in grads]).norm())

    for step, expected in enumerate(ref["masters_grads"]):
        first, last = (out["masters_grads"][step] for out in ranks)
        assert torch.equal(first[TIED], last[TIED])
        rtol = reordered_sum_rtol(torch.float32, sum(g.numel() for g in expected.values()))
        assert norm(expected.values()) == pytest.approx(0.5, rel=rtol)  # clipping was active
        pipeline = norm([*first.values(), *(g for name, g in last.items() if name != TIED)])
        assert pipeline == pytest.approx(norm(expected.values()), rel=rtol), step


def test_validation_runs_the_module_step_through_the_pipeline(two_stage_run):
    """The module's validation step through the pipeline gives one process's validation loss, for every
    schedule, also on a last batch of 1 sample: fewer than the micro-batches and the stages (which 1F1B
    cannot schedule: evaluation runs forward-only, with as many micro-batches as the batch allows)."""
    ranks, ref, _ = two_stage_run
    for out in ranks:
        for schedule in ("gpipe", "1f1b"):
            assert [s for s, _ in out[f"{schedule}_val"]] == [s for s, _ in ref["val"]] == [5, 10]
            assert [v for _, v in out[f"{schedule}_val"]] == pytest.approx([v for _, v in ref["val"]], rel=LOSS_RTOL)
        assert out["interleaved_val"][0][1] == pytest.approx(ref["interleaved_val"][0][1], rel=LOSS_RTOL)


def test_checkpoint_joins_into_a_transformers_export(two_stage_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from lightning_llm.export import load_checkpoint, model_from_checkpoint, save_pretrained_atomic

    _, ref, tmp = two_stage_run
    checkpoint = load_checkpoint(tmp / "ckpt" / "step5.ckpt")
    assert sorted(k.removeprefix("model.") for k in checkpoint["state_dict"]) == sorted(ref["weights5"])
    save_pretrained_atomic(model_from_checkpoint(checkpoint), tmp_path / "hf")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
    # The export holds the stages' step-5 weights bit for bit; those are one process's up to Adam's noise.
    joined = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
    assert all(torch.equal(exported[k], v) for k, v in joined.items())
    assert_adam_steps_close(joined, ref["weights5"], lr_sum=5 * LR)


def test_bad_setups_fail_at_setup_with_the_reason(two_stage_run):
    ranks, _, _ = two_stage_run
    for out in ranks:
        assert "4 pipeline stages" in out["too_many_stages"] and "only 2 decoder layers" in out["too_many_stages"]
        assert "cannot be split into microbatches=3" in out["indivisible"]


def test_yaml_config_through_lightning_cli(two_stage_run):
    ranks, ref, _ = two_stage_run
    for out in ranks:
        assert out["yaml_losses"] == pytest.approx(ref["losses"][:3], rel=LOSS_RTOL)


# -- the 4-process job: 2 pipelines x 2 stages --------------------------------------------------


def data_x_pipeline(rank: int, tmp: Path) -> dict:
    module = TinyLM(str(tmp / "init2.pt"))
    # Each pipeline (data-parallel rank) gets every other sample, in order.
    strategy = PipelineStrategy(stages=2, microbatches=2, schedule="1f1b")
    recorder = LossRecorder()
    trainer = pl.Trainer(accelerator="cpu", devices=4, strategy=strategy, max_steps=4, gradient_clip_val=0.5,
                         use_distributed_sampler=False, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder])
    trainer.fit(module, datamodule=TokenData(n=32, split_by_strategy=True, packed=True))
    from lightning_llm.strategies.zero import state_bytes

    held = {name: p.to_local().numel() for name, p in module.named_parameters()}
    return {"losses": recorder.losses, "weights": local_weights(module), "held": held,
            "optimizer_bytes": state_bytes(module, trainer.optimizers)["optimizer"]}


def test_data_parallel_pipelines_match_one_process(tmp_path):
    """dp=2 x pp=2: each pipeline trains on half of every global batch of 8, whose halves hold different
    numbers of target tokens (20% ignored at random); the averaged gradients and the logged loss equal
    one process's token mean over the whole batch. The blocks are packed (two examples each, position
    ids restarting), so the stages must carry the position ids to every layer as one process does."""
    torch.manual_seed(0)
    torch.save(build_model("tiny", vocab_size=VOCAB).state_dict(), tmp_path / "init2.pt")
    module = TinyLM(str(tmp_path / "init2.pt"))
    ref_losses = fit(module, TokenData(n=32, batch_size=2 * BATCH, packed=True), max_steps=4)
    ranks = spawn(data_x_pipeline, 4, tmp_path)
    for out in ranks:
        assert out["losses"] == pytest.approx(ref_losses, rel=LOSS_RTOL)
    for out in ranks:
        assert_same_weights(out["weights"], local_weights(module), steps=4)
    # ZeRO-2 on each stage over its two pipelines: each rank holds half the rows (dim 0) of its stage's
    # parameters, and AdamW's two moments for those rows only.
    for out in ranks:
        whole = {name: w.shape for name, w in out["weights"].items()}
        for name, numel in out["held"].items():
            rows, *rest = whole[name.removeprefix("model.")]
            assert numel == (rows // 2) * math.prod(rest), name
        assert out["optimizer_bytes"] == 2 * 4 * sum(out["held"].values()) + 4 * len(out["held"])  # + fp32 step counts

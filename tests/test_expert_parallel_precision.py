"""Expert parallelism under the precision plugins: dp2 x ep2 against one process under the same plugin.

One 2-rank gloo job trains tiny-moe at dp2 x ep2 (ParallelStrategy(expert_parallel=2), ZeRO-3 on the rest)
under MixedPrecision("bf16-mixed") and under MixedPrecision("fp16-mixed") (dynamic loss scaling), with an
inf planted in one expert gradient of rank 1 only at one step: both ranks must skip that step and back
off the scale together. The oracle is the same module, plugin and planted overflow in one process on the
global batches, from the weights the distributed run started with.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp

from _precision_helpers import free_port
from lightning_llm.precision import MixedPrecision
from lightning_llm.strategies.parallel import ParallelStrategy
from test_expert_parallel import RANKS, ROWS, SEQ, VOCAB, global_batches, halves
from tolerances import adam_update_rtol, loss_atol

STEPS, PLANTED = 4, 1  # the fp16 runs find an inf at step 1 (on one rank of the ep2 run)
HP = dict(lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), warmup_steps=2, min_lr_ratio=0.1, max_steps=STEPS,
          router_aux_loss_coef=0.0, router_z_loss_coef=0.05)  # a token mean only: see test_expert_parallel.HP
CLIP = 0.2  # below every step's gradient norm: the norm of the unscaled gradients decides every step
PRECISIONS = ("bf16-mixed", "fp16-mixed")


def _plugin(precision: str) -> MixedPrecision:
    # 1024: a scale that no gradient of this model overflows, so the one skip is the planted one
    return MixedPrecision(precision, device="cpu", init_scale=1024.0)


class Record(L.Callback):
    """Losses, loss scales and weights; plants an inf in an expert's gradient at step PLANTED on `plant_rank`."""

    def __init__(self, init: dict[str, torch.Tensor] | None = None, plant_rank: int | None = None) -> None:
        self.init, self.plant_rank = init, plant_rank
        self.out: dict = {"losses": [], "scales": []}

    def on_train_start(self, trainer, pl_module):
        from test_zero import full_weights

        if self.init is not None:  # the one-process oracle starts from the distributed run's weights
            pl_module.model.load_state_dict(self.init)
        self.out["init"] = full_weights(pl_module.model)

    def on_after_backward(self, trainer, pl_module):
        from torch.distributed.tensor import DTensor

        if trainer.global_step != PLANTED or trainer.global_rank != self.plant_rank:
            return
        grad = pl_module.model.model.layers[1].mlp.experts.down_proj.grad
        (grad.to_local() if isinstance(grad, DTensor) else grad).view(-1)[0] = float("inf")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.out["losses"].append(outputs["loss"].item())
        scaler = trainer.precision_plugin.scaler
        self.out["scales"].append(None if scaler is None else scaler.get_scale())

    def on_train_end(self, trainer, pl_module):
        from test_zero import full_weights

        self.out["final"] = full_weights(pl_module.model)
        self.out["skipped"] = trainer.precision_plugin.skipped_steps


def _fit(precision: str, world: int, rank: int, init: dict | None = None) -> dict:
    from lightning_llm.modules.pretrain import PretrainModule

    torch.manual_seed(10 * rank)
    fp16 = precision == "fp16-mixed"
    record = Record(init, plant_rank=(1 if world > 1 else 0) if fp16 else None)
    batches = global_batches() if world == 1 else [halves(b)[rank] for b in global_batches()]
    strategy = ParallelStrategy(expert_parallel=world) if world > 1 else "auto"
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy=strategy, plugins=[_plugin(precision)],
                        max_steps=STEPS, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, gradient_clip_val=CLIP,
                        callbacks=[record])
    module = PretrainModule("tiny-moe", vocab_size=VOCAB, **HP)
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    return record.out


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    torch.save({p: _fit(p, world, rank) for p in PRECISIONS}, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep_precision")
    mp.spawn(_worker, args=(RANKS, free_port(), str(out)), nprocs=RANKS, join=True)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(RANKS)]
    torch.set_num_threads(1)
    return ranks, {p: _fit(p, 1, 0, init=ranks[0][p]["init"]) for p in PRECISIONS}


@pytest.mark.slow  # the fixture: two plugins in two processes and one, about 100 s on 2 cores
@pytest.mark.parametrize("precision", PRECISIONS)
def test_ep2_under_mixed_precision_equals_one_process(runs, precision):
    """Losses (the mean of the ranks') within loss_atol of the dtype: the two runs compute the same roundings
    of the same products, except that sums run in another order (each rank's token share, the experts' rows
    arriving from two ranks, ZeRO's reduction), which moves a logit by at most its dtype's rounding. Weights
    after the steps: relative to the update, adam_update_rtol of the dtype over the global batch's tokens
    (the gradients carry the dtype's rounding noise, which Adam turns into whole steps where it flips a
    small gradient's sign)."""
    ranks, one = runs
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    ep2, expected = [r[precision] for r in ranks], one[precision]
    losses = [sum(values) / RANKS for values in zip(*(r["losses"] for r in ep2))]
    assert losses == pytest.approx(expected["losses"], rel=0, abs=loss_atol(dtype))
    init, final = expected["init"], ep2[0]["final"]  # (the whole model, gathered on rank 0)
    assert final.keys() == expected["final"].keys()
    names = list(final)
    diff = torch.cat([(final[n] - expected["final"][n]).flatten() for n in names])
    moved = torch.cat([(expected["final"][n] - init[n]).flatten() for n in names])
    assert moved.norm() > 0
    assert diff.norm() <= adam_update_rtol(dtype, ROWS * SEQ) * moved.norm()


@pytest.mark.slow
def test_fp16_overflow_in_one_ranks_expert_makes_every_rank_skip(runs):
    """The inf is in rank 1's shard of an expert (a `DTensor` that ZeRO does not reduce): rank 0 must see the
    overflow too, skip the same step and back off the scale, as the one process does."""
    ranks, one = runs
    expected = one["fp16-mixed"]
    assert expected["skipped"] == 1 and expected["scales"] == [1024.0, 512.0, 512.0, 512.0]
    for rank in ranks:
        assert rank["fp16-mixed"]["skipped"] == 1
        assert rank["fp16-mixed"]["scales"] == expected["scales"]

"""ParallelStrategy under the precision plugins: tensor parallelism (and dp2 x tp2) against one process
under the same plugin.

One 2-rank job trains tp2 (sequence parallelism, ZeRO-3 over a data dimension of 1) three times: under
`MixedPrecision("fp16-mixed")` with an inf planted in rank 1's own gradient shard at one step, under
`MixedPrecision("bf16-mixed")`, and under `MasterWeightsPrecision("bf16")`. The oracle is the same module
and plugin on one process (Lightning's single-device strategy) started from the weights the 2-rank run
recorded, over the same global batches, with the same inf planted in its (whole) gradient.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from _precision_helpers import free_port
from test_parallel import HP, ROWS, SEQ, STEPS, VOCAB, _loader, _recorder, _trainer
from test_zero import PLANTED, PlantInf, assert_one_step_skipped_on_every_rank
from tolerances import adam_update_rtol, loss_atol

PLUGINS = ("fp16", "bf16", "master")


def _plugin(name: str):
    from lightning_llm.precision import MasterWeightsPrecision, MixedPrecision

    if name == "fp16":  # a small initial scale: no overflow of its own in the first steps, only the planted one
        return MixedPrecision("fp16-mixed", device="cpu", init_scale=1024.0, growth_interval=100)
    if name == "bf16":
        return MixedPrecision("bf16-mixed", device="cpu")
    return MasterWeightsPrecision("bf16")


def _module(init: dict[str, torch.Tensor] | None = None):
    """The tiny PretrainModule; with `init`, its model starts from those weights (the one-process oracle)."""
    from lightning_llm.modules.pretrain import PretrainModule

    class StartsFrom(PretrainModule):
        def build_hf_model(self, **load_kwargs):
            model = super().build_hf_model(**load_kwargs)
            if init is not None:
                model.load_state_dict(init)
            return model

    return StartsFrom("tiny", vocab_size=VOCAB, **HP)


def _fit(world: int, rank: int, name: str, strategy, init: dict | None = None) -> dict:
    """Train under plugin `name`; rank `world - 1` gets an inf in its own gradient shard at step PLANTED (fp16)."""
    record: dict = {}
    plugin = _plugin(name)
    plant = PlantInf(PLANTED if name == "fp16" and rank == world - 1 else None)
    trainer = _trainer(world, strategy, [_recorder(record), plant], plugins=[plugin])
    tp = getattr(strategy, "tensor_parallel", 1)
    trainer.fit(_module(init), _loader(rank // tp, world // tp))
    record.update(plant.snapshots)
    if name == "fp16":
        record.update(skipped_steps=plugin.skipped_steps, scale=plugin.scaler.get_scale())
    return record


def _worker(rank: int, world: int, port: int, out: str, tp: int, names: tuple[str, ...]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    from lightning_llm.strategies.parallel import ParallelStrategy

    results = {}
    for name in names:
        torch.manual_seed(10 * rank)  # ranks draw different numbers: the model must not depend on it
        results[name] = _fit(world, rank, name, ParallelStrategy(tensor_parallel=tp))
    torch.save(results, Path(out) / f"rank{rank}.pt")


def _spawn(world: int, out: Path, tp: int, names: tuple[str, ...]) -> list[dict]:
    mp.spawn(_worker, args=(world, free_port(), str(out), tp, names), nprocs=world, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


# Both runs round their forward and backward to the plugin's dtype; they differ in the order of the sums that
# tensor parallelism splits (each rank's partial dot products, reduced across ranks). Each is within its dtype's
# rounding of the exact value, so the losses are within loss_atol(dtype) (1.6e-2 fp16, 0.125 bf16) of each
# other. Weights: Adam divides each gradient element by its own magnitude, so elements whose gradient is near
# zero may step either way; the whole update is compared (adam_update_rtol: 0.18 fp16, 0.5 bf16).
DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16, "master": torch.bfloat16}


def _update_error(init: dict, final: dict, expected: dict) -> float:
    """|final - expected| / |expected - init| over all weights (L2 norms, fp32)."""
    error = sum(((final[k].float() - v.float()) ** 2).sum() for k, v in expected.items()) ** 0.5
    update = sum(((v.float() - init[k].float()) ** 2).sum() for k, v in expected.items()) ** 0.5
    return (error / update).item()


def _assert_equals_one_process(records: list[dict], name: str) -> None:
    """Every rank of the parallel run trained as one process under the same plugin from the same weights."""
    init = records[0]["init"]
    one = _fit(1, 0, name, "auto", init)
    dtype = DTYPE[name]
    assert all(w.dtype == (torch.bfloat16 if name == "master" else torch.float32) for w in init.values())
    # Each rank logs its data-parallel group's loss over an equal share of tokens: the global loss is their mean.
    losses = [sum(values) / len(values) for values in zip(*(r["losses"] for r in records))]
    assert len(losses) == STEPS
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(one["losses"]), rtol=0, atol=loss_atol(dtype))
    error = _update_error(init, records[0]["final"], one["final"])
    assert error < adam_update_rtol(dtype, ROWS * SEQ), f"{name}: update off the one-process one by {error:.4f}"
    if name == "fp16":  # the planted inf, on one rank only, skipped the step on every rank, as on one process
        assert one["skipped_steps"] == 1 and one["scale"] == 512.0
        assert_one_step_skipped_on_every_rank(records)


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    return _spawn(2, tmp_path_factory.mktemp("tp2-precision"), 2, PLUGINS)


@pytest.mark.slow
@pytest.mark.parametrize("name", PLUGINS)
def test_tp2_under_each_precision_plugin_equals_one_process(tp2, name):
    _assert_equals_one_process([rank[name] for rank in tp2], name)


@pytest.mark.slow
def test_dp2_x_tp2_fp16_skips_on_every_rank_and_equals_one_process(tmp_path):
    """dp2 x tp2: the inf sits in rank 3's shard only (one of the four cells of the mesh)."""
    _assert_equals_one_process([rank["fp16"] for rank in _spawn(4, tmp_path, 2, ("fp16",))], "fp16")

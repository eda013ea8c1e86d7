"""The precision plugins under DDP with 2 gloo processes: an overflow on one rank only makes both
ranks skip; master weights stay identical across ranks."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _precision_helpers import PlantOverflow, TinyLM, free_port, loader, pattern_batches
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import DDPStrategy

from lightning_llm.precision import DynamicLossScaler, MasterWeightsPrecision, MixedPrecision

PLANTED_STEP = 2


def _fit(plugin, steps, callbacks=()) -> tuple[TinyLM, Trainer]:
    module = TinyLM(warmup=10)
    trainer = Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend="gloo"),
                      plugins=[plugin], max_steps=steps, callbacks=list(callbacks), logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader(pattern_batches(steps, seed=trainer.global_rank)))
    return module, trainer


def _scalers_disagree_without_the_all_reduce(rank: int) -> dict[str, bool]:
    """torch's GradScaler vs DynamicLossScaler when only rank 1's gradient holds an inf."""
    verdicts = {}
    for name, scaler_class in (("torch", torch.amp.GradScaler), ("ours", DynamicLossScaler)):
        param = torch.nn.Parameter(torch.ones(3))
        param.grad = torch.tensor([1.0, float("inf") if rank == 1 else 2.0, 3.0])
        optimizer = torch.optim.SGD([param], lr=0.1)
        scaler = scaler_class("cpu")
        scaler.scale(torch.ones(()))  # initializes the scale on this device
        scaler.unscale_(optimizer)
        verdicts[name] = any(flag.item() for flag in scaler._found_inf_per_device(optimizer).values())
    return verdicts


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    results = {}

    plant = PlantOverflow({PLANTED_STEP} if rank == 1 else set())
    plugin = MixedPrecision("fp16-mixed", device="cpu", init_scale=1024.0, growth_interval=100)
    module, trainer = _fit(plugin, 4, [plant])
    results["fp16"] = dict(
        skipped_steps=plugin.skipped_steps, scale=plugin.scaler.get_scale(),
        unchanged=all(torch.equal(plant.before[PLANTED_STEP]["weights"][k], v)
                      for k, v in plant.after[PLANTED_STEP]["weights"].items()),
        lr_held=plant.after[PLANTED_STEP]["lr"] == plant.before[PLANTED_STEP]["lr"],
        weights=module.state_dict(),
        verdicts=_scalers_disagree_without_the_all_reduce(rank),
    )

    module, trainer = _fit(MasterWeightsPrecision(), 2)
    results["master"] = dict(weights=module.state_dict(),
                             masters=[p.detach() for g in trainer.optimizers[0].param_groups for p in g["params"]])
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    if dist.is_initialized():
        dist.destroy_process_group()


def test_ddp_overflow_on_one_rank_makes_both_skip_and_master_weights_agree(tmp_path):
    mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    for result in ranks:
        fp16 = result["fp16"]
        assert fp16["skipped_steps"] == 1 and fp16["scale"] == 512.0
        assert fp16["unchanged"] and fp16["lr_held"]
        # torch's own scaler would have let rank 0 step while rank 1 skipped.
        assert fp16["verdicts"] == {"torch": result is ranks[1], "ours": True}
    for key, value in ranks[0]["fp16"]["weights"].items():
        assert torch.equal(value, ranks[1]["fp16"]["weights"][key]), key
    for key, value in ranks[0]["master"]["weights"].items():
        assert value.dtype == torch.bfloat16 and torch.equal(value, ranks[1]["master"]["weights"][key]), key
    for a, b in zip(ranks[0]["master"]["masters"], ranks[1]["master"]["masters"], strict=True):
        assert a.dtype == torch.float32 and torch.equal(a, b)

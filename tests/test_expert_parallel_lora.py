"""LoRA on a mixture-of-experts model: under expert parallelism against one process, and adapters on the experts.

`LoRACallback(experts=False)` (the default) adapts the linear layers (attention, the router) and leaves the
experts frozen; under dp2 x ep2 the frozen experts stay sharded over the ranks and the adapters train as on
one process over the global batch. `LoRACallback(experts=True)` also puts one low-rank update per expert on
the fused expert weights (peft's `target_parameters`); it trains and merges on one process, and is refused
under expert parallelism.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp

from _precision_helpers import free_port
from lightning_llm.callbacks.lora import LoRACallback, export_lora_checkpoint, gathered_adapter_state
from lightning_llm.strategies.parallel import ParallelStrategy
from test_expert_parallel import RANKS, VOCAB, global_batches, halves
from tolerances import assert_adam_steps_close, reordered_sum_rtol

STEPS = 3
HP = dict(lr=1e-2, weight_decay=0.0, warmup_steps=1, max_steps=STEPS, router_aux_loss_coef=0.0,
          router_z_loss_coef=0.05)  # a token mean only: see test_expert_parallel.HP


class Record(L.Callback):
    def __init__(self) -> None:
        self.out: dict = {"losses": []}

    def on_train_start(self, trainer, pl_module):
        from torch.distributed.tensor import DTensor

        experts = [p for n, p in pl_module.model.named_parameters() if ".experts." in n and "lora_" not in n]
        self.out["experts"] = [(type(p).__name__, p.requires_grad,
                                tuple((p.to_local() if isinstance(p, DTensor) else p).shape)) for p in experts]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.out["losses"].append(outputs["loss"].item())

    def on_train_end(self, trainer, pl_module):
        self.out["adapter"] = {k: v.detach().clone() for k, v in gathered_adapter_state(pl_module.model).items()}


def _fit(world: int, rank: int, root: Path, experts: bool = False) -> dict:
    from lightning_llm.modules.pretrain import PretrainModule

    torch.manual_seed(0)  # the same base on every rank (LoRA loads or builds it whole: empty_init=False)
    record = Record()
    batches = global_batches() if world == 1 else [halves(b)[rank] for b in global_batches()]
    strategy = ParallelStrategy(expert_parallel=world, empty_init=False) if world > 1 else "auto"
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_steps=STEPS, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, default_root_dir=root,
                        callbacks=[record, LoRACallback(r=4, dropout=0.0, experts=experts)])
    trainer.fit(PretrainModule("tiny-moe", vocab_size=VOCAB, **HP), torch.utils.data.DataLoader(batches, batch_size=None))
    return record.out


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    record = _fit(world, rank, Path(out) / "frozen")
    try:
        _fit(world, rank, Path(out) / "experts", experts=True)
    except NotImplementedError as err:
        record["refused"] = str(err)
    torch.save(record, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep_lora")
    mp.spawn(_worker, args=(RANKS, free_port(), str(out)), nprocs=RANKS, join=True)
    torch.set_num_threads(1)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(RANKS)], _fit(1, 0, out / "one")


@pytest.mark.slow  # the fixture: two fits in two processes and one, about 3 minutes on 2 cores
def test_lora_under_ep2_trains_the_adapters_as_one_process(runs):
    """The frozen experts stay sharded (each rank holds 2 of the 4, no gradient); the losses (the mean of the
    ranks') and the adapters after 3 steps equal one process on the global batches. fp32: the sums are reordered
    (test_expert_parallel.LOSS_TOL's argument: the log-sum-exp over the vocabulary, on both sides)."""
    ranks, one = runs
    for rank in ranks:
        assert rank["experts"] == [("DTensor", False, (2, 192, 64)), ("DTensor", False, (2, 64, 96))] * 2
    assert {e[0] for e in one["experts"]} == {"Parameter"}
    losses = [sum(values) / RANKS for values in zip(*(r["losses"] for r in ranks))]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(one["losses"]),
                               rtol=2 * reordered_sum_rtol(torch.float32, VOCAB), atol=0)
    adapter = ranks[0]["adapter"]
    assert adapter.keys() == one["adapter"].keys() and any(".lora_B." in k for k in adapter)
    assert not any(".experts." in k for k in adapter)
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if ".lora_B." in k)  # every adapter stepped
    for rank in ranks[1:]:
        assert all(torch.equal(rank["adapter"][k], v) for k, v in adapter.items())
    assert_adam_steps_close(adapter, one["adapter"], lr_sum=STEPS * HP["lr"])


@pytest.mark.slow
def test_adapters_on_the_experts_are_refused_under_expert_parallelism(runs):
    ranks, _ = runs
    for rank in ranks:
        assert "LoRACallback(experts=True) under expert_parallel=2" in rank["refused"]
        assert "use experts=False" in rank["refused"]


def test_adapters_on_the_experts_train_and_merge(tmp_path):
    """One process, experts=True on another shape (6 experts, odd widths): every expert's two matrices get an
    adapter that trains, the checkpoint rebuilds it, and the merged export computes what the adapted model does
    (to fp32 rounding, measured by the export itself) with changed expert weights."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from transformers import AutoModelForCausalLM

    from lightning_llm.models import build_model
    from lightning_llm.modules.pretrain import PretrainModule

    torch.manual_seed(0)
    base = build_model("tiny-moe", vocab_size=96, num_experts=6, hidden_size=40, moe_intermediate_size=24,
                       num_attention_heads=4, num_key_value_heads=2)
    base.save_pretrained(tmp_path / "base")
    data = [{"input_ids": t[:, :-1], "targets": t[:, 1:]}
            for t in torch.randint(0, 96, (3, 2, 13), generator=torch.Generator().manual_seed(1))]
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[LoRACallback(r=2, dropout=0.0, experts=True),
                                   ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])
    module = PretrainModule(str(tmp_path / "base"), lr=1e-2, warmup_steps=1, max_steps=3)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=None))
    trained = {n: p for n, p in module.model.named_parameters() if p.requires_grad}
    on_experts = [n for n in trained if ".experts." in n]
    assert len(on_experts) == 2 * 2 * 2  # 2 layers x (gate_up_proj, down_proj) x (A, B)
    assert all(p.abs().sum() > 0 for n, p in trained.items() if ".lora_B." in n)
    out, error = export_lora_checkpoint(tmp_path / "ckpt" / "last.ckpt", tmp_path / "merged", merge=True)
    assert error is not None and error < 1e-4
    merged = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"):
        assert merged[name].shape == base.state_dict()[name].shape
        assert not torch.equal(merged[name], base.state_dict()[name]), name


@pytest.mark.parametrize("kwargs, match", [
    (dict(experts=True, dropout=0.05), r"experts=True with dropout=0.05: .* set dropout=0.0"),
    (dict(experts="yes"), r"experts must be True or False, got 'yes'"),
])
def test_the_experts_option_is_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRACallback(**kwargs)


def test_experts_on_a_dense_model_is_refused():
    from lightning_llm.models import build_model

    callback = LoRACallback(dropout=0.0, experts=True)
    with pytest.raises(ValueError, match=r"experts=True adapts the experts .* LlamaForCausalLM has none"):
        callback.transform_model(build_model("tiny", vocab_size=64), L.LightningModule())

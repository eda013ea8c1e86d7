"""Checkpoints resharded between expert-parallel degrees: ep1 -> ep2 -> ep4, and their exports.

One run of 9 steps on tiny-moe (4 experts) changes degree twice: a 1-process job (ParallelStrategy on one
rank: every expert on it) trains 9 steps, checkpointing every 3; a 2-process job (dp2 x ep2: 2 experts a rank)
resumes its step-3 checkpoint and trains to step 9, checkpointing every 3; a 4-process job (dp4 x ep4: one
expert a rank) resumes the ep2 step-6 checkpoint and trains to step 9. Each rank takes its share of the same
global batches. Oracles: the resumed run starts from exactly the weights that the checkpoint exports on one
process, and its losses and final export follow those of the run it resumed (the lower degree's).
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp

from _precision_helpers import free_port
from lightning_llm.strategies.parallel import ParallelStrategy
from test_expert_parallel import CLIP, LOSS_TOL, ROWS, VOCAB, _recorder, global_batches
from tolerances import assert_adam_steps_close

STEPS, EVERY = 9, 3
HP = dict(lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), warmup_steps=2, min_lr_ratio=0.1, max_steps=STEPS,
          router_aux_loss_coef=0.0, router_z_loss_coef=0.05)  # a token mean only: see test_expert_parallel.HP
# degree, the checkpoint resumed, the step it starts at
JOBS = {"ep1": (1, None, 0), "ep2": (2, "ep1/step=3.ckpt", 3), "ep4": (4, "ep2/step=6.ckpt", 6)}


def _fit(job: str, rank: int, out: Path) -> dict:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_llm.modules.pretrain import PretrainModule

    world, ckpt, _ = JOBS[job]
    record: dict = {}
    torch.manual_seed(10 * rank)
    rows = ROWS // world  # each rank's share of every global batch
    batches = [{k: v[rank * rows:(rank + 1) * rows] for k, v in b.items()} for b in global_batches()]
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy=ParallelStrategy(expert_parallel=world),
                        max_steps=STEPS, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, gradient_clip_val=CLIP,
                        callbacks=[_recorder(record), ModelCheckpoint(dirpath=out / job, filename="{step}",
                                                                      every_n_train_steps=EVERY, save_top_k=-1)])
    trainer.fit(PretrainModule("tiny-moe", vocab_size=VOCAB, **HP), torch.utils.data.DataLoader(batches, batch_size=None),
                ckpt_path=None if ckpt is None else str(out / ckpt))
    return record


def _worker(rank: int, job: str, port: int, out: str) -> None:
    world = JOBS[job][0]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    torch.save(_fit(job, rank, Path(out)), Path(out) / f"{job}-rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep_reshard")
    records = {}
    for job, (world, _, _) in JOBS.items():
        mp.spawn(_worker, args=(job, free_port(), str(out)), nprocs=world, join=True)
        ranks = [torch.load(out / f"{job}-rank{r}.pt", weights_only=False) for r in range(world)]
        records[job] = dict(ranks[0], losses=[sum(v) / world for v in zip(*(r["losses"] for r in ranks))])
    return records, out


def _export(checkpoint: Path, out: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    from lightning_llm.export import export_checkpoint

    return AutoModelForCausalLM.from_pretrained(export_checkpoint(checkpoint, out)).state_dict()


@pytest.mark.slow  # three jobs (1, 2 and 4 processes), a few minutes on 2 cores
@pytest.mark.parametrize("job, resumed, at", [("ep2", "ep1", 3), ("ep4", "ep2", 6)])
def test_a_checkpoint_resumes_at_another_expert_parallel_degree(runs, tmp_path, job, resumed, at):
    records, out = runs
    # the weights the resumed run starts from are the checkpoint's, as one process exports them: every expert
    # joined from the ranks that wrote it, cut again over the ranks that read it
    exported = _export(out / resumed / f"step={at}.ckpt", tmp_path / "start")
    start = records[job]["init"]
    assert start.keys() <= exported.keys() and any(".experts." in k for k in start)
    assert all(torch.equal(start[k], exported[k]) for k in start)
    # then the same steps as the uninterrupted run at the lower degree (sums reordered: LOSS_TOL's argument)
    torch.testing.assert_close(torch.tensor(records[job]["losses"]), torch.tensor(records[resumed]["losses"][at - JOBS[resumed][2]:]),
                               **LOSS_TOL)
    # and the final exports agree as Adam steps from gradients that differ by rounding
    final = _export(out / job / f"step={STEPS}.ckpt", tmp_path / "final")
    assert all(torch.equal(final[k], v) for k, v in records[job]["final"].items())
    assert_adam_steps_close(final, _export(out / resumed / f"step={STEPS}.ckpt", tmp_path / "lower"),
                            lr_sum=STEPS * HP["lr"])

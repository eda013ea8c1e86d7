"""Fault injection: a process SIGKILLed at a write of a checkpoint save, then the run resumed.

A sharded save (ZeRO stages 1, 2, 3 and a 2-stage pipeline, 2 gloo processes) is killed at chosen
writes: a rank's shard file opened or fsync'd, `.metadata`, `meta.pt`, the fsync of the whole
directory, the rename of the old checkpoint aside, the rename of the new one in, the deletion of the
old one. The kill is made by a test-only wrapper in the process: it watches the file operations of
the save (open for writing, fsync, rename/replace, rmtree) and SIGKILLs its own process at the chosen
one. After each kill `last.ckpt` must load and hold exactly the weights of the previous (or, once the
new one is complete, the new) checkpoint of an uninterrupted run, and the next life of the run
resumes from it, with the losses of the uninterrupted run; that life is itself killed at the next
write kind, and a last life trains to the end. So each configuration is one chain of process
launches (launches are the slow part) that covers its kill points and checks every resume.
"""

from __future__ import annotations

import builtins
import io
import json
import multiprocessing
import os
import re
import shutil
import signal
from pathlib import Path
from typing import NamedTuple

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp
from _precision_helpers import free_port

from lightning_llm.checkpoint import load_checkpoint, open_sharded, resolve

VOCAB, ROWS, SEQ = 256, 4, 16
EVERY = 2  # a checkpoint every 2 optimizer steps (one epoch): saves at the epoch's end
STEPS = 6
HP = dict(lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), warmup_steps=2, min_lr_ratio=0.1, max_steps=STEPS)


class Kill(NamedTuple):
    """Where to kill: `rank`'s `occurrence`-th file operation `op` on a file whose name matches
    `pattern`; `exchange=False` takes the path of filesystems that cannot swap two directories."""

    rank: int
    op: str
    pattern: str
    occurrence: int = 1
    exchange: bool = True


SHARD = r"^__\d+_\d+\.distcp$"
KILLS = {  # together: every kind of write of a sharded save, on both ranks
    "zero1": [Kill(1, "open", SHARD), Kill(0, "rename", r"^\.meta\.pt\.tmp-"),
              Kill(0, "rename", r"^\.last\.ckpt\.tmp-", exchange=False)],  # between old aside and new in
    "zero2": [Kill(1, "fsync", SHARD), Kill(0, "rename", r"^\.metadata\.tmp$"),
              Kill(0, "rename", r"^last\.ckpt$", exchange=False),  # the old one aside
              Kill(0, "rmtree", r"^\.last\.ckpt\.old-", exchange=False)],
    "zero3": [Kill(0, "open", SHARD), Kill(0, "open", r"^\.meta\.pt\.tmp-"), Kill(0, "exchange", r"^last\.ckpt$"),
              Kill(0, "rmtree", r"^\.last\.ckpt\.tmp-")],  # the old one, after the swap
    "pipeline": [Kill(1, "open", SHARD), Kill(0, "open", r"^\.metadata\.tmp$"),
                 Kill(0, "fsync", r"^__0_0\.distcp$", occurrence=2)],  # the fsync of the whole directory
}


def batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (EVERY, ROWS, SEQ + 1), generator=g)
    return [{"input_ids": t[:, :-1], "targets": t[:, 1:]} for t in tokens]


def loader(config: str, rank: int) -> torch.utils.data.DataLoader:
    # ZeRO: each rank its half of the rows; pipeline: both stages see the whole batch.
    rows = slice(None) if config == "pipeline" else slice(rank * ROWS // 2, (rank + 1) * ROWS // 2)
    return torch.utils.data.DataLoader([{k: v[rows] for k, v in b.items()} for b in batches()], batch_size=None)


def strategy(config: str):
    from lightning_llm.strategies.pipeline import PipelineStrategy
    from lightning_llm.strategies.zero import ZeROStrategy

    if config == "pipeline":
        return PipelineStrategy(stages=2, microbatches=2)
    return ZeROStrategy(stage=int(config[-1]))


# -- the test-only fault injector, installed in the process that is to be killed --------------------


class KillAt:
    """SIGKILL this process where `kill` says, counting only while `armed`."""

    def __init__(self, kill: Kill) -> None:
        import lightning_llm.checkpoint

        self.op, self.pattern, self.left = kill.op, re.compile(kill.pattern), kill.occurrence
        self.armed = False
        exchange = lightning_llm.checkpoint._exchange if kill.exchange else lambda a, b: False
        lightning_llm.checkpoint._exchange = self._watch("exchange", exchange, lambda a, b: b)
        io.open = builtins.open = self._watch("open", io.open, _written_file)
        os.fsync = self._watch("fsync", os.fsync, lambda fd: os.readlink(f"/proc/self/fd/{fd}"))
        os.rename = self._watch("rename", os.rename, lambda src, dst: src)
        os.replace = self._watch("rename", os.replace, lambda src, dst: src)
        shutil.rmtree = self._watch("rmtree", shutil.rmtree, lambda path, *args, **kwargs: path)

    def _watch(self, op: str, real, name_of):
        def watched(*args, **kwargs):
            if self.armed and op == self.op:
                name = name_of(*args, **kwargs)
                if name is not None and self.pattern.search(Path(name).name):
                    self.left -= 1
                    if self.left == 0:
                        os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        return watched


def _written_file(file, mode: str = "r", *args, **kwargs):
    """The path that `open(file, mode)` writes, or None (a read, or an already open descriptor)."""
    return file if isinstance(file, (str, os.PathLike)) and set(mode) & set("wxa") else None


class ArmAtSave(L.Callback):
    """Arms the injector for the first checkpoint this life writes after its first optimizer step
    (a fresh run: its second checkpoint, so that there is one to lose)."""

    def __init__(self, injector: KillAt, after_step: int) -> None:
        self.injector, self.after_step = injector, after_step

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.injector.armed = trainer.global_step > self.after_step


class LossLog(L.Callback):
    """Rank 0 appends (step, loss) of every batch to a file, which survives the SIGKILL."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps([trainer.global_step, float(outputs["loss"])]) + "\n")


def _life(rank: int, world: int, port: int, out: str, config: str, kill: Kill | None, reference: bool) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_llm.modules.pretrain import PretrainModule

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    out = Path(out)
    ckpt_dir = out / ("reference" if reference else "ckpt")
    try:
        resume = None if reference else str(resolve(ckpt_dir / "last.ckpt"))
    except FileNotFoundError:
        resume = None
    callbacks = [LossLog(out / ("reference.jsonl" if reference else "losses.jsonl")),
                 ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", every_n_train_steps=EVERY, save_last=True,
                                 save_top_k=-1 if reference else 0)]
    if kill is not None and kill.rank == rank:
        resumed_step = open_sharded(resume)[1]["global_step"] if resume else EVERY
        callbacks.append(ArmAtSave(KillAt(kill), resumed_step))
    torch.manual_seed(0)
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy=strategy(config), max_steps=STEPS, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        gradient_clip_val=1.0, callbacks=callbacks)
    trainer.fit(PretrainModule("tiny", vocab_size=VOCAB, **HP), loader(config, rank), ckpt_path=resume)


def _launch(out: Path, config: str, kill: Kill | None = None, reference: bool = False) -> None:
    # Forked from a server that imported the libraries once: a fresh import costs seconds per process,
    # and a chain launches many. (The server has run no torch op, so forking it is safe.)
    multiprocessing.set_forkserver_preload(["lightning", "transformers", "lightning_llm.modules.pretrain",
                                            "lightning_llm.strategies.zero", "lightning_llm.strategies.pipeline"])
    mp.start_processes(_life, args=(2, free_port(), str(out), config, kill, reference), nprocs=2, join=True,
                       start_method="forkserver")


def _losses(path: Path) -> list[tuple[int, float]]:
    return [tuple(line) for line in map(json.loads, path.read_text().splitlines())]


def _weights(path: Path) -> tuple[int, dict[str, torch.Tensor]]:
    checkpoint = load_checkpoint(path)
    return checkpoint["global_step"], checkpoint["state_dict"]


@pytest.mark.parametrize("config", list(KILLS))
def test_a_sharded_save_killed_at_each_write_loses_nothing(config, tmp_path):
    _launch(tmp_path, config, reference=True)
    expected = dict(_losses(tmp_path / "reference.jsonl"))
    assert sorted(expected) == list(range(1, STEPS + 1))
    saved = {step: _weights(tmp_path / "reference" / f"step={step}.ckpt")[1] for step in range(EVERY, STEPS + 1, EVERY)}

    for kill in KILLS[config]:
        with pytest.raises(mp.ProcessExitedException) as killed:
            _launch(tmp_path, config, kill)
        assert killed.value.error_index == kill.rank and killed.value.signal_name == "SIGKILL", (kill, killed.value)
        step, weights = _weights(tmp_path / "ckpt" / "last.ckpt")
        assert step in saved, (kill, step)
        for name, tensor in saved[step].items():
            assert torch.equal(weights[name], tensor), (kill, step, name)
    _launch(tmp_path, config)

    # Every life resumed where `last.ckpt` stood and had the uninterrupted run's loss at each step (bit
    # for bit: the same batches, the same reduction order, restored weights and optimizer state).
    losses = _losses(tmp_path / "losses.jsonl")
    assert {step for step, _ in losses} == set(expected)
    for step, loss in losses:
        assert loss == expected[step], (step, loss, expected[step])
    assert not [p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith(".")]

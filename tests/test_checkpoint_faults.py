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
import tempfile
from pathlib import Path
from typing import NamedTuple

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp
from _precision_helpers import free_port

from lightning_llm.checkpoint import load_checkpoint, resolve

VOCAB, ROWS, SEQ = 256, 4, 16
EVERY = 2  # a checkpoint every 2 optimizer steps (one epoch): saves at the epoch's end
STEPS = 6
HP = dict(lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), warmup_steps=2, min_lr_ratio=0.1, max_steps=STEPS)


class Kill(NamedTuple):
    """Where to kill: `rank`'s `occurrence`-th file operation `op` on a file whose name matches
    `pattern` (`{pid}`: the killed process's id, i.e. its own temporaries); `exchange=False` takes the
    path of filesystems that cannot swap two directories; `new`: the kill comes after the new version
    is complete and committed, so it is the one to find."""

    rank: int
    op: str
    pattern: str
    occurrence: int = 1
    exchange: bool = True
    new: bool = False


SHARD = r"^__\d+_\d+\.distcp$"
KILLS = {  # together: every kind of write of a sharded save, on both ranks
    "zero1": [Kill(1, "open", SHARD), Kill(0, "rename", r"^\.meta\.pt\.tmp-"),
              Kill(0, "rename", r"^\.last\.ckpt\.tmp-", exchange=False, new=True)],  # between old aside and new in
    "zero2": [Kill(1, "fsync", SHARD), Kill(0, "rename", r"^\.metadata\.tmp$"),
              Kill(0, "rename", r"^last\.ckpt$", exchange=False),  # the old one aside
              Kill(0, "rmtree", r"^\.last\.ckpt\.old-{pid}-", exchange=False, new=True)],
    "zero3": [Kill(0, "open", r"^\.meta\.pt\.tmp-"), Kill(0, "exchange", r"^last\.ckpt$"),
              Kill(0, "rmtree", r"^\.last\.ckpt\.tmp-{pid}-", new=True)],  # the old one, after the swap
    "pipeline": [Kill(1, "open", SHARD), Kill(0, "open", r"^\.metadata\.tmp$"),
                 Kill(0, "fsync", r"^__0_0\.distcp$", occurrence=2)],  # the fsync of the whole directory
    # One process, Lightning's strategy, $TMPDIR on another filesystem: the file opened for writing,
    # the rename into place (Lightning's own CheckpointIO copies into `last.ckpt` here).
    "single": [Kill(0, "open", r"last\.ckpt"), Kill(0, "rename", r"last\.ckpt")],
}
TMPDIR = "/dev/shm"  # a tmpfs: another filesystem than the tests' temporary folders, where Linux has it


def batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (EVERY, ROWS, SEQ + 1), generator=g)
    return [{"input_ids": t[:, :-1], "targets": t[:, 1:]} for t in tokens]


def loader(config: str, rank: int) -> torch.utils.data.DataLoader:
    # ZeRO: each rank its half of the rows; pipeline: both stages see the whole batch.
    rows = slice(rank * ROWS // 2, (rank + 1) * ROWS // 2) if config.startswith("zero") else slice(None)
    return torch.utils.data.DataLoader([{k: v[rows] for k, v in b.items()} for b in batches()], batch_size=None)


def strategy(config: str):
    from lightning_llm.strategies.parallel import PipelineStrategy
    from lightning_llm.strategies.zero import ZeROStrategy

    if config == "single":
        return "auto"
    if config == "pipeline":
        return PipelineStrategy(stages=2, microbatches=2)
    return ZeROStrategy(stage=int(config[-1]))


# -- the test-only fault injector, installed in the process that is to be killed --------------------


class KillAt:
    """SIGKILL this process where `kill` says, counting only while `armed`: right after a file is
    opened for writing, right before any other operation."""

    def __init__(self, kill: Kill) -> None:
        import lightning_llm.checkpoint

        self.op, self.pattern, self.left = kill.op, re.compile(kill.pattern.replace("{pid}", str(os.getpid()))), kill.occurrence
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
            if not (self.armed and op == self.op):
                return real(*args, **kwargs)
            name = name_of(*args, **kwargs)
            hit = name is not None and self.pattern.search(Path(name).name) and self._count()
            if hit and op != "open":
                os.kill(os.getpid(), signal.SIGKILL)  # before the rename, fsync, deletion
            result = real(*args, **kwargs)
            if hit:
                os.kill(os.getpid(), signal.SIGKILL)  # a file just opened for writing: created or truncated, empty
            return result

        return watched

    def _count(self) -> bool:
        self.left -= 1
        return self.left == 0


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

    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                          LOCAL_RANK=str(rank), NODE_RANK="0")
    os.environ["TMPDIR"] = tempfile.tempdir = TMPDIR  # another filesystem than the checkpoints'
    torch.set_num_threads(1)
    out = Path(out)
    ckpt_dir = out / ("reference" if reference else "ckpt")
    # Resume from the name, also where a kill between two renames left it missing (the readers find
    # the complete new version beside it).
    resume = str(ckpt_dir / "last.ckpt") if not reference and _readable(ckpt_dir / "last.ckpt") else None
    callbacks = [LossLog(out / ("reference.jsonl" if reference else "losses.jsonl")),
                 ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", every_n_train_steps=EVERY, save_last=True,
                                 save_top_k=-1 if reference else 0)]
    if kill is not None and kill.rank == rank:
        resumed_step = load_checkpoint(resume)["global_step"] if resume else EVERY
        callbacks.append(ArmAtSave(KillAt(kill), resumed_step))
    torch.manual_seed(0)
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy=strategy(config), max_steps=STEPS, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        gradient_clip_val=1.0, callbacks=callbacks)
    trainer.fit(PretrainModule("tiny", vocab_size=VOCAB, **HP), loader(config, rank), ckpt_path=resume)


def _start(fn, args: tuple, nprocs: int) -> None:
    # Forked from a server that imported the libraries once: a fresh import costs seconds per process,
    # and a chain launches many. (The server has run no torch op, so forking it is safe.)
    multiprocessing.set_forkserver_preload(["lightning", "transformers", "lightning_llm.modules.pretrain",
                                            "lightning_llm.strategies.zero", "lightning_llm.strategies.parallel",
                                            "lightning_llm.cli", "lightning_llm.export"])
    mp.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method="forkserver")


def _readable(path: Path) -> bool:
    try:
        resolve(path)
    except FileNotFoundError:
        return False
    return True


def _launch(out: Path, config: str, kill: Kill | None = None, reference: bool = False) -> None:
    world = 1 if config == "single" else 2
    _start(_life, (world, free_port(), str(out), config, kill, reference), world)


def _losses(path: Path) -> list[tuple[int, float]]:
    return [tuple(line) for line in map(json.loads, path.read_text().splitlines())]


def _weights(path: Path) -> tuple[int, dict[str, torch.Tensor]]:
    checkpoint = load_checkpoint(path)
    return checkpoint["global_step"], checkpoint["state_dict"]


def _other_filesystem(path: Path) -> bool:
    return os.path.isdir(TMPDIR) and os.stat(TMPDIR).st_dev != os.stat(path).st_dev


@pytest.mark.parametrize("config", list(KILLS))
def test_a_save_killed_at_each_write_loses_nothing(config, tmp_path):
    if config == "single" and not _other_filesystem(tmp_path):
        pytest.skip(f"{TMPDIR} is not another filesystem than {tmp_path} here")
    _launch(tmp_path, config, reference=True)
    expected = dict(_losses(tmp_path / "reference.jsonl"))
    assert sorted(expected) == list(range(1, STEPS + 1))
    saved = {step: _weights(tmp_path / "reference" / f"step={step}.ckpt")[1] for step in range(EVERY, STEPS + 1, EVERY)}

    step = EVERY  # the first life is killed in its second save, the later ones in their first
    for kill in KILLS[config]:
        with pytest.raises(mp.ProcessExitedException) as killed:
            _launch(tmp_path, config, kill)
        assert killed.value.error_index == kill.rank and killed.value.signal_name == "SIGKILL", (kill, killed.value)
        before = step
        step, weights = _weights(tmp_path / "ckpt" / "last.ckpt")
        assert step == before + (EVERY if kill.new else 0), (kill, before, step)
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


# -- export --overwrite ------------------------------------------------------------------------------

BETWEEN_RENAMES = Kill(0, "rename", r"^\.hf\.tmp-", exchange=False, new=True)  # old aside, new not yet in
EXPORT_KILLS = [  # the new export written and fsync'd; swapped in and the old one deleted; or, where the
    # filesystem cannot swap, between the old one set aside and the new one renamed in
    Kill(0, "open", r"^config\.json$"), Kill(0, "fsync", r"^model\.safetensors$"),
    Kill(0, "exchange", r"^hf$"), Kill(0, "rmtree", r"^\.hf\.tmp-{pid}-", new=True), BETWEEN_RENAMES,
]


def _export_life(rank: int, checkpoint: str, out: str, kill: Kill | None) -> None:
    from lightning_llm.cli import main

    if kill is not None:
        KillAt(kill).armed = True
    main(["export", "--checkpoint", checkpoint, "--out", out, "--overwrite"])


def _write_checkpoint(path: Path, tokenizer, seed: int) -> dict[str, torch.Tensor]:
    """A PretrainModule checkpoint as its hooks write it; returns the model's weights."""
    from lightning_llm.modules.pretrain import PretrainModule

    torch.manual_seed(seed)
    module = PretrainModule("tiny", vocab_size=len(tokenizer))
    module.configure_model()
    module.tokenizer = tokenizer
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return {k: v.clone() for k, v in module.model.state_dict().items()}


def test_export_overwrite_killed_at_each_step_leaves_a_whole_export(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_llm.cli import main

    old = _write_checkpoint(tmp_path / "old.ckpt", tokenizer, seed=1)
    new = _write_checkpoint(tmp_path / "new.ckpt", tokenizer, seed=2)
    out = tmp_path / "hf"
    main(["export", "--checkpoint", str(tmp_path / "old.ckpt"), "--out", str(out)])

    def whole_export(after: Kill | None) -> str:
        """Which of the two exports is at `out` after the kill `after`, checked whole (read beside `out`
        only where the kill came between the renames of a filesystem that cannot swap)."""
        path = resolve(out)
        assert path == out or after == BETWEEN_RENAMES, (after, path)
        weights = AutoModelForCausalLM.from_pretrained(path).state_dict()
        assert AutoTokenizer.from_pretrained(path).get_vocab() == tokenizer.get_vocab()
        which = [name for name, ref in (("old", old), ("new", new)) if all(torch.equal(weights[k], ref[k]) for k in ref)]
        assert len(which) == 1, (after, path)
        return which[0]

    for kill in EXPORT_KILLS:
        with pytest.raises(mp.ProcessExitedException) as killed:
            _start(_export_life, (str(tmp_path / "new.ckpt"), str(out), kill), 1)
        assert killed.value.signal_name == "SIGKILL", (kill, killed.value)
        # Before the new export is complete and committed the old one is there, after it the new one.
        assert whole_export(kill) == ("new" if kill.new else "old"), kill
        if kill.new:  # start the next kill from the old export again
            main(["export", "--checkpoint", str(tmp_path / "old.ckpt"), "--out", str(out), "--overwrite"])
    main(["export", "--checkpoint", str(tmp_path / "new.ckpt"), "--out", str(out), "--overwrite"])
    assert whole_export(None) == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "new.ckpt", "old.ckpt"]

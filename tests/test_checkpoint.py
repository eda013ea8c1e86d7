"""The checkpoint format: what the readers refuse, what a save cleans up, which CheckpointIO a run uses."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import lightning as L
import pytest
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from lightning_llm import checkpoint
from lightning_llm.checkpoint import (
    DCP_METADATA,
    SHARDED_METADATA,
    AtomicCheckpointIO,
    atomic_directory,
    load_checkpoint,
    recover,
    resolve,
    save_file,
    save_sharded,
    use_atomic_checkpoint_io,
)


class OneProcess:
    """What `save_sharded` needs of a strategy, for one process."""

    is_global_zero = True

    def broadcast(self, obj, src: int = 0):
        return obj

    def barrier(self, name: str | None = None) -> None:
        pass

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        return decision


def write_sharded(path, step: int, value: float) -> torch.Tensor:
    weight = torch.full((4, 3), value)
    save_sharded(OneProcess(), {"state_dict": {"model.w": weight.clone()}, "optimizer_states": [], "global_step": step}, path)
    return weight


def dead_pid() -> int:
    """The id of a process that has ended (and been reaped)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


@pytest.fixture
def info_lines(caplog):
    caplog.set_level(logging.INFO)
    return caplog


def test_a_sharded_checkpoint_reads_back(tmp_path):
    weight = write_sharded(tmp_path / "last.ckpt", 2, 1.5)
    checkpoint = load_checkpoint(tmp_path / "last.ckpt")
    assert checkpoint["global_step"] == 2 and torch.equal(checkpoint["state_dict"]["model.w"], weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary left


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / SHARDED_METADATA).unlink(), "incomplete: it has no meta.pt, the record written last"),
    (lambda p: (p / DCP_METADATA).unlink(), r"incomplete: \.metadata is missing"),
    (lambda p: (p / "__0_0.distcp").unlink(), r"files of its step-2 shard set, 1 missing \(__0_0.distcp\)"),
    (lambda p: (p / "__0_0.distcp").write_bytes((p / "__0_0.distcp").read_bytes()[:-8]),
     r"shard set, 1 of another size than recorded \(__0_0.distcp\)"),
])
def test_an_incomplete_sharded_checkpoint_is_refused_naming_the_path_and_what_is_missing(tmp_path, damage, message):
    write_sharded(tmp_path / "last.ckpt", 2, 1.5)
    damage(tmp_path / "last.ckpt")
    with pytest.raises(ValueError, match=message) as err:
        load_checkpoint(tmp_path / "last.ckpt")
    assert str(tmp_path / "last.ckpt") in str(err.value)


def test_shards_of_another_save_are_refused(tmp_path):
    # The mix an in-place rewrite left behind: the tensors index of one save, the record of another.
    write_sharded(tmp_path / "a", 2, 1.0)
    write_sharded(tmp_path / "b", 4, 2.0)
    (tmp_path / "a" / DCP_METADATA).write_bytes((tmp_path / "b" / DCP_METADATA).read_bytes())
    with pytest.raises(ValueError, match=r"inconsistent: its \.metadata is not the one of the step-2 save"):
        load_checkpoint(tmp_path / "a")


def test_a_damaged_checkpoint_file_is_refused_naming_the_path(tmp_path):
    save_file({"state_dict": {"w": torch.ones(100)}}, tmp_path / "x.ckpt")
    data = (tmp_path / "x.ckpt").read_bytes()
    (tmp_path / "x.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot be read") as err:
        load_checkpoint(tmp_path / "x.ckpt")
    assert str(tmp_path / "x.ckpt") in str(err.value)


def test_a_save_removes_what_killed_saves_left_and_says_so(tmp_path, info_lines):
    pid = dead_pid()
    (tmp_path / f".last.ckpt.tmp-{pid}-abcdef").mkdir()
    (tmp_path / f".step=4.ckpt.tmp-{pid}-012345").write_bytes(b"half")
    (tmp_path / ".notes.tmp-1-abcdef").write_text("not ours: the name does not end like a temporary")
    write_sharded(tmp_path / "last.ckpt", 2, 1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.tmp-1-abcdef", "last.ckpt"]
    removed = [r.getMessage() for r in info_lines.records if "left by a killed save" in r.getMessage()]
    assert len(removed) == 2 and all(str(tmp_path) in line for line in removed)


def test_a_temporary_written_on_another_host_is_left_alone_and_named(tmp_path, info_lines, monkeypatch):
    # On a folder shared by several nodes a process id is only meaningful on its own host: node B's writer
    # may be alive though no process here has its id. Its temporary is kept; this host's dead one goes.
    pid = dead_pid()
    last = tmp_path / "last.ckpt"
    monkeypatch.setattr(checkpoint, "_HOST", "node-b")
    monkeypatch.setattr(os, "getpid", lambda: pid)
    foreign = checkpoint._sibling(last, "tmp", checkpoint._new_token())
    monkeypatch.undo()
    monkeypatch.setattr(os, "getpid", lambda: pid)
    own = checkpoint._sibling(last, "tmp", checkpoint._new_token())
    monkeypatch.undo()
    foreign.write_bytes(b"being written on node-b")
    own.write_bytes(b"left by a killed save here")
    write_sharded(last, 2, 1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([foreign.name, "last.ckpt"])
    lines = [r.getMessage() for r in info_lines.records]
    assert any(str(foreign) in line and "'node-b'" in line for line in lines)
    assert any(str(own) in line and "left by a killed save" in line for line in lines)


def test_a_directory_killed_between_its_renames_is_read_and_then_put_in_place(tmp_path, info_lines):
    # The state after "old one aside" and before "new one in" (filesystems that cannot swap).
    pid = dead_pid()
    old = write_sharded(tmp_path / "old", 2, 1.0)
    new = write_sharded(tmp_path / "new", 4, 2.0)
    (tmp_path / "old").rename(tmp_path / f".last.ckpt.old-{pid}-abcdef")
    (tmp_path / "new").rename(tmp_path / f".last.ckpt.tmp-{pid}-abcdef")
    assert resolve(tmp_path / "last.ckpt").name == f".last.ckpt.tmp-{pid}-abcdef"
    assert torch.equal(load_checkpoint(tmp_path / "last.ckpt")["state_dict"]["model.w"], new)
    recover(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert torch.equal(load_checkpoint(tmp_path / "last.ckpt")["state_dict"]["model.w"], new)
    assert not torch.equal(new, old)
    assert any("complete new version is now in place" in r.getMessage() for r in info_lines.records)


def test_an_export_refused_or_failed_leaves_the_old_one(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("old")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        with atomic_directory(tmp_path / "hf") as tmp:
            (tmp / "config.json").write_text("new")
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "hf", overwrite=True) as tmp:
            (tmp / "config.json").write_text("new")
            raise RuntimeError("the writer failed")
    assert (tmp_path / "hf" / "config.json").read_text() == "old"
    with atomic_directory(tmp_path / "hf", overwrite=True) as tmp:
        (tmp / "config.json").write_text("new")
    assert (tmp_path / "hf" / "config.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_overwrite_replaces_an_earlier_export_but_never_a_run_folder_or_other_files(tmp_path):
    # An earlier export, and an adapter export in peft's layout (a named adapter in its own folder): replaced.
    for name, files in (("hf", ["config.json", "model.safetensors"]), ("adapter", ["tokenizer.json", "mine/adapter_config.json"])):
        for file in files:
            (tmp_path / name / file).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name / file).write_text("old")
        with atomic_directory(tmp_path / name, overwrite=True) as tmp:
            (tmp / "config.json").write_text("new")
        assert [p.name for p in (tmp_path / name).iterdir()] == ["config.json"], name
    # A run's folder (its checkpoints, logs and export), a folder of other files, a file: refused, left as they were.
    run = tmp_path / "run"
    for file in ("checkpoints/last.ckpt", "lightning_logs/version_0/metrics.csv", "hf/config.json"):
        (run / file).parent.mkdir(parents=True, exist_ok=True)
        (run / file).write_text("kept")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("kept")
    (tmp_path / "weights.bin").write_text("kept")
    for out, reason in ((run, "holds checkpoints or run logs"), (run / "checkpoints", "holds checkpoints"),
                        (tmp_path / "notes", "holds no config.json, adapter_config.json or"), (tmp_path / "weights.bin", "is a file")):
        with pytest.raises(FileExistsError, match=f"{out.name}'.*overwrite replaces an earlier export.*{reason}"):
            with atomic_directory(out, overwrite=True) as tmp:
                (tmp / "config.json").write_text("new")
    for file in ("run/checkpoints/last.ckpt", "run/lightning_logs/version_0/metrics.csv", "run/hf/config.json",
                 "notes/todo.txt", "weights.bin"):
        assert (tmp_path / file).read_text() == "kept", file
    assert not [p.name for p in tmp_path.rglob(".*")]  # no temporary left beside them


def test_runs_write_through_atomic_checkpoint_io_unless_the_user_chose_one(tmp_path):
    from lightning_llm.modules.pretrain import PretrainModule

    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    tokens = torch.randint(0, 64, (2, 9))
    batches = [{"input_ids": tokens[:, :-1], "targets": tokens[:, 1:]}]
    trainer.fit(PretrainModule("tiny", vocab_size=64), torch.utils.data.DataLoader(batches, batch_size=None))
    assert type(trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    mine = TorchCheckpointIO()
    trainer = L.Trainer(accelerator="cpu", plugins=[mine], logger=False)
    use_atomic_checkpoint_io(trainer)
    assert trainer.strategy.checkpoint_io is mine


def test_a_flattened_optimizer_layout_is_refused_with_the_way_out(tmp_path):
    # PipelineStrategy's checkpoints before it became ParallelStrategy's one-dimension form kept torch's
    # flattened per-parameter optimizer state; ZeRO's layout keeps the param groups as a list.
    weight = torch.ones(4, 3)
    state = {"model.w": {"exp_avg": torch.zeros(4, 3), "step": torch.tensor(1.0)}}
    old = {"state": state, "param_groups": {"model.w": {"lr": 0.1, "betas": (0.9, 0.95)}}}
    new = {"state": state, "param_groups": [{"lr": 0.1, "betas": (0.9, 0.95), "params": ["model.w"]}]}
    for name, optimizer in (("old.ckpt", old), ("new.ckpt", new)):
        save_sharded(OneProcess(), {"state_dict": {"model.w": weight.clone()}, "optimizer_states": [optimizer],
                                    "global_step": 1}, tmp_path / name)
    checkpoint.check_optimizer_layout(tmp_path / "new.ckpt")
    with pytest.raises(ValueError, match="flattened per-parameter layout") as err:
        checkpoint.check_optimizer_layout(tmp_path / "old.ckpt")
    assert "optimizer_0.param_groups.model.w." in str(err.value) and "lightning-llm export" in str(err.value)

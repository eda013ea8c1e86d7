"""The one home of the checkpoint format: its names, its atomic writers and its checked readers.

What a run writes:
- a checkpoint file: Lightning's checkpoint dict, `torch.save`d (Lightning's own strategies, through
  `AtomicCheckpointIO`);
- a sharded checkpoint directory (`ZeROStrategy`, `PipelineStrategy`): the `torch.distributed.checkpoint`
  files (`__<rank>_<n>.distcp` shards and `.metadata`, the index of every tensor's bytes) plus
  `meta.pt`, the rest of Lightning's dict with the shard record (the step, the save id of `.metadata`,
  every file and its size). `meta.pt` is written last, after every rank has written its shards;
- an export or an adapter directory (`export.py`, `callbacks/lora.py`, through `atomic_directory`).

No write is in place. A file is written to a temporary sibling in its own folder (never `$TMPDIR`:
on another filesystem the final move would be a copy), flushed, fsync'd and renamed over the name. A
directory is written into a temporary sibling, fsync'd, and swapped with the old one in one step
(Linux's `renameat2(RENAME_EXCHANGE)`); then the old one is deleted. Where the filesystem cannot swap
(NFS, other systems) it takes two renames: the old one aside, the new one in. A kill between them
leaves the name missing with the complete new directory beside it; readers then read that one, and
the next save (or export) of the name renames it in. Temporaries left by a killed process are removed
at the next save into their folder on the same host, with a line saying so. (torchtitan trusts only checkpoint folders
whose metadata is complete; `torch.distributed.checkpoint` writes its `.metadata` last, by a rename.)

Lightning's strategies write files through their CheckpointIO: `PretrainModule.setup` (so every module
of the project) gives the strategy an `AtomicCheckpointIO` where it would use Lightning's default
one, and says so in a log line; a CheckpointIO the user passed is kept.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

SHARDED_METADATA = "meta.pt"  # a sharded checkpoint's non-tensor part and shard record, written last
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index of the tensors (`_metadata_fn`)
SHARD_RECORD = "lightning_llm_shards"  # the entry of `meta.pt` that records the step and the shard set

# Temporaries beside a name: `.<name>.<kind>-<pid>-<random>@<host>`. `tmp`: being written (complete once an
# `old` of the same token exists); `old`: the previous version, set aside; `del`: being deleted. The host
# is there because a process id means something only on its own machine: on a folder that several nodes
# share, a node must not take another node's live writer for dead. (Names without it, from earlier
# versions, are judged as this host's.)
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old|del)-"
                        r"(?P<token>(?P<pid>\d+)-[0-9a-f]{6}(?:@(?P<host>[A-Za-z0-9._-]+))?)$")
_HOST = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "localhost"


def _sibling(path: Path, kind: str, token: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{token}"


def _new_token() -> str:
    return f"{os.getpid()}-{secrets.token_hex(3)}@{_HOST}"


def fsync_directory(path: Path) -> None:
    """Make a rename or a new entry in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (writers such as `save_pretrained` do not)."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_directory(Path(folder))


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(folder: str | os.PathLike) -> None:
    """Finish or undo what killed writers left in `folder`: a complete new directory whose name is
    missing (killed between its two renames) is renamed in; every other temporary of a process that
    no longer runs is deleted. Each action is logged. A temporary written on another host is left
    alone (whether its writer runs cannot be seen from here), with a line naming it."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    groups: dict[tuple[str, str], dict[str, Path]] = {}
    for entry in folder.iterdir():
        match = _TEMPORARY.match(entry.name)
        if match and match["host"] not in (None, _HOST):
            rank_zero_info(f"left {entry} alone: a save by host {match['host']!r} (process {match['pid']}), which this "
                           f"host ({_HOST!r}) cannot check; delete it if no run on that host is writing it")
        elif match and not _alive(int(match["pid"])):
            groups.setdefault((match["name"], match["token"]), {})[match["kind"]] = entry
    for (name, _), kinds in sorted(groups.items()):
        target = folder / name
        if not target.exists() and "old" in kinds and "tmp" in kinds:
            os.rename(kinds.pop("tmp"), target)
            fsync_directory(folder)
            rank_zero_info(f"{target}: a save was killed between its renames; its complete new version is now in place")
        elif not target.exists() and "old" in kinds:
            os.rename(kinds.pop("old"), target)
            fsync_directory(folder)
            rank_zero_info(f"{target}: a save was killed between its renames; its previous version is back in place")
        for leftover in kinds.values():
            _delete(leftover)
            rank_zero_info(f"removed {leftover}, left by a killed save")


def resolve(path: str | os.PathLike) -> Path:
    """The path to read for the checkpoint or export `path`: itself, or, where a save was killed
    between its two renames, the complete new version beside it (read in place, nothing is moved)."""
    path = Path(path)
    if path.exists():
        return path
    if path.parent.is_dir():
        matches = [_TEMPORARY.match(entry.name) for entry in path.parent.iterdir()]
        olds = sorted(m["token"] for m in matches if m and m["kind"] == "old" and m["name"] == path.name)
        for token in olds:
            new = _sibling(path, "tmp", token)
            if new.exists():
                rank_zero_warn(f"{str(path)!r} is missing: a save was killed between its renames; reading its "
                               f"complete new version {str(new)!r} (the next save puts it in place)")
                return new
    raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")


def nonfinite_weights(state: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """The floating-point tensors of `state` that hold inf or NaN: name -> (how many values, of how many).
    A sharded tensor (DTensor) counts its local shard. (4-bit codes are integers and never count.)"""
    bad = {}
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            continue
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        count = int((~torch.isfinite(local)).sum())
        if count:
            bad[name] = (count, local.numel())
    return bad


def describe_nonfinite(bad: dict[str, tuple[int, int]]) -> str:
    """`nonfinite_weights`'s result in words: how many tensors, the first few named with their counts."""
    listed = ", ".join(f"{name} ({count} of {numel})" for name, (count, numel) in list(bad.items())[:4])
    return f"{len(bad)} weight tensors hold inf or NaN: {listed}{', ...' if len(bad) > 4 else ''}"


# -- writers ---------------------------------------------------------------------------------------


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling of `path` for a writer that takes a file name (Lightning's YAML writers, say):
    once the block completes, the file it wrote there is fsync'd and renamed over `path` (a failure removes
    it). Temporaries that killed writers left in the folder are removed first (`recover`)."""
    path = Path(path)
    recover(path.parent)
    tmp = _sibling(path, "tmp", _new_token())
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_directory(path.parent)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """A binary file to write `path` through (`atomic_path`): a temporary sibling, flushed, fsync'd and
    renamed over `path` when the block completes; a killed token-cache write leaves a file as large as
    the cache, which the next write into the folder removes."""
    with atomic_path(path) as tmp, open(tmp, "xb") as f:
        yield f
        f.flush()


def save_file(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save(obj, path)`, atomically; stale temporaries in the folder are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        torch.save(obj, f)


def new_directory(path: str | os.PathLike) -> Path:
    """An empty temporary sibling of `path` to write a directory into, then `commit_directory`; stale
    temporaries in the folder are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path.parent)
    tmp = _sibling(path, "tmp", _new_token())
    tmp.mkdir()
    return tmp


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux `renameat2` with RENAME_EXCHANGE, which Python does
    not wrap); False where the system or the filesystem cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def commit_directory(tmp: Path, path: str | os.PathLike) -> None:
    """Put the fully written directory `tmp` (from `new_directory`) at `path`: durable first, then
    swapped with the old `path` (or the old one aside and `tmp` in), the old one deleted."""
    path = Path(path)
    token = _TEMPORARY.match(tmp.name)["token"]
    _fsync_tree(tmp)
    old = _sibling(path, "old", token)
    if path.exists() and _exchange(tmp, path):
        fsync_directory(path.parent)
        _delete(tmp)  # the old version, now under the temporary name
        return
    if path.exists():
        os.rename(path, old)
    os.rename(tmp, path)
    fsync_directory(path.parent)
    if old.exists():
        _delete(old)


def remove_checkpoint(path: str | os.PathLike) -> None:
    """Delete a checkpoint file or directory so that its name never holds a part of it: the name goes
    by one rename, the rest is deleted after."""
    path = Path(path)
    if not path.exists():
        return
    doomed = _sibling(path, "del", _new_token())
    os.rename(path, doomed)
    fsync_directory(path.parent)
    _delete(doomed)


def is_occupied(out: Path) -> bool:
    """Whether writing an export to `out` would replace something: a file, or a directory with entries."""
    return out.exists() and (not out.is_dir() or any(out.iterdir()))


EXPORT_FILES = ("config.json", "adapter_config.json", ".safetensors")  # an export holds them (peft: or a folder per adapter)
RUN_FILES = (".ckpt", SHARDED_METADATA, "lightning_logs")  # a checkpoint file, a sharded checkpoint, a run's logs


def not_an_export(out: Path) -> str | None:
    """Why an occupied `out` is not an earlier export that `overwrite` may replace, or None if it is one.

    `overwrite` replaces the whole folder; a folder that holds checkpoints or logs (a run's folder), a
    file, or a folder with no model or adapter config (the working directory, a data folder) would be
    deleted with it, so only a folder an export wrote qualifies: a file named or ending as one of
    `EXPORT_FILES` at its top (or an adapter config in a folder per adapter), and no checkpoint or log
    up to two levels down."""
    if not out.is_dir():
        return "it is a file"
    top = list(out.iterdir())
    nested = [entry for folder in top if folder.is_dir() for entry in folder.iterdir()]
    runs = [entry for entry in top + nested if entry.name.endswith(RUN_FILES)]
    if runs:
        return f"it holds checkpoints or run logs ({', '.join(str(entry) for entry in runs[:3])})"
    if not (any(entry.name.endswith(EXPORT_FILES) for entry in top) or any(entry.name == "adapter_config.json" for entry in nested)):
        shown = ", ".join(sorted(entry.name for entry in top)[:5]) + (", ..." if len(top) > 5 else "")
        return f"it holds no config.json, adapter_config.json or *.safetensors, so it is not an earlier export ({shown})"
    return None


def export_refusal(out: str | os.PathLike, overwrite: bool) -> str | None:
    """The message that refuses to write an export to `out`, or None where it may be written: `out` is
    absent or empty, or `overwrite` is set and `out` is an earlier export (`not_an_export`)."""
    out = Path(out)
    if not is_occupied(out):
        return None
    if not overwrite:
        return (f"export directory {str(out)!r} exists and is not empty; remove it or pass overwrite=True "
                "(lightning-llm export: --overwrite)")
    reason = not_an_export(out)
    if reason is None:
        return None
    return (f"export directory {str(out)!r}: overwrite replaces an earlier export and everything in its folder, "
            f"but {reason}; export to a new or empty folder instead")


@contextmanager
def atomic_directory(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """A temporary directory beside `out_dir` to write an export into; it replaces `out_dir` only once
    the block has completed, so at every instant `out_dir` holds the whole old or the whole new export.
    An occupied `out_dir` is replaced only with `overwrite`, and only where it is an earlier export
    (`export_refusal`)."""
    out = Path(out_dir)
    tmp = new_directory(out)  # first: it also finishes an export killed between its renames
    try:
        refusal = export_refusal(out, overwrite)
        if refusal is not None:
            raise FileExistsError(refusal)
        yield tmp
        commit_directory(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- sharded checkpoints ----------------------------------------------------------------------------


def save_sharded(strategy: Any, checkpoint: dict[str, Any], path: _PATH) -> None:
    """Write a Lightning checkpoint as a `torch.distributed.checkpoint` directory (every rank calls this).

    `strategy` is a Lightning strategy (`broadcast`, `barrier`, `reduce_boolean_decision`, `is_global_zero`).
    Every rank writes its shards of `checkpoint["state_dict"]` and `checkpoint["optimizer_states"]` into
    one temporary sibling of `path`; after a barrier rank 0 writes `meta.pt` (the rest of the dict and the
    shard record) and swaps the directory in. So every rank must see the directory rank 0 creates: on
    several nodes, `path` must be on a filesystem they share; otherwise every rank stops at once, before
    writing, rather than leave checkpoints that lack the other nodes' shards.
    """
    import torch.distributed.checkpoint as dcp

    path = Path(strategy.broadcast(str(path)))
    tmp = new_directory(path) if strategy.is_global_zero else None
    tmp = Path(strategy.broadcast(str(tmp) if tmp is not None else None))
    if not strategy.reduce_boolean_decision(_appears(tmp), all=True):
        if strategy.is_global_zero:
            shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(
            f"sharded checkpoint {str(path)!r}: every rank writes its shards into {str(tmp)!r}, which rank 0 created, "
            f"but a rank on another node does not see it: on several nodes, the checkpoint folder must be on a "
            "filesystem that every node shares (NFS, Lustre, GPFS, ...); set the ModelCheckpoint dirpath (or "
            "trainer.default_root_dir) to a folder there")
    tensors = {"state_dict": checkpoint.pop("state_dict")}
    for i, state in enumerate(checkpoint.pop("optimizer_states", [])):
        tensors[f"optimizer_{i}"] = state
    dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True))
    strategy.barrier()  # every rank's shards are written and fsync'd
    if strategy.is_global_zero:
        record = {"step": checkpoint.get("global_step"), "save_id": _read_dcp_metadata(tmp).storage_meta.save_id,
                  "files": {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}}
        with atomic_file(tmp / SHARDED_METADATA) as f:
            torch.save({**checkpoint, SHARD_RECORD: record}, f)
        commit_directory(tmp, path)
    strategy.barrier()  # no rank reads `path` before it is in place


# How long a rank looks for a directory that another node's rank has just created: a network filesystem's
# client may serve a cached listing of the parent folder for a few seconds.
SHARED_DIRECTORY_WAIT_S = 5.0


def _appears(directory: Path, wait_s: float = SHARED_DIRECTORY_WAIT_S) -> bool:
    """Whether `directory` exists here, or appears within `wait_s` seconds."""
    deadline = time.monotonic() + wait_s
    while not directory.is_dir():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _read_dcp_metadata(path: Path) -> Any:
    import torch.distributed.checkpoint as dcp

    return dcp.FileSystemReader(path).read_metadata()


def _torch_load(path: Path, what: str, map_location: Any = "cpu", weights_only: bool | None = False,
                mmap: bool = False) -> Any:
    """`torch.load`; a file torch cannot read (truncated, not a checkpoint) is an error naming it.
    (weights_only=False by default: checkpoints hold the run's own objects, e.g. hyper-parameters.)"""
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=weights_only, mmap=mmap)
    except Exception as err:  # torch raises many kinds (RuntimeError, UnpicklingError, EOFError, ...)
        first_line = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(f"{what} {str(path)!r} cannot be read: it is truncated or not a checkpoint "
                         f"({type(err).__name__}: {first_line})") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{what} {str(path)!r} holds a {type(checkpoint).__name__}, not a Lightning checkpoint")
    return checkpoint


def check_sharded(path: str | os.PathLike) -> dict[str, Any]:
    """The non-tensor part of the sharded checkpoint `path`, once it is verified complete and consistent:
    `meta.pt` present, its `.metadata` from the same save, and every shard file of its record present
    with its recorded size. Raises naming the path and what is missing otherwise."""
    path = Path(path)
    meta_file, index_file = path / SHARDED_METADATA, path / DCP_METADATA
    if not meta_file.is_file():
        if index_file.exists() or any(path.glob("*.distcp")):
            raise ValueError(f"sharded checkpoint {str(path)!r} is incomplete: it has no {SHARDED_METADATA}, the "
                             "record written last, so its save did not finish; resume from an earlier checkpoint")
        raise ValueError(f"checkpoint {str(path)!r} is a directory but not a sharded checkpoint (one holds "
                         f"{DCP_METADATA} and {SHARDED_METADATA}); give a checkpoint file or a directory written by "
                         "ZeROStrategy or PipelineStrategy")
    meta = _torch_load(meta_file, "the metadata of sharded checkpoint")
    if not index_file.is_file():
        raise ValueError(f"sharded checkpoint {str(path)!r} is incomplete: {DCP_METADATA} is missing")
    try:
        index = _read_dcp_metadata(path)
    except Exception as err:  # torch raises whatever unpickling a damaged file raises
        raise ValueError(f"sharded checkpoint {str(path)!r}: {DCP_METADATA} cannot be read: {err}") from None
    shard_files = {info.relative_path for info in index.storage_data.values()}
    record = meta.pop(SHARD_RECORD, None)
    if record is None:
        rank_zero_warn(f"sharded checkpoint {str(path)!r} has no shard record (written by an older version): only the "
                       "presence of its shard files is checked, not that they come from one save")
        expected = {name: None for name in shard_files}
    else:
        expected = record["files"]
        save_id = getattr(index.storage_meta, "save_id", None)
        if save_id != record["save_id"] or not shard_files <= set(expected):
            raise ValueError(f"sharded checkpoint {str(path)!r} is inconsistent: its {DCP_METADATA} is not the one "
                             f"of the step-{record['step']} save recorded in {SHARDED_METADATA}")
    missing = sorted(name for name in expected if not (path / name).is_file())
    resized = sorted(name for name, size in expected.items()
                     if size is not None and name not in missing and (path / name).stat().st_size != size)
    if missing or resized:
        step = f"step-{record['step']} " if record is not None else ""
        problems = [f"{len(names)} {what} ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})"
                    for names, what in ((missing, "missing"), (resized, "of another size than recorded")) if names]
        raise ValueError(f"sharded checkpoint {str(path)!r} is incomplete: of the {len(expected)} files of its "
                         f"{step}shard set, {' and '.join(problems)}; resume from an earlier checkpoint")
    return meta


def open_sharded(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """The directory to read for the sharded checkpoint `path` (see `resolve`) and its verified
    non-tensor part (`check_sharded`); a checkpoint file is refused."""
    path = resolve(path)
    if not path.is_dir():
        raise ValueError(f"{str(path)!r} is a checkpoint file, not a sharded checkpoint directory: a strategy that "
                         "shards (ZeROStrategy, PipelineStrategy) resumes only from the directories it writes")
    return path, check_sharded(path)


# The optimizer layout of `PipelineStrategy`'s checkpoints before it became `ParallelStrategy`'s one-dimension
# form: torch's flattened per-parameter state ("optimizer_0.param_groups.<parameter>.lr"), where the ZeRO
# layout every sharded strategy now writes keeps the param groups as a list ("optimizer_0.param_groups.0.lr").
_FLAT_OPTIMIZER_KEY = re.compile(r"^optimizer_\d+\.param_groups\.(?!\d+\.)")


def check_optimizer_layout(path: str | os.PathLike) -> None:
    """Refuse to resume from a sharded checkpoint whose optimizer state is in the flattened layout of the
    earlier `PipelineStrategy`, naming the way out (its weights still export)."""
    path = resolve(path)
    flat = sorted(k for k in _read_dcp_metadata(path).state_dict_metadata if _FLAT_OPTIMIZER_KEY.match(k))
    if flat:
        raise ValueError(
            f"{str(path)!r} keeps its optimizer state in the flattened per-parameter layout (e.g. {flat[0]!r}) that "
            "PipelineStrategy wrote before it became ParallelStrategy(pipeline_parallel=...); this version resumes "
            "only the ZeRO layout. Its weights export: `lightning-llm export --checkpoint "
            f"{path} --out <dir>`, then start a run from <dir> (model: <dir>); the optimizer state and the "
            "data position are not carried over")


def load_sharded_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A sharded checkpoint directory as one Lightning checkpoint dict, without a process group.

    The strategies write the model's tensors under `"state_dict"` with the LightningModule's own key
    names (whatever the sharding, every key whole in the metadata). The weights are read whole;
    optimizer states are left out.
    """
    import torch.distributed.checkpoint as dcp

    path, checkpoint = open_sharded(path)
    index = _read_dcp_metadata(path)
    template: dict[str, torch.Tensor] = {}
    for flat_key, where in index.planner_data.items():
        entry = index.state_dict_metadata[flat_key]
        if where[0] == "state_dict" and isinstance(entry, dcp.metadata.TensorStorageMetadata):
            template[where[1]] = torch.empty(entry.size, dtype=entry.properties.dtype)
    state = {"state_dict": template}
    dcp.load(state, checkpoint_id=path, no_dist=True)
    checkpoint["state_dict"] = state["state_dict"]
    return checkpoint


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", weights_only: bool | None = False) -> dict[str, Any]:
    """A Lightning checkpoint as a dict (on CPU by default): a checkpoint file, or a sharded checkpoint
    directory (ZeROStrategy, PipelineStrategy) joined on this process, checked first."""
    path = resolve(path)
    if path.is_dir():
        return load_sharded_checkpoint(path)
    return _torch_load(path, "checkpoint", map_location, weights_only)


def load_checkpoint_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """What a checkpoint records besides its tensors (hyper-parameters, loops, data order, hf_config),
    without reading the weights: a file's tensors are memory-mapped, a sharded checkpoint's left on disk."""
    path = resolve(path)
    if path.is_dir():
        return check_sharded(path)
    return _torch_load(path, "checkpoint", mmap=True)


# -- Lightning's CheckpointIO ---------------------------------------------------------------------


def is_local_path(path: _PATH) -> bool:
    return get_filesystem(path).protocol in ("file", ("file", "local"))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's `TorchCheckpointIO` with the writes of this module: a checkpoint file is written
    beside its name, fsync'd and renamed (Lightning's own goes through a temporary file in `$TMPDIR`,
    and across filesystems its final move is a copy that a kill leaves truncated). Reads are checked
    and name the path. Remote paths (s3://, ...) go through Lightning's code unchanged."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or not is_local_path(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        save_file(checkpoint, path)

    def load_checkpoint(self, path: _PATH, map_location: Callable | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if not is_local_path(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        return load_checkpoint(path, map_location, weights_only)

    def remove_checkpoint(self, path: _PATH) -> None:
        if not is_local_path(path):
            return super().remove_checkpoint(path)
        remove_checkpoint(path)


def use_atomic_checkpoint_io(trainer: Any) -> None:
    """Give `trainer`'s strategy an `AtomicCheckpointIO` where it would use Lightning's default one; a
    CheckpointIO the user passed (as a plugin or to the strategy) is kept."""
    strategy = trainer.strategy
    # Lightning keeps what the user passed (a plugin, or the strategy's `checkpoint_io`) in its
    # accelerator connector, and creates its default lazily on the strategy: only that one is replaced.
    chosen = getattr(trainer, "_accelerator_connector", None)
    if chosen is not None and chosen.checkpoint_io is not None:
        return
    current = strategy._checkpoint_io
    if current is None or type(current) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
        rank_zero_info("checkpoints: written atomically in their own folder (lightning_llm.checkpoint.AtomicCheckpointIO)")

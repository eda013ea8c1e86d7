"""PretrainDataModule: packed token blocks from a weighted mixture of text sources.

Each source is tokenized once, by a pool of processes and with a progress bar, into a memory-mapped
token file (`data/tokens.py`) in a cache directory keyed by a hash of the source and the tokenizer. Documents are joined with EOS; the stream
is cut into blocks of `block_size + 1` tokens (inputs and shifted targets), and blocks go to the
validation split by a fixed rule. The training set draws blocks from each source in proportion to
its weight, so the mixture is measured in tokens. The sampler is deterministic and resumable: a run
resumed mid-epoch sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from transformers import PreTrainedTokenizerBase

from lightning_llm.data.sources import Source, as_sources
from lightning_llm.data.tokenizer import load_tokenizer, trained_tokenizer
from lightning_llm.data.tokens import TokenizeRun, check_workers, load_tokens, token_file_meta, tokenize_to_file

log = logging.getLogger(__name__)

# Validation takes chunks of up to this many consecutive blocks, `val_fraction` of the chunks spread evenly:
# contiguous spans keep neighbouring text of the same file on one side of the split.
VAL_CHUNK_BLOCKS = 16
# A source is cut into chunks small enough that its validation share is at least this many chunks.
MIN_VAL_CHUNKS = 4


def default_cache_dir() -> Path:
    return Path(os.environ.get("LIGHTNING_LLM_CACHE", Path.home() / ".cache" / "lightning-llm"))


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else f"{tokenizer.name_or_path}|{len(tokenizer)}"
    return hashlib.sha256(f"{text}|{tokenizer.eos_token}".encode()).hexdigest()[:16]


def split_blocks(n_blocks: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices of training and validation blocks: chunk c of consecutive blocks is validation where the
    running count c * val_fraction passes an integer, so `val_fraction` of the chunks are, evenly spaced.

    With val_fraction = 1/k that is every k-th chunk. The chunks are `VAL_CHUNK_BLOCKS` long, shorter in
    a source too small for `MIN_VAL_CHUNKS` such chunks of validation: there 16-block chunks held out
    a share far from the one asked (1 block of 100 for 0.1; 1 of 300 for 0.02), as did k = round(1 / val_fraction)
    for a fraction that is no 1/k (0.5 of the blocks for 0.4).
    """
    blocks = np.arange(n_blocks)
    if val_fraction <= 0:
        return blocks, blocks[:0]
    chunk = min(VAL_CHUNK_BLOCKS, max(1, int(n_blocks * val_fraction) // MIN_VAL_CHUNKS))
    c = blocks // chunk
    # (the small offset makes the floor exact where c * val_fraction is an integer that floats round below)
    is_val = np.floor((c + 1) * val_fraction + 1e-9) > np.floor(c * val_fraction + 1e-9)
    if not is_val.any():  # a small source still contributes a validation block
        is_val[-1] = True
    return blocks[~is_val], blocks[is_val]


def mixture_index(train_blocks: list[np.ndarray], weights: list[float], total: int, seed: int) -> np.ndarray:
    """(source, block) pairs: `total` blocks drawn from the sources in proportion to their weights.

    A source with fewer blocks than its share is repeated (upsampled); one with more is subsampled.
    """
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    counts = np.floor(w * total).astype(int)
    counts[np.argsort(-(w * total - counts))[: total - counts.sum()]] += 1  # largest remainders
    rng = np.random.default_rng(seed)
    parts = []
    for s, (blocks, count) in enumerate(zip(train_blocks, counts)):
        reps = math.ceil(count / len(blocks))
        chosen = np.concatenate([rng.permutation(blocks) for _ in range(reps)])[:count]
        parts.append(np.stack([np.full(count, s), chosen], axis=1))
    return np.concatenate(parts)


class PackedBlocks(Dataset):
    """Blocks of `block_size + 1` tokens: `input_ids` are the first `block_size`, `targets` the last."""

    def __init__(self, streams: list[np.ndarray], index: np.ndarray, block_size: int) -> None:
        self.streams, self.index, self.block_size = streams, index, block_size

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s, b = self.index[i]
        start = int(b) * self.block_size
        block = torch.from_numpy(self.streams[s][start : start + self.block_size + 1].astype(np.int64))
        return {"input_ids": block[:-1], "targets": block[1:]}


class ResumableSampler(DistributedSampler):
    """A seeded (optionally shuffled) order over the dataset, sharded over data-parallel ranks.

    It subclasses `DistributedSampler` so that Lightning leaves it in place in distributed runs, and
    it can start `start` samples into an epoch, which is how a run resumed mid-epoch continues with
    the batches it had not seen yet. Its length is the whole epoch's even so: Lightning counts a
    resumed epoch's batches from the epoch's start, and ends the epoch when that count reaches the
    loader's length.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0, start: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.start = start

    def __iter__(self):
        indices = list(super().__iter__())[self.start :]
        self.start = 0  # only the resumed epoch starts late
        return iter(indices)


class ResumableLoader(DataLoader):
    """The training loader, with the `state_dict` / `load_state_dict` pair by which Lightning checkpoints
    a loader (and without which it warns, on every mid-epoch resume, that the loader is not resumable).

    The state is how many samples of the epoch this rank has trained on. That count is the training
    loop's (`batches_done`), not the loader's own: the loader's workers and Lightning's fetcher draw
    batches ahead of the one being trained on. Loading the state makes the sampler start there.

    Why not torchdata's `StatefulDataLoader`, which Lightning checkpoints the same way: it would serve
    (torchdata 0.11 installs without touching torch, and with it the mid-epoch and across-the-epoch-end
    resume tests of tests/test_pretrain.py pass), but it cannot load the loader state of the checkpoints
    written so far (`{"start": n}`; it asserts on its own private keys), so every run saved before the
    change would stop resuming; it warns on each loader it builds under torch 2.13 (its call of the
    deprecated `torch.set_vital`); and it would be one more dependency of the base install for the few
    lines here.
    """

    def __init__(self, *args: Any, batches_done: Callable[[], int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches_done = batches_done

    def state_dict(self) -> dict[str, int]:
        done = self.batches_done()
        # A checkpoint at the end of the epoch resumes at the start of the next one.
        return {"start": done * self.batch_size if done < len(self) else 0}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.sampler.start = state_dict["start"]


def check_block_fits(block_size: int, window: int | None) -> None:
    """Raise unless a block of `block_size` tokens fits the model's window (max_position_embeddings)."""
    if window is not None and block_size > window:
        raise ValueError(f"block_size {block_size} exceeds the model's max_position_embeddings {window}; "
                         f"use block_size <= {window}")


# Attribute -> the option a user writes, in data-order messages.
OPTION_NAMES = {"tokenizer_spec": "tokenizer", "vocab_size_wanted": "vocab_size"}


def source_settings(source: Source) -> dict[str, Any]:
    """A source's options that decide what it yields (not its display name or counters)."""
    settings = dataclasses.asdict(source)
    # streaming yields the same rows; config and split are left out when not given, so that a checkpoint
    # written before they existed has the same data order.
    for key in ("name", "replaced", "streaming"):
        settings.pop(key, None)
    for key in ("config", "split"):
        if settings.get(key) is None:
            settings.pop(key, None)
    return settings


class PretrainDataModule(LightningDataModule):
    """Packed next-token blocks from a weighted mixture of text sources.

    Args:
        sources: a path or `python-stdlib`, or a list of sources (`{path, weight, text_field, name}`)
            that mix by weight, measured in tokens.
        tokenizer: a local tokenizer directory or a hub id; `None` trains a byte-level BPE of
            `vocab_size` tokens on the first source and caches it.
        vocab_size: size of the trained BPE (ignored with `tokenizer`).
        block_size: tokens per training sequence.
        batch_size: sequences per batch on each data-parallel rank.
        val_fraction: share of each source's blocks held out for validation.
        max_val_blocks: cap on validation blocks (evenly spaced), to keep validation quick.
        train_blocks: blocks per training epoch; `None` is the sum of the sources' training blocks.
        seed: seeds the mixture and the shuffling.
        cache_dir: where tokenizers and token files are cached (`$LIGHTNING_LLM_CACHE`, else
            `~/.cache/lightning-llm`).
        num_workers: DataLoader workers.
        tokenize_workers: processes that tokenize a source not yet in the cache; `None` is one per
            available CPU. The token file is the same for any number.
        allow_data_change: resume from a checkpoint whose data order (`DATA_ORDER`, and the number of
            data-parallel replicas) differs from this one's. By default that is an error: a resumed run
            sees the batches an uninterrupted one would have seen only when none of them changed.
    """

    # The options that decide which batch an optimizer step sees (attribute names): a checkpoint
    # records them, and resuming with others breaks the resumed-equals-uninterrupted promise.
    DATA_ORDER: tuple[str, ...] = ("sources", "tokenizer_spec", "vocab_size_wanted", "block_size", "batch_size",
                                   "val_fraction", "train_blocks", "seed")
    # Hooks for subclasses: the kind of source a dict in `sources` becomes, and how samples make a batch
    # (None: the default collate, which stacks equal-length blocks).
    source_class: type[Source] = Source
    collate_fn: Callable[[list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]] | None = None

    def __init__(
        self,
        sources: str | list[Source] | list[dict] = "python-stdlib",
        tokenizer: str | None = None,
        vocab_size: int = 8192,
        block_size: int = 256,
        batch_size: int = 16,
        val_fraction: float = 0.02,
        max_val_blocks: int | None = 64,
        train_blocks: int | None = None,
        seed: int = 1234,
        cache_dir: str | None = None,
        num_workers: int = 0,
        tokenize_workers: int | None = None,
        allow_data_change: bool = False,
    ) -> None:
        super().__init__()
        # Lightning runs `prepare_data` on global rank 0 only; `setup` then has the first process of every
        # other node tokenize what its cache lacks. A cache every node shares is tokenized once, not once
        # per node (Lightning's default), and a node-local cache still gets its own copy.
        self.prepare_data_per_node = False
        self.allow_data_change = allow_data_change
        self.tokenize_workers = check_workers(tokenize_workers)
        for name, value in (("block_size", block_size), ("batch_size", batch_size), ("vocab_size", vocab_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.sources = as_sources(sources, self.source_class)
        self.tokenizer_spec, self.vocab_size_wanted = tokenizer, vocab_size
        self.block_size, self.batch_size, self.num_workers = block_size, batch_size, num_workers
        self.val_fraction, self.max_val_blocks, self.train_blocks, self.seed = val_fraction, max_val_blocks, train_blocks, seed
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self.train_set: PackedBlocks | None = None
        self.val_set: PackedBlocks | None = None
        self.stats: dict[str, dict[str, int]] = {}
        self.tokenized: dict[str, TokenizeRun] = {}  # the sources this process tokenized (not read from the cache)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            if self.tokenizer_spec is not None:
                self._tokenizer = load_tokenizer(self.tokenizer_spec)
            else:
                first = self.sources[0]
                self._tokenizer = trained_tokenizer(first.documents(), self.vocab_size_wanted, first.fingerprint(), self.cache_dir)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def token_file(self, source: Source) -> Path:
        key = hashlib.sha256(f"{source.fingerprint()}|{tokenizer_fingerprint(self.tokenizer)}".encode()).hexdigest()[:16]
        return self.cache_dir / "tokens" / f"{source.name.replace(os.sep, '_')}-{key}.bin"

    def check_model_fits(self) -> None:
        """What can be checked against the model before any text is read: the block fits its window.

        The module says its window through `context_window()` (PretrainModule does, from the model's
        config, before building it); a module that does not is checked when it builds its model."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        context_window = getattr(module, "context_window", None)
        if callable(context_window):
            check_block_fits(self.block_size, context_window())

    def prepare_data(self) -> None:
        self.check_model_fits()
        for source in self.sources:
            path = self.token_file(source)
            if not path.exists():
                self.tokenized[source.name] = tokenize_to_file(source, self.tokenizer, path, self.tokenize_workers)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.check_model_fits()
        self.warn_unread_files()
        self._prepare_on_every_filesystem()
        streams, train_blocks, val_index = [], [], []
        for s, source in enumerate(self.sources):
            tokens = load_tokens(self.token_file(source))
            n_blocks = (len(tokens) - 1) // self.block_size
            if len(tokens) == 0:
                raise ValueError(f"data source {source.name!r} has no text: its files are empty or hold only whitespace, "
                                 "or its records' text fields are empty; give it text or leave it out")
            if n_blocks < 1:
                raise ValueError(
                    f"data source {source.name!r} has {len(tokens)} tokens, fewer than one block of "
                    f"block_size + 1 = {self.block_size + 1}; add text or lower block_size"
                )
            train, val = split_blocks(n_blocks, self.val_fraction)
            if len(train) == 0:
                raise ValueError(f"data source {source.name!r} has {n_blocks} block(s): none left for training after the validation split")
            streams.append(tokens)
            train_blocks.append(train)
            val_index.append(np.stack([np.full(len(val), s), val], axis=1))
            self.stats[source.name] = {"tokens": len(tokens), "train_tokens": len(train) * self.block_size, "val_tokens": len(val) * self.block_size,
                                       "replaced": token_file_meta(self.token_file(source)).get("replaced", 0)}
        total = self.train_blocks or sum(len(b) for b in train_blocks)
        index = mixture_index(train_blocks, [s.weight for s in self.sources], total, self.seed)
        val = np.concatenate(val_index)
        if self.max_val_blocks is not None and len(val) > self.max_val_blocks:
            val = val[np.linspace(0, len(val) - 1, self.max_val_blocks).round().astype(int)]
        for s, source in enumerate(self.sources):
            self.stats[source.name]["mixture_tokens"] = int((index[:, 0] == s).sum()) * self.block_size
        self.train_set = PackedBlocks(streams, index, self.block_size)
        self.val_set = PackedBlocks(streams, val, self.block_size)
        self._log_stats(len(val))

    def warn_unread_files(self) -> None:
        """Say which files of a directory source are not read, and how to read them: a folder of text
        stands for all its files, and leaving some out unannounced would train on less than was given."""
        for source in self.sources:
            unread = source.unread_files()
            if unread:
                kinds = ", ".join(f"{count} {suffix or 'without suffix'}" for suffix, count in sorted(unread.items()))
                rank_zero_warn(f"data source {source.name!r}: {unread.total()} file(s) in {source.path!r} are not read ({kinds}): "
                               f"a folder is read for its files ending in {', '.join(source.read_suffixes)}. To read others, give them "
                               f"as a file or a glob (e.g. '{Path(source.path) / '**' / '*'}', every file; text only)")

    def _prepare_on_every_filesystem(self) -> None:
        """`prepare_data` where this process's cache may lack the token files: by the first process of each
        node while the others wait (a no-op where the files exist: a shared cache that global rank 0 has
        filled, or a `setup` after `prepare_data`); by this process alone without a distributed trainer.
        A failure on one node stops every node, not only that one (the others would wait for it forever)."""
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            self.prepare_data()
            return
        error = None
        if trainer.local_rank == 0:
            try:
                self.prepare_data()
            except Exception as err:  # reported to every rank below, then raised here
                error = err
        if not trainer.strategy.reduce_boolean_decision(error is None, all=True):
            if error is not None:
                raise error
            raise RuntimeError("preparing the data failed on another node (its log has the error); stopping here too")

    def _log_stats(self, n_val: int) -> None:
        # The replaced-characters column appears when a source asked for errors="replace".
        replacing = any(source.errors == "replace" for source in self.sources)
        rows = [f"{'source':<24}{'tokens':>12}{'train':>12}{'val':>10}{'in mixture':>12}{'tokenized':>24}"
                + (f"{'replaced chars':>16}" if replacing else "")]
        for name, st in self.stats.items():
            run = self.tokenized.get(name)
            speed = f"{run.mb_per_s:.2f} MB/s, {run.workers} proc" if run is not None else "(cached)"
            rows.append(f"{name:<24}{st['tokens']:>12,}{st['train_tokens']:>12,}{st['val_tokens']:>10,}{st['mixture_tokens']:>12,}{speed:>24}"
                        + (f"{st['replaced']:>16,}" if replacing else ""))
        rows.append(f"{len(self.train_set)} training blocks of {self.block_size} tokens per epoch; {n_val} validation blocks")
        rank_zero_info("\n".join(rows))

    def _loader(self, dataset: PackedBlocks, shuffle: bool) -> DataLoader:
        kwargs: dict[str, Any] = {"num_replicas": 1, "rank": 0}
        if self.trainer is not None:
            kwargs.update(getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) or {})
        kwargs = {k: kwargs[k] for k in ("num_replicas", "rank")}
        sampler = ResumableSampler(dataset, shuffle=shuffle, seed=self.seed, **kwargs)
        options: dict[str, Any] = {"batch_size": self.batch_size, "sampler": sampler, "drop_last": shuffle, "collate_fn": self.collate_fn,
                                   "num_workers": self.num_workers, "persistent_workers": self.num_workers > 0}
        if not shuffle:
            return DataLoader(dataset, **options)
        return ResumableLoader(dataset, batches_done=self._batches_done, **options)

    def _batches_done(self) -> int:
        """Batches of this epoch the training loop has taken (a checkpoint is written after the batch ran)."""
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.ready if self.trainer is not None else 0

    # -- resuming ---------------------------------------------------------------------------------

    def data_order(self, data_parallel_size: int | None = None) -> dict[str, Any]:
        """The settings that decide the order of the training batches, by option name."""
        order = {OPTION_NAMES.get(attr, attr): getattr(self, attr) for attr in self.DATA_ORDER}
        order["sources"] = [source_settings(source) for source in self.sources]
        if data_parallel_size is not None:
            order["data-parallel size"] = data_parallel_size
        return order

    def _data_parallel_size(self) -> int | None:
        """The number of data-parallel replicas, once a trainer has set its strategy up."""
        try:
            return self.trainer.strategy.distributed_sampler_kwargs["num_replicas"]
        except (AttributeError, AssertionError, KeyError, TypeError):  # no trainer, or a strategy not set up
            return 1 if self.trainer is not None and self.trainer.world_size == 1 else None

    def check_data_order(self, saved: dict[str, Any] | None, data_parallel_size: int | None = None,
                         checkpoint: str = "the checkpoint") -> None:
        """Raise (or, with `allow_data_change`, warn) when `saved`, a checkpoint's `data_order`, differs from now."""
        if saved is None:
            return
        now = self.data_order(data_parallel_size)
        changes = [f"{key} {saved[key]!r} -> {now[key]!r}" for key in now if key in saved and saved[key] != now[key]]
        if not changes:
            return
        message = (f"resuming from {checkpoint}, whose data order differs from this run's: {'; '.join(changes)}. "
                   "A resumed run sees the batches of an uninterrupted one only with the same data settings")
        if not self.allow_data_change:
            raise ValueError(f"{message}: restore them, or pass allow_data_change=True (on the command line: "
                             "--data.allow_data_change=true) to accept the change knowingly")
        rank_zero_warn(f"{message}; continuing as allow_data_change=True asks")

    def state_dict(self) -> dict[str, Any]:
        return {"data_order": self.data_order(self._data_parallel_size())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        path = getattr(self.trainer, "ckpt_path", None) if self.trainer is not None else None
        self.check_data_order(state_dict.get("data_order"), self._data_parallel_size(), checkpoint=str(path or "the checkpoint"))

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

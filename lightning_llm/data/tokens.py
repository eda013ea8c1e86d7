"""Token files: a source's documents tokenized, each followed by EOS, into one flat array on disk.

The tokenizer runs in `workers` processes. The parent reads and decodes the documents in their fixed
order (so a decoding error names its file exactly as in one process), sends batches to the workers,
and writes their tokens back in the order it sent them: the file is the same, byte for byte, for any
number of workers. `map_in_order` is that pool, for any tokenizing function: instruction data uses it too
(data/instruct.py).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from lightning_llm.checkpoint import atomic_file
from lightning_llm.data.sources import Source

# A batch is this much text or this many documents, whichever comes first: large enough that sending it
# to a worker costs little beside tokenizing it, small enough that a few per worker keep memory low.
BATCH_CHARS = 1 << 20
BATCH_DOCS = 1024
# Batches sent ahead per worker: enough to keep every worker busy while the parent reads and writes.
IN_FLIGHT_PER_WORKER = 2

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class TokenizeRun:
    """What one tokenization did: tokens written, UTF-8 bytes of text read, wall seconds, processes."""

    tokens: int
    text_bytes: int
    seconds: float
    workers: int

    @property
    def mb_per_s(self) -> float:
        return self.text_bytes / 1e6 / max(self.seconds, 1e-9)


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one, as in a container or
    under taskset), which is what a pool of workers can use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_workers(workers: int | None) -> int:
    """`workers`, or the number of available CPUs for None; raises unless it is a positive integer."""
    if workers is None:
        return available_cpus()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"tokenize_workers must be a positive integer (processes that tokenize) or None "
                         f"(the number of CPUs, {available_cpus()} here), got {workers!r}")
    return workers


def token_dtype(tokenizer: PreTrainedTokenizerBase) -> np.dtype:
    return np.dtype(np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32)


def encode(texts: list[str], tokenizer: PreTrainedTokenizerBase, dtype: np.dtype) -> tuple[np.ndarray, int]:
    """The tokens of `texts`, each followed by EOS, as one array; and the texts' size in UTF-8 bytes."""
    eos = tokenizer.eos_token_id
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    tokens = np.concatenate([np.asarray(doc + [eos], dtype=dtype) for doc in ids])
    return tokens, sum(len(text.encode("utf-8")) for text in texts)


def batches(items: Iterable[T], max_chars: int | None = BATCH_CHARS, max_docs: int = BATCH_DOCS) -> Iterator[list[T]]:
    """`items` in lists of `max_docs`, cut sooner where the documents' characters reach `max_chars` (None:
    items that are not text, counted only)."""
    batch: list[T] = []
    chars = 0
    for item in items:
        batch.append(item)
        chars += len(item) if max_chars is not None else 0
        if (max_chars is not None and chars >= max_chars) or len(batch) >= max_docs:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


# What every call in a worker process shares (the tokenizer, ...), set once per worker by `_start_worker`.
_worker: dict[str, Any] = {}


def _start_worker(shared: dict[str, Any]) -> None:
    _worker.update(shared)


def _call_in_worker(function: Callable[..., R], batch: list) -> R:
    return function(batch, **_worker)


@contextmanager
def worker_pool(workers: int, shared: dict[str, Any]) -> Iterator[ProcessPoolExecutor]:
    """A process pool whose workers hold `shared` (the tokenizer and what goes with it).

    On Linux the workers are forked: they start at once, with the tokenizer already in memory, and
    without re-running the user's script (which `spawn` does, and which fails without a `__main__`
    guard). Each worker tokenizes on one thread: while the pool lives (the parent only reads and
    writes meanwhile), `TOKENIZERS_PARALLELISM=false` is in the environment the workers start with,
    so N workers do not each start a thread per CPU, and the Rust tokenizer neither warns nor uses its
    thread pool in a forked child. `ProcessPoolExecutor` rather than `multiprocessing.Pool`: a worker
    that dies (killed for memory) is an error here, where `Pool` would wait for its result forever.
    """
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(shared,))
    try:
        yield pool
    finally:
        pool.shutdown(cancel_futures=True)  # (on an error, the batches not started are dropped)
        if previous is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def map_in_order(function: Callable[..., R], batches: Iterable[list], workers: int, **shared: Any) -> Iterator[R]:
    """`function(batch, **shared)` of each batch, in the batches' order, computed by `workers` processes.

    `function` is a module-level function (the workers find it by name); `shared` reaches each worker
    once, when it starts. The parent draws the batches (reading and decoding in this process, so their
    errors are raised here, in order) and keeps a bounded number in flight: memory stays flat on any
    corpus size. With one worker, or a single batch (nothing to share out), everything runs in this process.
    """
    batches = iter(batches)
    first = list(islice(batches, 2))
    if workers == 1 or len(first) < 2:
        for batch in chain(first, batches):
            yield function(batch, **shared)
        return
    batches = chain(first, batches)
    with worker_pool(workers, shared) as pool:
        pending: deque[Future] = deque()
        for batch in batches:
            pending.append(pool.submit(_call_in_worker, function, batch))
            if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                yield _result(pending.popleft())
        while pending:
            yield _result(pending.popleft())


def _result(future: Future) -> R:
    try:
        return future.result()
    except BrokenProcessPool as err:
        raise RuntimeError("a tokenizing worker process died (killed for lack of memory?); "
                           "run again with fewer tokenize_workers") from err


def tokenize_to_file(source: Source, tokenizer: PreTrainedTokenizerBase, path: Path, workers: int = 1,
                     max_chars: int = BATCH_CHARS, max_docs: int = BATCH_DOCS) -> TokenizeRun:
    """Tokenize `source` into `path` (EOS after each document) with `workers` processes.

    Both files are written atomically (`checkpoint.atomic_file`), the record beside the tokens first,
    so a token file that exists is whole. The progress bar counts the text read (its rate is MB/s)."""
    dtype = token_dtype(tokenizer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens = text_bytes = 0
    start = time.perf_counter()
    bar = tqdm(desc=f"tokenizing {source.name} ({workers} process{'es' if workers > 1 else ''})", unit="B",
               unit_scale=True, disable=None)
    try:
        with atomic_file(path) as fh:
            encoded = map_in_order(encode, batches(source.documents(), max_chars, max_docs), workers,
                                   tokenizer=tokenizer, dtype=dtype)
            for ids, size in encoded:
                fh.write(ids.tobytes())
                tokens += ids.size
                text_bytes += size
                bar.update(size)
            meta = {"dtype": dtype.name, "tokens": tokens, "replaced": source.replaced}
            with atomic_file(path.with_suffix(".json")) as meta_file:
                meta_file.write(json.dumps(meta).encode())
    finally:
        bar.close()
    return TokenizeRun(tokens, text_bytes, time.perf_counter() - start, workers)


def token_file_meta(path: Path) -> dict[str, Any]:
    """What `tokenize_to_file` recorded beside the tokens: dtype, token count, replaced characters."""
    return json.loads(path.with_suffix(".json").read_text())


def load_tokens(path: Path) -> np.ndarray:
    """The token file as a read-only memory map (an empty array for a source without text: no file of
    0 bytes can be mapped)."""
    meta = token_file_meta(path)
    if meta["tokens"] == 0:
        return np.zeros(0, dtype=meta["dtype"])
    return np.memmap(path, dtype=meta["dtype"], mode="r", shape=(meta["tokens"],))

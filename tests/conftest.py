"""Shared fixtures: a private cache, a small corpus from the standard library, a tokenizer trained on it."""

from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path

import pytest

# The tests never reach a hub: a hub id that is not cached fails at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CORPUS_FILES = ["textwrap.py", "bisect.py", "heapq.py", "colorsys.py", "fnmatch.py", "glob.py", "keyword.py", "shlex.py"]


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Tokenizers and token files of the tests go to a temporary cache, never the user's."""
    path = tmp_path_factory.mktemp("cache")
    old = os.environ.get("LIGHTNING_LLM_CACHE")
    os.environ["LIGHTNING_LLM_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("LIGHTNING_LLM_CACHE", None)
    else:
        os.environ["LIGHTNING_LLM_CACHE"] = old


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """A directory of a few real Python files (~100 KB)."""
    path = tmp_path_factory.mktemp("corpus")
    for name in CORPUS_FILES:
        shutil.copy(STDLIB / name, path / name)
    return path


@pytest.fixture(scope="session")
def tokenizer(corpus_dir):
    """A 512-token byte-level BPE trained on the corpus."""
    from lightning_llm.data.sources import Source
    from lightning_llm.data.tokenizer import train_tokenizer

    return train_tokenizer(Source(str(corpus_dir)).documents(), vocab_size=512)


@pytest.fixture(autouse=True)
def rank_zero_restored():
    """A trainer built in this process under a launcher's environment (SLURM_PROCID=3, RANK=1, ...) sets
    Lightning's process-wide `rank_zero_only.rank`; left there, every later test's rank-zero logging and
    loggers would fall silent. Put it back after each test."""
    from lightning_utilities.core.rank_zero import rank_zero_only

    rank = getattr(rank_zero_only, "rank", None)
    yield
    if rank is not None:
        rank_zero_only.rank = rank



@pytest.fixture(autouse=True)
def seed_environment_restored():
    """`seed_everything` (a config's `seed_everything:` run through the CLI in this process) leaves PL_GLOBAL_SEED
    in os.environ; a later test's DDP ranks then reseed from it at setup while its one-process oracle does not,
    and they draw other initial weights (test_instruct_distributed failed after test_lora's YAML examples).
    Put the variables back after each test."""
    names = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")
    saved = {name: os.environ.get(name) for name in names}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value

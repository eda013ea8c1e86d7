"""Shared pieces of the evaluation tests: a small tokenizer, a tiny model, the fixture data."""

import copy
import functools
import sysconfig
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from lightning_llm.data.tokenizer import train_tokenizer
from lightning_llm.models import build_model

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


@functools.cache
def _trained_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / name).read_text() for name in ("textwrap.py", "string.py", "fractions.py", "calendar.py")]
    return train_tokenizer(texts, vocab_size)


def small_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a few files of the standard library (a fresh copy: tests may modify it)."""
    return copy.deepcopy(_trained_tokenizer(vocab_size))


def tiny_model(tokenizer, seed: int = 0) -> torch.nn.Module:
    # A wide initialisation spreads the logits, so that greedy decoding has no near-ties that
    # float rounding could break differently in two implementations.
    torch.manual_seed(seed)
    model = build_model("tiny", vocab_size=len(tokenizer), initializer_range=0.5,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return model.eval()


@pytest.fixture(scope="module")
def one_thread():
    # On a shared, oversubscribed CPU, OpenMP threads spinning against each other make a tiny
    # model's forward pass hundreds of times slower; one thread keeps the tests fast.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

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

# float32's unit roundoff: one rounded operation is off by at most this, relatively.
U32 = 2.0**-24


def loglikelihood_tolerance(model: torch.nn.Module, n_tokens: int, score: float) -> float:
    """How far apart two float32 computations of one log-likelihood (a sum over `n_tokens` tokens,
    `score` in all) may land when they run the same decoder and differ only in the order of the
    sums after it: `LightningLM` against lm-eval's `HFLM`.

    Both run the decoder on the same batches (the same Collator, the same padding), so the hidden
    states entering the LM head are the same computation. From there they differ: `LightningLM`
    runs the LM head on the scored positions only (a matrix product of another shape, which a BLAS
    may block differently) and the log-softmax on other tensors. Worst-case bounds of a sum's
    rounding (Higham, Accuracy and Stability of Numerical Algorithms, ch. 3), so that this holds on
    any CPU, per token:
    - a logit is a sum of d products h_k W_vk; two orders of it differ by at most
      2 d u sum_k |h_k W_vk| <= 2 d u |h| |W_v| (Cauchy-Schwarz), and after the final RMSNorm
      |h| <= sqrt(d) max|g|;
    - log p = z_t - logsumexp(z): the target logit and the logsumexp each move by that much, and
      the logsumexp's own sum of V exponentials (each <= 1 once the maximum is subtracted) rounds
      by at most (V + 2) u in each of the two;
    then the sum over n tokens rounds by at most n u |score| in each.
    A wrong position, token or mask moves a score by whole units, far above this.
    """
    head = model.get_output_embeddings().weight
    vocab, d = head.shape
    final_norm = model.get_decoder().norm.weight
    logit = 2 * d * U32 * d**0.5 * final_norm.abs().max().item() * head.norm(dim=1).max().item()
    return n_tokens * (2 * logit + 2 * (vocab + 2) * U32) + 2 * n_tokens * U32 * abs(score)


@functools.cache
def _trained_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / name).read_text() for name in ("textwrap.py", "string.py", "fractions.py", "calendar.py")]
    return train_tokenizer(texts, vocab_size)


def small_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a few files of the standard library (a fresh copy: tests may modify it)."""
    return copy.deepcopy(_trained_tokenizer(vocab_size))


def tiny_model(tokenizer, seed: int = 0, preset: str = "tiny") -> torch.nn.Module:
    # A wide initialisation spreads the logits, so that greedy decoding has no near-ties that
    # float rounding could break differently in two implementations.
    torch.manual_seed(seed)
    model = build_model(preset, vocab_size=len(tokenizer), initializer_range=0.5,
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

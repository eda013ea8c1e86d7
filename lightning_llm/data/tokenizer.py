"""The tokenizer: a local or hub transformers tokenizer, or a byte-level BPE trained on the corpus and cached.

A byte-level BPE (GPT-2's scheme) never meets an unknown character, so one trained on the Python
standard library in seconds tokenizes any text. It is saved with `save_pretrained`, so an export
carries it and `AutoTokenizer.from_pretrained` loads it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lightning_llm.checkpoint import commit_directory, new_directory

EOS = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of `vocab_size` tokens on `texts`; `<|endoftext|>` is EOS and padding."""
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be at least 257 (256 bytes + EOS), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, model_max_length=1 << 30)


def _limited(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    seen = 0
    for text in texts:
        yield text
        seen += len(text)
        if seen >= max_chars:
            return


def trained_tokenizer(
    texts: Iterable[str], vocab_size: int, key: str, cache_dir: str | os.PathLike, max_chars: int = 8_000_000
) -> PreTrainedTokenizerFast:
    """A BPE trained on (the first `max_chars` characters of) `texts`, cached under `cache_dir` by `key`."""
    digest = hashlib.sha256(f"{key}|{vocab_size}|{max_chars}".encode()).hexdigest()[:16]
    path = Path(cache_dir) / "tokenizers" / f"bpe{vocab_size}-{digest}"
    if not (path / "tokenizer.json").exists():
        tokenizer = train_tokenizer(_limited(texts, max_chars), vocab_size)
        tmp = new_directory(path)  # a temporary sibling; one a killed run left behind is removed here
        try:
            tokenizer.save_pretrained(tmp)
            if not (path / "tokenizer.json").exists():  # else another process finished first: keep its copy
                commit_directory(tmp, path)  # every file fsync'd, then renamed into place
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return load_tokenizer(path)


def load_tokenizer(spec: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local directory or a hub id; make sure it has EOS and a pad token."""
    path = Path(spec)
    if (os.path.sep in str(spec) or str(spec).startswith(".")) and not path.exists():
        raise FileNotFoundError(f"tokenizer {str(spec)!r}: no such directory")
    tokenizer = AutoTokenizer.from_pretrained(str(spec))
    if tokenizer.eos_token is None:
        raise ValueError(f"tokenizer {str(spec)!r} has no EOS token; documents are joined with EOS")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer

"""From a run to a Hugging Face model: rebuild the model of a checkpoint, write an export atomically.

An export is a directory that `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load: safetensors weights, `config.json` and the tokenizer. It is
written with `lightning_llm.checkpoint.atomic_directory` (complete in a temporary sibling before it
replaces the old one by rename), and checkpoints are read with `lightning_llm.checkpoint.load_checkpoint`.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lightning_llm.checkpoint import atomic_directory, describe_nonfinite, load_checkpoint, nonfinite_weights
from lightning_llm.data.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

MODEL_PREFIX = "model."  # the LightningModule holds the HF model as `self.model`


def config_from_dict(data: dict[str, Any]) -> PretrainedConfig:
    data = dict(data)
    return AutoConfig.for_model(data.pop("model_type"), **data)


def model_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The HF model's weights from a LightningModule's state dict (keys without the `model.` prefix)."""
    state = {k[len(MODEL_PREFIX):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(MODEL_PREFIX)}
    if not state:
        raise ValueError(f"the checkpoint holds no weights under {MODEL_PREFIX!r}; keys start with {sorted(checkpoint['state_dict'])[:3]}")
    return state


def check_state_matches(model: nn.Module, state: dict[str, torch.Tensor], what: str = "the checkpoint's weights do not fit its hf_config") -> None:
    """Raise if `state` does not hold exactly `model`'s weights with the same shapes."""
    expected = model.state_dict()
    # Tied weights may be saved under one name only.
    tied = {k for k in expected if k not in state and k.endswith("lm_head.weight") and getattr(model.config, "tie_word_embeddings", False)}
    missing = sorted(set(expected) - set(state) - tied)
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        raise ValueError(
            f"{what}: "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}, "
            f"wrong shape {[(k, tuple(state[k].shape), tuple(expected[k].shape)) for k in wrong[:3]]}"
        )


def model_from_checkpoint(checkpoint: dict[str, Any]) -> PreTrainedModel:
    """Rebuild the HF model a checkpoint was trained with and load its weights."""
    if "hf_config" not in checkpoint:
        raise ValueError("the checkpoint has no 'hf_config': it was not written by a lightning-llm module")
    config = config_from_dict(checkpoint["hf_config"])
    state = model_state_dict(checkpoint)
    # Check names and shapes on the meta device first: a config that does not match the weights
    # (or a default 7B config) must fail before gigabytes are allocated.
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    check_state_matches(skeleton, state)
    # Built on CPU, not meta: non-persistent buffers (rotary frequencies) are not in the state dict.
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(state, strict=True)
    model.tie_weights()
    return model.eval()


def tokenizer_from_checkpoint(checkpoint: dict[str, Any]) -> PreTrainedTokenizerBase | None:
    files = checkpoint.get("tokenizer_files")
    if not files:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        return load_tokenizer(tmp)


ADAPTER_KEY = "lora"  # the checkpoint entry of a LoRA/QLoRA run: how to rebuild the adapted model


def is_adapter_checkpoint(checkpoint: dict[str, Any]) -> bool:
    """Whether a loaded checkpoint was written by a LoRA/QLoRA run (it holds adapters, not a base)."""
    return ADAPTER_KEY in checkpoint


def load_for_inference(source: str | os.PathLike | dict[str, Any]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """A model and tokenizer from an export directory, a checkpoint (file or sharded directory) or
    an already loaded checkpoint. (A LoRA run's adapter checkpoint needs its base too:
    `lightning_llm.callbacks.lora.peft_model_from_checkpoint`.)"""
    if not isinstance(source, dict):
        path = Path(source)
        if path.is_dir() and (path / "config.json").exists():
            return AutoModelForCausalLM.from_pretrained(path).eval(), load_tokenizer(path)
        source = load_checkpoint(path)
    if is_adapter_checkpoint(source):
        raise ValueError("the checkpoint holds LoRA adapters, not a whole model: load it with "
                         "lightning_llm.callbacks.lora.peft_model_from_checkpoint (lightning-llm generate does)")
    return model_from_checkpoint(source), tokenizer_from_checkpoint(source)


SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _with_token_ids(config: PretrainedConfig | GenerationConfig, tokenizer: PreTrainedTokenizerBase,
                    ) -> PretrainedConfig | GenerationConfig:
    """A copy of `config` with the tokenizer's BOS/EOS/pad ids where it has none. An id it has already is kept
    when it agrees with the tokenizer (an EOS list holding the tokenizer's EOS does); one that disagrees names a
    token the model was not trained with, and the tokenizer's replaces it, with a warning."""
    config = copy.deepcopy(config)
    for name in SPECIAL_TOKENS:
        wanted, have = getattr(tokenizer, name), getattr(config, name, None)
        if wanted is None or have == wanted or (isinstance(have, list) and wanted in have):
            continue
        if have is not None:
            log.warning("export: %s %s of the %s is not the tokenizer's (%s): writing the tokenizer's",
                        name, have, type(config).__name__, wanted)
        setattr(config, name, wanted)
    return config


def tokenizer_for_export(tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig) -> PreTrainedTokenizerBase:
    """`tokenizer`, or a copy whose `model_max_length` is the model's window (`max_position_embeddings`) where
    it claims more (the tokenizers trained here say 2^30, transformers' 'unknown' is 1e30): pipelines and
    evaluation harnesses truncate to model_max_length, and a longer input runs past the positions trained."""
    window = getattr(config, "max_position_embeddings", None)
    if window is None or tokenizer.model_max_length <= window:
        return tokenizer
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.model_max_length = window
    return tokenizer


def save_tokenizer_and_token_ids(directory: Path, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
    """Beside the weights `model.save_pretrained` wrote into `directory`: the tokenizer, and (for a whole model,
    not a peft adapter) config.json and generation_config.json that name its special tokens, so a plain
    `model.generate` stops at EOS and pads with the pad token. The live model's configs are left as they are."""
    if isinstance(model, PreTrainedModel):
        _with_token_ids(model.config, tokenizer).save_pretrained(directory)
        _with_token_ids(model.generation_config, tokenizer).save_pretrained(directory)
    tokenizer_for_export(tokenizer, model.config).save_pretrained(directory)


def check_finite(state: dict[str, torch.Tensor], what: str, action: str = "export") -> None:
    """Raise naming the tensors of `state` that hold inf or NaN (floating-point tensors; 4-bit codes are integers)."""
    bad = nonfinite_weights(state)
    if bad:
        raise ValueError(f"refusing to {action} {what!r}: {describe_nonfinite(bad)}. The run diverged; {action} an "
                         "earlier, finite checkpoint")


def save_pretrained_atomic(
    model: nn.Module, out_dir: str | os.PathLike, tokenizer: PreTrainedTokenizerBase | None = None,
    state_dict: dict[str, torch.Tensor] | None = None, overwrite: bool = False,
) -> Path:
    """Write `model` (with `state_dict` if given) and `tokenizer` as a Hugging Face directory, atomically.
    A model with a non-finite weight is refused: the export is what a user deploys, and a NaN in it
    shows only as garbage output later."""
    check_finite(state_dict if state_dict is not None else model.state_dict(), str(out_dir))
    with atomic_directory(out_dir, overwrite) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        if tokenizer is not None:
            save_tokenizer_and_token_ids(tmp, model, tokenizer)
    return Path(out_dir)


def export_checkpoint(checkpoint: str | os.PathLike | dict[str, Any], out_dir: str | os.PathLike,
                      overwrite: bool = False) -> Path:
    """`lightning-llm export`: a checkpoint (a path, or one already loaded) to a Hugging Face directory."""
    if not isinstance(checkpoint, dict):
        checkpoint = load_checkpoint(checkpoint)
    model = model_from_checkpoint(checkpoint)
    return save_pretrained_atomic(model, out_dir, tokenizer_from_checkpoint(checkpoint), overwrite=overwrite)


def check_exportable(module: Any) -> None:
    """Raise unless `module.model` is a whole transformers model, what `export_module` writes."""
    model = getattr(module, "model", None)
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"cannot export {type(module).__name__}.model: it is a {type(model).__name__}, not a transformers "
            "PreTrainedModel. A LoRA/QLoRA run writes its adapter with LoRACallback(adapter_dir=...); "
            "`lightning-llm export --checkpoint CKPT --merge` writes the merged model")


def export_module(module: Any, out_dir: str | os.PathLike, overwrite: bool = True) -> Path | None:
    """Write a LightningModule's live `model` as a Hugging Face directory; returns it on rank 0, None elsewhere.

    All ranks call this: sharded weights (ZeRO, FSDP) are gathered to rank 0, which writes atomically; a
    strategy whose ranks each hold part of the model (pipeline stages) gathers it with its
    `full_model_state_dict(model)`. Weights that are not the whole model its config describes are
    refused, as are non-finite ones."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    check_exportable(module)
    model = module.model
    gather = getattr(module.trainer.strategy if module._trainer is not None else None, "full_model_state_dict", None)
    if gather is not None:
        state = gather(model)
    else:
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if module.global_rank != 0:
        return None
    with torch.device("meta"):  # names and shapes only: no memory
        whole = AutoModelForCausalLM.from_config(model.config)
    check_state_matches(whole, state, f"the weights of {type(module).__name__}.model gathered for the export do not fit its config")
    if gather is not None:  # the live model holds only rank 0's part: write through a whole one
        whole.load_state_dict(state, strict=False, assign=True)
        whole.generation_config = model.generation_config
        model = whole
    return save_pretrained_atomic(model, out_dir, getattr(module, "tokenizer", None), state_dict=state, overwrite=overwrite)

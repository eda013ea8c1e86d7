"""From a run to a Hugging Face model: read checkpoints, rebuild the model, write an export atomically.

An export is a directory that `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load: safetensors weights, `config.json` and the tokenizer. It is
written into a temporary sibling directory and renamed into place, so a failure never leaves a
half-written export behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lightning_llm.data.tokenizer import load_tokenizer

MODEL_PREFIX = "model."  # the LightningModule holds the HF model as `self.model`


def config_from_dict(data: dict[str, Any]) -> PretrainedConfig:
    data = dict(data)
    return AutoConfig.for_model(data.pop("model_type"), **data)


SHARDED_METADATA = "meta.pt"  # the non-tensor part of a sharded checkpoint (loops, callbacks, hyper-parameters)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A Lightning checkpoint as a dict, on CPU: a checkpoint file, or a sharded checkpoint directory
    (ZeROStrategy, PipelineStrategy) joined on this process."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():
        return load_sharded_checkpoint(path)
    return read_checkpoint_file(path)


def load_checkpoint_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """What a checkpoint records besides its tensors (hyper-parameters, loops, data order, hf_config),
    without reading the weights: a file's tensors are memory-mapped, a sharded checkpoint's left on disk."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():
        if not (path / SHARDED_METADATA).is_file():
            raise ValueError(f"checkpoint {str(path)!r} is a directory without {SHARDED_METADATA}: not a sharded checkpoint")
        return read_checkpoint_file(path / SHARDED_METADATA)
    return read_checkpoint_file(path, mmap=True)


def read_checkpoint_file(path: Path, mmap: bool = False) -> dict[str, Any]:
    """`torch.load` of a checkpoint file; a file torch cannot read (truncated, not a checkpoint) is an
    error naming it. (weights_only=False: checkpoints hold the run's own objects, e.g. hyper-parameters.)"""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as err:  # torch raises many kinds (RuntimeError, UnpicklingError, EOFError, ...)
        raise ValueError(f"checkpoint {str(path)!r} cannot be read: it is truncated or not a checkpoint "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from err
    if not isinstance(checkpoint, dict):
        raise ValueError(f"checkpoint {str(path)!r} holds a {type(checkpoint).__name__}, not a Lightning checkpoint")
    return checkpoint


def load_sharded_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A `torch.distributed.checkpoint` directory as one Lightning checkpoint dict, without a process group.

    The strategies write the model's tensors under `"state_dict"` with the LightningModule's own key
    names (whatever the sharding, every key whole in the metadata) and the rest to `meta.pt`. The
    weights are read whole; optimizer states are left out.
    """
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    if not (path / SHARDED_METADATA).is_file() or not (path / ".metadata").is_file():
        raise ValueError(
            f"checkpoint {str(path)!r} is a directory but not a sharded checkpoint (one holds .metadata and "
            f"{SHARDED_METADATA}); give a checkpoint file or a directory written by ZeROStrategy or PipelineStrategy"
        )
    metadata = dcp.FileSystemReader(path).read_metadata()
    template: dict[str, torch.Tensor] = {}
    for flat_key, where in metadata.planner_data.items():
        entry = metadata.state_dict_metadata[flat_key]
        if where[0] == "state_dict" and isinstance(entry, dcp.metadata.TensorStorageMetadata):
            template[where[1]] = torch.empty(entry.size, dtype=entry.properties.dtype)
    state = {"state_dict": template}
    dcp.load(state, checkpoint_id=path, no_dist=True)
    checkpoint = torch.load(path / SHARDED_METADATA, map_location="cpu", weights_only=False)
    checkpoint["state_dict"] = state["state_dict"]
    return checkpoint


def model_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The HF model's weights from a LightningModule's state dict (keys without the `model.` prefix)."""
    state = {k[len(MODEL_PREFIX):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(MODEL_PREFIX)}
    if not state:
        raise ValueError(f"the checkpoint holds no weights under {MODEL_PREFIX!r}; keys start with {sorted(checkpoint['state_dict'])[:3]}")
    return state


def check_state_matches(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Raise if `state` does not hold exactly `model`'s weights with the same shapes."""
    expected = model.state_dict()
    # Tied weights may be saved under one name only.
    tied = {k for k in expected if k not in state and k.endswith("lm_head.weight") and getattr(model.config, "tie_word_embeddings", False)}
    missing = sorted(set(expected) - set(state) - tied)
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        raise ValueError(
            "the checkpoint's weights do not fit its hf_config: "
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


@contextmanager
def atomic_directory(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """A temporary directory beside `out_dir` to write into; it becomes `out_dir` only if the block
    completes, so an error never leaves a half-written export behind."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"export directory {str(out)!r} exists and is not empty; remove it or pass overwrite=True")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_pretrained_atomic(
    model: nn.Module, out_dir: str | os.PathLike, tokenizer: PreTrainedTokenizerBase | None = None,
    state_dict: dict[str, torch.Tensor] | None = None, overwrite: bool = False,
) -> Path:
    """Write `model` (with `state_dict` if given) and `tokenizer` as a Hugging Face directory, atomically."""
    with atomic_directory(out_dir, overwrite) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def export_checkpoint(checkpoint: str | os.PathLike | dict[str, Any], out_dir: str | os.PathLike,
                      overwrite: bool = False) -> Path:
    """`lightning-llm export`: a checkpoint (a path, or one already loaded) to a Hugging Face directory."""
    if not isinstance(checkpoint, dict):
        checkpoint = load_checkpoint(checkpoint)
    model = model_from_checkpoint(checkpoint)
    return save_pretrained_atomic(model, out_dir, tokenizer_from_checkpoint(checkpoint), overwrite=overwrite)


def export_module(module: Any, out_dir: str | os.PathLike, overwrite: bool = True) -> Path | None:
    """Export a LightningModule's live model (all ranks call this: sharded weights are gathered to rank 0)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    state = get_model_state_dict(module.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if module.global_rank != 0:
        return None
    return save_pretrained_atomic(module.model, out_dir, getattr(module, "tokenizer", None), state_dict=state, overwrite=overwrite)

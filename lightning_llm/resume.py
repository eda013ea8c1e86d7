"""Resuming from a checkpoint: what the user typed wins over the checkpoint's hyper-parameters, and a
checkpoint resumes only into the architecture it was trained with.

LightningCLI reads the checkpoint's hyper-parameters and lays them over the whole parsed config, so a
resumed run silently dropped `--model.lr=...` and even trained another model than the config named.
The CLI instead makes them the defaults under the user's config files and command line (see
`LLMCLI._parse_ckpt_path`); these helpers turn a checkpoint into those defaults, list what differs,
and refuse a different architecture. The data order is the data module's to check
(`PretrainDataModule.check_data_order`).
"""

from __future__ import annotations

import inspect
from typing import Any

from lightning_llm.checkpoint import load_checkpoint_metadata
from lightning_llm.models import build_config

# Config fields that decide the shapes of the weights (the ones a family of causal LMs shares).
ARCHITECTURE_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads", "head_dim", "tie_word_embeddings", "num_local_experts", "num_experts",
                       "moe_intermediate_size")


def plain(value: Any) -> Any:
    """`value` with tuples as lists and namespaces as dicts, so a saved and a parsed value compare equal."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    return value


def saved_model_config(checkpoint: dict[str, Any], current_class_path: str, model_class: type) -> dict[str, Any] | None:
    """The checkpoint's module hyper-parameters as a `{class_path, init_args}` default, or None if it has none.

    Only options that the class still takes are kept (a checkpoint of an older version may hold others)."""
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    hparams.pop("_instantiator", None)
    class_path = hparams.pop("_class_path", None) or current_class_path
    if not hparams:
        return None
    accepted = inspect.signature(model_class.__init__).parameters
    return {"class_path": class_path, "init_args": {key: value for key, value in hparams.items() if key in accepted}}


def changes_table(path: str, saved: dict[str, Any], now: dict[str, Any]) -> str:
    """The options whose value differs between the checkpoint and this run, as a table."""
    rows = [(key, repr(saved[key]), repr(now[key])) for key in now if key in saved and plain(saved[key]) != plain(now[key])]
    if not rows:
        return f"resuming from {path}: the module's options equal the checkpoint's"
    width = max(len("option"), *(len(key) for key, _, _ in rows))
    value_width = max(len("checkpoint"), *(len(old) for _, old, _ in rows))
    lines = [f"resuming from {path}: these options differ from the checkpoint's (the config and command line win)",
             f"  {'option':<{width}}  {'checkpoint':<{value_width}}  now"]
    lines += [f"  {key:<{width}}  {old:<{value_width}}  {new}" for key, old, new in rows]
    return "\n".join(lines)


def architecture(spec: str) -> dict[str, Any]:
    """The architecture fields of a model spec (a `.ckpt` base: its recorded config; else `build_config`)."""
    config = (load_checkpoint_metadata(spec).get("hf_config") or {}) if str(spec).endswith(".ckpt") else build_config(spec).to_dict()
    return {key: config[key] for key in ARCHITECTURE_FIELDS if key in config}


def check_same_architecture(path: str, checkpoint: dict[str, Any], saved: dict[str, Any], now: dict[str, Any]) -> None:
    """Raise when this run's model (`now`'s `model` and `vocab_size`) is not the checkpoint's architecture."""
    trained = checkpoint.get("hf_config") or {}
    if now.get("vocab_size") is not None and trained.get("vocab_size") not in (None, now["vocab_size"]):
        raise ValueError(f"{path} was trained with vocab_size={trained['vocab_size']}, but this run asks for "
                         f"vocab_size={now['vocab_size']}: a checkpoint resumes only into the model it was trained as; "
                         "drop the vocab_size override, or start a new run without --ckpt_path")
    if plain(saved.get("model")) == plain(now.get("model")):
        return
    old = {key: trained[key] for key in ARCHITECTURE_FIELDS if key in trained}
    try:
        new: dict[str, Any] | str = architecture(now["model"])
    except (OSError, ValueError) as err:
        new = f"cannot be resolved: {err}"
    if old and isinstance(new, dict) and all(new.get(key) == value for key, value in old.items()):
        return  # the same model under another name (e.g. a moved config file)
    raise ValueError(
        f"{path} was trained with model={saved.get('model')!r} ({summary(old)}), but this run asks for "
        f"model={now.get('model')!r} ({summary(new)}): a checkpoint resumes only into the architecture it was "
        f"trained with. Drop the model override (without one, the checkpoint's is used), or start a new run "
        "without --ckpt_path"
    )


def summary(arch: dict[str, Any] | str) -> str:
    if isinstance(arch, str):
        return arch
    return ", ".join(f"{key} {value}" for key, value in arch.items() if key != "model_type") or "architecture not recorded"


def check_steps_left(max_steps: int, step: int | None, path: str) -> None:
    """Raise when the trainer's `max_steps` is below the step the checkpoint at `path` is at: the resumed run
    would train nothing, end at once and export the checkpoint's model as this run's. (Equal is allowed: a
    requeued job whose run had finished resumes and ends. -1, Lightning's "no limit", is allowed.)"""
    if step is not None and 0 <= max_steps < step:
        raise ValueError(f"trainer.max_steps={max_steps} is below the step {path} is at ({step}): the resumed run "
                         f"would train nothing. Give --trainer.max_steps > {step} to train on from it, or use it as it "
                         "is (lightning-llm export, generate, validate)")

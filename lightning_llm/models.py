"""Build a Hugging Face causal LM from a preset name, a config file, a local directory or a hub id.

Every model of the project is a `transformers` causal LM, so that what a run exports loads with
`AutoModelForCausalLM.from_pretrained`. `build_config` resolves a spec to a config without
allocating weights; `build_model` creates the model under whatever device context is active, which
is how a sharding strategy creates it on the meta device inside `configure_model`.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

import lightning_llm.attention  # noqa: F401  registers attn_implementation="lightning_fa2" with transformers

# Llama-style shapes (SwiGLU MLP, RMSNorm, rotary positions, tied embeddings) unless `model_type` names
# another architecture. Parameter counts in the names are for the preset's own vocabulary; a tokenizer
# with another vocabulary changes them.
PRESETS: dict[str, dict[str, Any]] = {
    # For tests: a few hundred thousand parameters, GQA with 2 query heads per K/V head.
    "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, vocab_size=4096),
    # The README's main job: ~5M parameters, trains on a 2-core CPU in minutes.
    "llama-5m": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=4, max_position_embeddings=1024, vocab_size=8192),
    "llama-20m": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                      num_key_value_heads=6, max_position_embeddings=2048, vocab_size=32000),
    # GPT-2 small's width and depth with a Llama block: 124M with GPT-2's padded vocabulary.
    "llama-124m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                       num_key_value_heads=12, max_position_embeddings=2048, vocab_size=50304),
    # Llama 3.2 1B's shape with a 32k vocabulary: 1.0B parameters.
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, max_position_embeddings=4096, vocab_size=32000, rope_theta=500000.0),
    # Mixtures of experts on Qwen3-MoE's block (a router picks top-k of num_experts SwiGLU experts per
    # token; no shared expert; q/k RMSNorm): every layer is sparse, dropless (each expert takes every
    # token routed to it). `intermediate_size` is the width of a dense layer, used only where
    # `mlp_only_layers` asks for one: the active width (top-k x expert width), so it costs the same.
    # For tests: 4 experts, top-2, a few hundred thousand parameters.
    "tiny-moe": dict(model_type="qwen3_moe", hidden_size=64, moe_intermediate_size=96, intermediate_size=192,
                     num_experts=4, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=512, vocab_size=4096),
    # 8 experts, top-2: 100M parameters in all, 44M active per token (32k vocabulary).
    "moe-100m": dict(model_type="qwen3_moe", hidden_size=512, moe_intermediate_size=768, intermediate_size=1536,
                     num_experts=8, num_experts_per_tok=2, num_hidden_layers=8, num_attention_heads=8,
                     num_key_value_heads=8, max_position_embeddings=2048, vocab_size=32000),
}

_PRESET_DEFAULTS = dict(tie_word_embeddings=True, rms_norm_eps=1e-5, initializer_range=0.02,
                        attention_bias=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
# By model type: fields one architecture has and another lacks. The MoE presets renormalise the top-k
# gate weights to sum to 1 (Mixtral's choice).
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(mlp_bias=False),
    "qwen3_moe": dict(norm_topk_prob=True),
}


def _is_local(spec: str) -> bool:
    # A path that exists, or one written as a path (absolute, ./ ../ ~) or a config file; anything else
    # that is not a preset is a hub id ("org/name").
    return Path(spec).exists() or spec.startswith((os.path.sep, ".", "~")) or spec.endswith((".json", ".yaml", ".yml"))


def unknown_model(spec: str, reason: str) -> ValueError:
    """The error for a spec that is neither a preset, a local path nor a loadable hub id: the choices and how to name each."""
    close = difflib.get_close_matches(spec.lower(), list(PRESETS), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(
        f"unknown model {spec!r} ({reason}){hint} Give a preset ({', '.join(PRESETS)}), a local config file or "
        f"model directory (it must exist; write a relative one as ./{spec}), or a hub id such as 'org/name' "
        "(needs a network, or the model in the local hub cache)"
    )


def build_config(spec: str | os.PathLike | PretrainedConfig, **overrides: Any) -> PretrainedConfig:
    """Resolve `spec` to a transformers config; `overrides` set config fields (e.g. `vocab_size`).

    `spec` is a preset name (see `PRESETS`), a `config.json` file, a local model directory, a hub id
    (needs a network or the local hub cache) or a config object (copied, never mutated).
    """
    if isinstance(spec, PretrainedConfig):
        config = spec.__class__.from_dict(spec.to_dict())
    elif str(spec) in PRESETS:
        fields = dict(PRESETS[str(spec)])
        model_type = fields.pop("model_type", "llama")
        config = AutoConfig.for_model(model_type, **{**_PRESET_DEFAULTS, **_FAMILY_DEFAULTS[model_type], **fields})
    elif _is_local(str(spec)):
        path = Path(spec)
        if not path.exists():
            raise FileNotFoundError(
                f"model {str(spec)!r}: no such file or directory. Give a preset ({', '.join(PRESETS)}), "
                "a config.json, a model directory or a hub id ('org/name')."
            )
        if path.is_file():
            config = _config_from_file(path)
        else:
            config = AutoConfig.from_pretrained(path)
    elif str(spec).lower() in PRESETS:  # a preset in other letters: never worth a hub lookup
        raise unknown_model(str(spec), "preset names are lower-case")
    else:
        try:
            config = AutoConfig.from_pretrained(str(spec))
        except OSError as err:
            raise unknown_model(str(spec), f"not a preset nor a local path, and as a hub id: {str(err).splitlines()[0]}") from err
    unknown = [key for key in overrides if not hasattr(config, key)]
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown} for {config.model_type!r} config")
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def _config_from_file(path: Path) -> PretrainedConfig:
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(path.read_text())
    else:
        data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"model config {str(path)!r} must hold a mapping, got {type(data).__name__}")
    model_type = data.pop("model_type", "llama")
    return AutoConfig.for_model(model_type, **data)


def has_weights(spec: str | os.PathLike | PretrainedConfig) -> bool:
    """Whether `spec` names pretrained weights (a local model directory with weight files, or a hub id)."""
    if isinstance(spec, PretrainedConfig) or str(spec) in PRESETS:
        return False
    path = Path(spec)
    if path.is_dir():
        return any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))
    return not path.is_file() and not _is_local(str(spec))


def build_model(
    spec: str | os.PathLike | PretrainedConfig,
    *,
    pretrained: bool | None = None,
    attn_implementation: str | None = None,
    dtype: torch.dtype | None = None,
    **overrides: Any,
) -> PreTrainedModel:
    """Create a causal LM from `spec` (see `build_config`).

    `pretrained=None` loads weights when the spec has them and initialises randomly otherwise. Under
    `torch.device("meta")` a randomly initialised model allocates nothing: a sharding strategy
    materialises only its shard; it gets the project's initialisation (`use_fresh_init`) unless `initializer_range`
    is among the overrides, in which case transformers' own init draws with that std. `attn_implementation` names an entry of transformers' attention
    registry ("sdpa", "eager", or the one this project registers, "lightning_fa2").
    """
    if pretrained is None:
        pretrained = has_weights(spec)
    kwargs: dict[str, Any] = {}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if pretrained:
        if overrides:
            kwargs.update(overrides)
        return AutoModelForCausalLM.from_pretrained(str(spec), dtype=dtype or "auto", **kwargs)
    # _from_config sets attn_implementation on the config it is given: build a private copy.
    config = build_config(spec, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    if "initializer_range" in overrides:  # a std the user typed is theirs: transformers' init draws with it
        return model
    return use_fresh_init(model)


# The linear layers that write into the residual stream, by their name in transformers' decoders (Llama,
# Mistral, Qwen, Gemma, Phi-3, OLMo): the attention output and the MLP's down projection.
RESIDUAL_PROJECTIONS = ("o_proj", "down_proj")


class InitStds(NamedTuple):
    """The stds a fresh model's weights are drawn with (`init_stds`)."""

    embedding: float  # the token embedding (and the output head tied to it)
    linear: float  # every other linear layer: q, k, v, the MLP's gate and up projections, an untied head
    residual: float  # the projections that add to the residual stream (`RESIDUAL_PROJECTIONS`)


def init_stds(config: PretrainedConfig) -> InitStds:
    """The stds of the project's initialisation of fresh models, for width `d = hidden_size`.

    The small init (Nguyen & Salazar 2019, as GPT-NeoX and litgpt draw it), `sqrt(2 / (5 d))`, for the
    embeddings and every linear layer: it keeps a layer's output variance near its input's. The projections
    that add to the residual stream start at zero (Fixup and ReZero's identity start; GPT-2 and the small init
    only shrink them, by `sqrt(2L)` or `L`): every block begins as the identity, so the first steps train the
    embeddings and each block's branch grows from nothing at the rate the optimizer sets, with no random
    branch output to undo first. Their inputs are random, so their gradients are not zero and no two of their
    weights move alike. With a tied head the start predicts each token to follow itself (its embedding is
    nearest itself), so the first loss is above ln(vocabulary) (10.2 on llama-5m, against 8.5 with the small
    init); from the first steps on it is lower than the small init's and litgpt's on the same batches
    (benchmarks/init_loss.py; the README gives the figures).
    """
    std = math.sqrt(2 / (5 * config.hidden_size))
    return InitStds(embedding=std, linear=std, residual=0.0)  # (embedding = linear: a tied head is both)


def use_fresh_init(model: PreTrainedModel) -> PreTrainedModel:
    """Give a randomly initialised model the project's initialisation (`init_stds`); norms stay one.

    The rule becomes the `_init_weights` of every Hugging Face model inside it, so a sharding strategy that
    materialises the model from the meta device later (`ZeROStrategy`: the owner's `_init_weights` per module)
    draws with the same rule; weights that exist already are drawn now, in the model's module order so that a
    seed gives the same weights every run. Never for pretrained weights: `build_model` calls it only on a
    model it initialised. A model without two such linear layers per block is left as transformers made it:
    GPT-2 has its own scaled rule, and a mixture of experts keeps its experts in fused tensors that this
    rule does not reach (half a rule would mix two scales in one block).
    """
    residual = [module for name, module in model.named_modules()
                if name.rsplit(".", 1)[-1] in RESIDUAL_PROJECTIONS and isinstance(module, torch.nn.Linear)]
    if len(residual) != 2 * model.config.num_hidden_layers:
        return model
    rule = partial(_fresh_init, frozenset(residual), init_stds(model.config))
    for owner in model.modules():
        if isinstance(owner, PreTrainedModel):
            owner._init_weights = partial(_init_then, owner._init_weights, rule)
    with torch.no_grad():
        for module in model.modules():
            if not any(p.is_meta for p in module.parameters(recurse=False)):
                rule(module)
    return model


def _fresh_init(residual: frozenset, stds: InitStds, module: torch.nn.Module) -> None:
    # torch's init, not transformers': the latter skips tensors flagged as already initialised. (A head tied to
    # the embedding is drawn twice, as the embedding and as a linear layer: one std, as `init_stds` keeps them.)
    if isinstance(module, torch.nn.Embedding):
        torch.nn.init.normal_(module.weight, mean=0.0, std=stds.embedding)
        if module.padding_idx is not None:
            module.weight[module.padding_idx].zero_()  # as transformers does: the padding token embeds to zero
    elif isinstance(module, torch.nn.Linear):
        torch.nn.init.normal_(module.weight, mean=0.0, std=stds.residual if module in residual else stds.linear)
        if module.bias is not None:
            torch.nn.init.zeros_(module.bias)


def _init_then(hf_init_weights, rule, module: torch.nn.Module) -> None:
    hf_init_weights(module)  # norms, rotary buffers and anything the rule does not cover
    rule(module)


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total

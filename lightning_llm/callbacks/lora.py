"""LoRA and QLoRA as Lightning callbacks: peft adapters on a module's causal LM, adapter-only
checkpoints, named adapters to swap, and merge-and-export.

LoRA freezes each targeted weight W0 and learns a low-rank update, W = W0 + (alpha / r) B A, with B
starting at zero, so training starts from the base model's function. QLoRA also stores the frozen
W0 in 4-bit NormalFloat (NF4, blocks of 64 weights with one absmax each) and quantizes those absmax
constants again in blocks of 256 (double quantization: 32 / 64 = 0.5 bits of overhead per weight
become 8 / 64 + 32 / (64 * 256) = 0.127); matmuls dequantize to the compute dtype.

peft does the adapters and bitsandbytes the 4-bit storage; this file decides when they are applied
(in the module's `configure_model`, through `transform_model`, so the optimizer only ever sees the
adapter), what a checkpoint holds (the adapters and their optimizer state, plus where the base comes
from), and how an adapter is merged back into a plain Hugging Face model.
"""

from __future__ import annotations

import copy
import math
import os
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import BitsAndBytesConfig, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.integrations.bitsandbytes import dequantize_and_replace
from transformers.pytorch_utils import Conv1D

from lightning_llm.checkpoint import atomic_directory, load_checkpoint
from lightning_llm.export import (
    ADAPTER_KEY,
    MODEL_PREFIX,
    check_finite,
    is_adapter_checkpoint,
    save_pretrained_atomic,
    tokenizer_for_export,
    tokenizer_from_checkpoint,
)
from lightning_llm.extras import require
from lightning_llm.models import PRESETS, build_model, has_weights
from lightning_llm.moe import is_experts

if TYPE_CHECKING:
    import bitsandbytes as bnb

NF4_BLOCKSIZE = 64  # weights per absmax in QLoRA's NF4 (the paper's block size)
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# the optimizers `LoRACallback(optimizer=...)` can swap in: name -> class in `bitsandbytes.optim`
OPTIMIZERS = {"adamw8bit": "AdamW8bit", "paged_adamw": "PagedAdamW", "paged_adamw8bit": "PagedAdamW8bit"}


# -- which layers ---------------------------------------------------------------------------------


def is_4bit(obj: Any, kind: Literal["Linear4bit", "Params4bit"] = "Linear4bit") -> bool:
    """Whether `obj` is a bitsandbytes `Linear4bit` layer (or `Params4bit` weight). Without bitsandbytes imported
    no 4-bit object can exist, so plain LoRA asks this without importing it (bitsandbytes is the `qlora` extra)."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(obj, getattr(bnb.nn, kind))


def linear_layer_names(model: nn.Module) -> list[str]:
    """Qualified names of the linear layers LoRA can adapt: every linear but the output embedding
    (a bitsandbytes `Linear4bit` is an `nn.Linear` too), and transformers' `Conv1D` layers, GPT-2's
    linear layers with a transposed weight (peft adapts them as it adapts `nn.Linear`)."""
    output = model.get_output_embeddings() if isinstance(model, PreTrainedModel) else None
    return [name for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, Conv1D)) and m is not output and ".lora_" not in name]


def check_target_modules(model: nn.Module, target_modules: str | list[str]) -> None:
    """Raise, listing the layers that exist, when `target_modules` would adapt nothing."""
    names = linear_layer_names(model)
    kinds = sorted({n.rsplit(".", 1)[-1] for n in names})
    if not names:
        raise ValueError(f"{type(model).__name__} has no linear layers for LoRA to adapt")
    if target_modules == "all-linear":
        return
    if isinstance(target_modules, str):  # peft reads a string as a regular expression over full names
        if not any(re.fullmatch(target_modules, n) for n in names):
            raise ValueError(f"target_modules {target_modules!r} matches no linear layer; the model has {kinds} (e.g. {names[0]!r})")
        return
    # peft matches a list entry against the end of a module's qualified name
    missing = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ValueError(f"target_modules {missing} match no linear layer; the model's linear layers are {kinds}")


def expert_weight_names(model: nn.Module) -> list[str]:
    """Qualified names of the fused 3-D expert weights of a mixture-of-experts model (transformers' experts
    modules: `gate_up_proj` [experts, 2 x width, hidden] and `down_proj` [experts, hidden, width]), which are
    parameters, not linear layers, so "all-linear" never adapts them; empty for a dense model."""
    return [f"{name}.{weight}" for name, m in model.named_modules() if is_experts(m) for weight in ("gate_up_proj", "down_proj")]


def with_expert_targets(config: LoraConfig, model: nn.Module, experts: bool) -> LoraConfig:
    """`config` with the expert weights of a mixture-of-experts `model` adapted or not (`LoRACallback(experts=...)`).

    peft reads "all-linear" on a transformers-5 MoE as transformers 4 meant it, when experts and router were linear
    layers, and silently adds their fused weights (`target_parameters`); here "all-linear" is resolved to the linear
    layers themselves first, so the experts are adapted only when asked: then through `target_parameters`, one
    low-rank update per expert, (alpha / r) B_e A_e added to each expert's matrix."""
    names = expert_weight_names(model)
    if experts and not names:
        raise ValueError(f"experts=True adapts the experts of a mixture-of-experts model, and {type(model).__name__} "
                         "has none (fused 3-D gate_up_proj / down_proj): use experts=False")
    if not names:
        return config
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    targets = config.target_modules
    if targets == "all-linear":
        targets = sorted({n.removesuffix(".base_layer") for n in linear_layer_names(base)})
    return replace(config, target_modules=targets, target_parameters=names if experts else None)


# -- QLoRA storage --------------------------------------------------------------------------------


def quantize_4bit(model: nn.Module, quant_type: str = "nf4", double_quant: bool = True,
                  compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace every adaptable linear layer by a bitsandbytes `Linear4bit` holding its weight in 4 bits.

    The output embedding stays as it is (it is tied to the input embedding in the presets, and QLoRA
    keeps it in 16/32 bits). Quantization is deterministic, so the same base quantizes to the same bits.
    """
    bnb = require("bitsandbytes", "QLoRA's 4-bit base")
    names = linear_layer_names(model)
    if not names:
        raise ValueError(f"QLoRA quantizes linear layers, and {type(model).__name__} has none")
    conv1d = sorted({name.rsplit(".", 1)[-1] for name in names if isinstance(model.get_submodule(name), Conv1D)})
    if conv1d:
        # A 4-bit layer holds the weight as nn.Linear does; merged back, it would no longer fit the Conv1D
        # (transposed) weights the model's own checkpoint format expects.
        raise ValueError(f"QLoRA quantizes torch.nn.Linear layers, and {type(model).__name__}'s {conv1d} are "
                         "transformers Conv1D layers (GPT-2's transposed linear layers): use LoRACallback on this model")
    for name in names:
        linear = model.get_submodule(name)
        if isinstance(linear, bnb.nn.Linear4bit):  # loaded in 4 bits already (`QLoRACallback.model_load_kwargs`)
            dequantize_in_every_matmul(linear)
            continue
        if linear.weight.is_meta:
            raise ValueError(f"cannot quantize {name!r}: its weight is on the meta device (not materialized yet)")
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type=quant_type,
                              device="meta")
        # Params4bit quantizes when moved to a real device: here, the device the weight is already on.
        q.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, blocksize=NF4_BLOCKSIZE,
                                     compress_statistics=double_quant, quant_type=quant_type, module=q).to(linear.weight.device)
        q.bias = linear.bias
        model.set_submodule(name, dequantize_in_every_matmul(q))
    model.is_loaded_in_4bit = True  # what peft reads to wrap Linear4bit layers and prepare k-bit training
    return model


def dequantize_in_every_matmul(layer: bnb.nn.Linear4bit) -> bnb.nn.Linear4bit:
    """Keep `layer` on bitsandbytes' dequantize-then-matmul path on every CPU, in training and inference.

    On CPUs with AVX512-BF16, `Linear4bit.forward` repacks the weight in place into a CPU-only layout the first
    time it runs without gradients (validation, generation, a merge's probe) and from then on multiplies in
    bf16 with that layout. The repacking asserts that the output size is a multiple of 32 (llama-5m's 688 is
    not); the bf16 product differs from the compute dtype's; `dequantize_4bit` (what peft's and transformers'
    merges call) reads the repacked bytes as NF4 codes and returns garbage; and the packed matmul gives no
    gradient to its input, so training after a validation would stop the gradient at every base layer. The
    switch is this layer's own attribute: other bitsandbytes layers in the process are left as they are.
    """
    layer.support_avx512bf16_for_cpu = False
    dequantize_whole_blocks_on_cpu(sys.modules["bitsandbytes"])
    return layer


def dequantize_whole_blocks_on_cpu(bnb: Any) -> None:
    """Make bitsandbytes' CPU 4-bit matmul and dequantization read a 2-D weight as it was quantized, when its
    rows are not whole blocks of 64.

    Quantization numbers the blocks over the flattened weight, so a block can span two rows. bitsandbytes
    0.50's native CPU dequantization (under `dequantize_4bit` and the `gemm_4bit` of every 4-bit matmul) reads
    the weight row by row: where a row's length is even and not a multiple of the block size (llama-5m's
    down_proj, 688 inputs), the weights after the first row get other blocks' scales, and the layer computes
    with 2.7x the NF4 error (RMS 0.25 against 0.09 on a standard normal weight), silently, in training,
    inference and merges alike. Dequantizing the codes as the flat vector they were quantized as, then
    viewing it in the weight's shape, gives bitsandbytes' own pure-PyTorch result exactly.

    This replaces `bitsandbytes.functional.dequantize_4bit` (what bitsandbytes' backward, peft's and
    transformers' merges call) and `bitsandbytes.matmul_4bit` (what `Linear4bit.forward` calls) by wrappers
    that change CPU calls on such shapes only, and only where a check on two rows of 96 shows that the
    installed bitsandbytes misreads them (a fixed release is left alone).
    """
    functional = bnb.functional
    if getattr(functional.dequantize_4bit, "whole_blocks", None) is not None:
        return  # checked (and wrapped if needed) already
    original_dequantize, original_matmul = functional.dequantize_4bit, bnb.matmul_4bit

    def flat(quant_state):
        state = copy.copy(quant_state)
        state.shape = torch.Size([math.prod(quant_state.shape)])
        return state

    def spans_rows(tensor: torch.Tensor, quant_state) -> bool:
        return (quant_state is not None and tensor.device.type == "cpu" and len(quant_state.shape) > 1
                and quant_state.shape[-1] % quant_state.blocksize != 0
                and not getattr(quant_state, "packing_format_for_cpu", False))

    weight = torch.randn(2, 96, generator=torch.Generator().manual_seed(0))
    codes, state = functional.quantize_4bit(weight, blocksize=NF4_BLOCKSIZE, quant_type="nf4")
    if torch.equal(original_dequantize(codes, state), original_dequantize(codes, flat(state)).view(2, 96)):
        original_dequantize.whole_blocks = False
        return

    def dequantize_4bit(A, quant_state=None, absmax=None, out=None, blocksize=None, quant_type="fp4"):
        if absmax is None and out is None and spans_rows(A, quant_state):
            return original_dequantize(A, flat(quant_state)).view(quant_state.shape)
        return original_dequantize(A, quant_state, absmax, out, blocksize, quant_type)

    def matmul_4bit(A, B, quant_state, out=None, bias=None):
        if out is None and spans_rows(A, quant_state):
            return _DequantizeThenMatmul.apply(A, B, bias, quant_state)
        return original_matmul(A, B, quant_state, out=out, bias=bias)

    dequantize_4bit.__doc__, matmul_4bit.__doc__ = original_dequantize.__doc__, original_matmul.__doc__
    dequantize_4bit.whole_blocks = matmul_4bit.whole_blocks = True
    functional.dequantize_4bit, bnb.matmul_4bit = dequantize_4bit, matmul_4bit


class _DequantizeThenMatmul(torch.autograd.Function):
    """x W^T + b with W dequantized from its 4-bit codes in the forward and again in the backward, as
    bitsandbytes' own 4-bit matmul does (only the codes are kept for the backward, not W)."""

    @staticmethod
    def forward(ctx, x, codes, bias, quant_state):
        functional = sys.modules["bitsandbytes"].functional
        ctx.save_for_backward(codes)
        ctx.quant_state = quant_state
        return nn.functional.linear(x, functional.dequantize_4bit(codes, quant_state).to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        functional = sys.modules["bitsandbytes"].functional
        (codes,) = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ functional.dequantize_4bit(codes, ctx.quant_state).to(grad.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, None, grad_bias, None


def quantization_constants(layer: bnb.nn.Linear4bit) -> list[torch.Tensor]:
    """The tensors a 4-bit layer stores beside its codes: the per-block absmax and, with double
    quantization, the second-level absmax and the offset. The code books (16 NF4 values, 256 for
    the 8-bit absmax code) are fixed tables, the same for every layer, and are not counted."""
    state = layer.weight.quant_state
    return [state.absmax, state.state2.absmax, state.offset] if state.nested else [state.absmax]


def quantized_bits_per_parameter(model: nn.Module) -> float:
    """Bits of storage per quantized weight: the 4-bit codes and their quantization constants."""
    bits, params = 0, 0
    for m in model.modules():
        if is_4bit(m):
            params += m.in_features * m.out_features
            bits += 8 * sum(t.numel() * t.element_size() for t in [m.weight.data, *quantization_constants(m)])
    if params == 0:
        raise ValueError("the model has no 4-bit layers")
    return bits / params


def dequantize_4bit(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Replace each `Linear4bit` by an `nn.Linear` holding its dequantized weight in `dtype`."""
    dequantize_and_replace(model, BitsAndBytesConfig(load_in_4bit=True), dtype=dtype)
    model.is_loaded_in_4bit = False
    return model


# -- adapters -------------------------------------------------------------------------------------


def as_peft_model(model: nn.Module) -> PeftModel:
    """The PeftModel of a LightningModule (its `.model`) or the model itself."""
    inner = getattr(model, "model", None) if isinstance(model, LightningModule) else model
    if not isinstance(inner, PeftModel):
        raise TypeError(f"expected a peft model (or a module whose .model is one), got {type(inner).__name__}")
    return inner


def add_adapter(model: nn.Module, config: LoraConfig, adapter_name: str) -> PeftModel:
    """Add a LoRA adapter named `adapter_name` and make it the active, trainable one (the others freeze).

    On a plain model this wraps it with peft (freezing the base); on a PeftModel it adds one more
    named adapter, or re-activates the adapter of that name if it exists.
    """
    if isinstance(model, PeftModel):
        check_target_modules(model.get_base_model(), config.target_modules)
        if adapter_name not in model.peft_config:
            model.add_adapter(adapter_name, config)
    else:
        check_target_modules(model, config.target_modules)
        model = get_peft_model(model, config, adapter_name=adapter_name)
    model.set_adapter(adapter_name)
    return model


def use_adapter(model: nn.Module, adapter_name: str) -> None:
    """Swap tasks: make `adapter_name` the adapter the model computes with."""
    peft_model = as_peft_model(model)
    if adapter_name not in peft_model.peft_config:
        raise ValueError(f"no adapter named {adapter_name!r}; the model has {sorted(peft_model.peft_config)}")
    peft_model.set_adapter(adapter_name)


def adapter_keys(model: nn.Module, prefix: str = "") -> set[str]:
    """State-dict keys of every adapter's weights (and any trainable parameter), under `prefix`."""
    peft_model = as_peft_model(model)
    names = [f".{name}." for name in peft_model.peft_config]
    keys = {k for k in peft_model.state_dict() if any(n in k for n in names)}
    keys |= {k for k, p in peft_model.named_parameters() if p.requires_grad}
    return {prefix + k for k in keys}


def check_adapter_fits(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Raise when adapter weights do not have the shapes of this model's adapter layers."""
    own = model.state_dict()
    bad = [f"{k}: adapter {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
           if k in own and own[k].shape != v.shape]
    if bad:
        raise ValueError(f"the adapter was trained on a base with other shapes ({len(bad)} mismatching tensors): "
                         + "; ".join(bad[:3]))


def gathered_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter's weights, whole: under a sharding strategy (`fully_shard`) they are `DTensor`
    shards, gathered here (a collective: every rank calls this, in the same order)."""
    peft_model = as_peft_model(model)
    keys = adapter_keys(peft_model)
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in peft_model.state_dict().items() if k in keys}


def base_reference(spec: str | os.PathLike | PretrainedConfig | None) -> str | None:
    """How an adapter names its base so that it loads from any working directory: a local path made absolute
    (as typed at training it is relative to that run's directory), a preset or hub id as it is; None for a
    config object (a random initialisation, which nothing names)."""
    if isinstance(spec, PretrainedConfig):
        return None
    if spec is None or str(spec) in PRESETS or not Path(spec).exists():
        return None if spec is None else str(spec)
    return str(Path(spec).resolve())


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, adapter_name: str | None = None,
                 tokenizer: PreTrainedTokenizerBase | None = None,
                 state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write adapters in peft's format (`PeftModel.from_pretrained(base, out_dir)` loads them),
    from `state_dict` if given (the gathered weights of a sharded model).

    peft writes the adapter named "default" into `out_dir` and any other into `out_dir/<name>`.
    """
    peft_model = as_peft_model(model)
    selected = None if adapter_name is None else [adapter_name]
    for config in peft_model.peft_config.values():
        config.base_model_name_or_path = base_reference(config.base_model_name_or_path)
    peft_model.save_pretrained(str(out_dir), selected_adapters=selected, safe_serialization=True, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer_for_export(tokenizer, peft_model.get_base_model().config).save_pretrained(str(out_dir))
    return Path(out_dir)


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> PeftModel:
    """Load an adapter saved by `save_adapter` onto `model` (a base model or a PeftModel)."""
    try:
        if isinstance(model, PeftModel):
            model.load_adapter(str(path), adapter_name=adapter_name)
            return model
        return PeftModel.from_pretrained(model, str(path), adapter_name=adapter_name)
    except RuntimeError as err:
        if "size mismatch" not in str(err):
            raise
        lines = [line.strip() for line in str(err).splitlines() if "size mismatch" in line]
        raise ValueError(f"adapter {str(path)!r} was trained on a base with other shapes than this "
                         f"{type(model).__name__}: " + "; ".join(lines[:3])) from err


def merge_adapter(model: nn.Module, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """The active adapter merged into its base, as a plain transformers model (consumes `model`).

    A 4-bit base is dequantized first, and the merge happens in `dtype` (default: the layers'
    compute dtype): re-quantizing the merged weight, as merging into a Linear4bit would, adds a
    second rounding error that the unmerged model does not have.
    """
    peft_model = as_peft_model(model)
    if not getattr(peft_model.get_base_model(), "is_loaded_in_4bit", False):
        return peft_model.merge_and_unload()
    name = peft_model.active_adapter
    config = peft_model.peft_config[name]
    state = {k: v for k, v in peft_model.state_dict().items() if f".{name}." in k}
    dtype = dtype or next(m.compute_dtype for m in peft_model.modules() if is_4bit(m))
    base = dequantize_4bit(peft_model.unload(), dtype).to(dtype)
    merged = get_peft_model(base, config, adapter_name=name)
    merged.load_state_dict(state, strict=False)
    return merged.merge_and_unload()


def config_dict(config: LoraConfig) -> dict[str, Any]:
    """A LoraConfig as plain data (lists for sets, no enum) that `LoraConfig(**data)` rebuilds."""
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items() if k != "peft_type"}


def check_experts_option(experts: bool, dropout: float) -> None:
    if not isinstance(experts, bool):
        raise ValueError(f"experts must be True or False, got {experts!r}")
    if experts and dropout:
        raise ValueError(f"experts=True with dropout={dropout!r}: peft's adapters on fused expert weights have no "
                         "dropout (the input cannot be factored out of the merged weight); set dropout=0.0")


# -- the callbacks --------------------------------------------------------------------------------


class LoRACallback(Callback):
    """Finetune a LoRA adapter on the module's model; checkpoints hold the adapter only.

    In the module's `configure_model` the model is wrapped with peft (its base frozen) before a
    strategy shards it and before `configure_optimizers` builds the optimizer from the trainable
    parameters, which are then the adapter's alone. Given a module whose model already carries
    adapters (a second `fit`), it adds the adapter `adapter_name` beside them and trains only it.
    Checkpoints hold the adapters, their optimizer state and where the base comes from; at the end of
    fit the adapter is written in peft's format to `adapter_dir`.

    Args:
        r: rank of the update B A.
        alpha: scale of the update; the learned weight is W0 + (alpha / r) B A.
        dropout: dropout on the adapter's input.
        target_modules: "all-linear" (every linear layer but the output embedding, attention and MLP
            alike, GPT-2's Conv1D layers included), a list of layer names (`["q_proj", "v_proj"]`) or a regular expression over
            qualified names.
        adapter_name: the adapter's name; several named adapters can share one base.
        lr_multiplier: multiplies the module's learning rate (LoRA usually wants a higher one than
            full finetuning); the optimizer holds only adapter parameters, so it applies to all of them.
        optimizer: `None` keeps the module's AdamW; "adamw8bit", "paged_adamw" or "paged_adamw8bit"
            swap in the bitsandbytes optimizer with the same groups and schedule.
        adapter_dir: where the adapter is written at the end of fit; default `<default_root_dir>/adapter`.
        experts: on a mixture-of-experts model, also adapt every expert's weights (one rank-r update per
            expert and matrix, through peft's `target_parameters`; needs dropout=0, which peft's expert
            adapters do not implement). False: the experts (and the router, no linear layer in transformers 5)
            stay frozen. Under expert parallelism the frozen experts are sharded as in full training either way,
            and the expert adapters stay whole on every rank (ZeRO shards them), each rank adding its own
            experts' updates (strategies/expert.py).
    """

    def __init__(
        self,
        r: int = 16,
        alpha: float = 32,
        dropout: float = 0.05,
        target_modules: str | list[str] = "all-linear",
        adapter_name: str = "default",
        lr_multiplier: float = 1.0,
        optimizer: Literal["adamw8bit", "paged_adamw", "paged_adamw8bit"] | None = None,
        adapter_dir: str | None = None,
        experts: bool = False,
    ) -> None:
        check_experts_option(experts, dropout)
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ValueError(f"r (the LoRA rank) must be a positive integer, got {r!r}")
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if not lr_multiplier > 0:
            raise ValueError(f"lr_multiplier must be > 0, got {lr_multiplier!r}")
        if optimizer is not None and optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be None or one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
        if optimizer is not None:
            require("bitsandbytes", f"{type(self).__name__}(optimizer={optimizer!r})")
        if isinstance(target_modules, (list, tuple)) and not target_modules:
            raise ValueError("target_modules is empty; give 'all-linear', layer names or a regular expression")
        if not adapter_name or "." in adapter_name:
            raise ValueError(f"adapter_name must be a non-empty name without dots, got {adapter_name!r}")
        self.config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
                                 target_modules=target_modules if isinstance(target_modules, str) else list(target_modules))
        self.adapter_name, self.lr_multiplier, self.optimizer = adapter_name, lr_multiplier, optimizer
        self.adapter_dir = adapter_dir
        self.adapter_path: Path | None = None  # the adapter written at the end of fit, once it is (on rank 0)
        self.experts = experts

    # -- the model --------------------------------------------------------------------------------

    def prepare_base(self, model: PreTrainedModel) -> PreTrainedModel:
        """What happens to the base before the adapter is added (QLoRA quantizes it here)."""
        return model

    def transform_model(self, model: nn.Module, pl_module: LightningModule) -> PeftModel:
        """Called by the module's `configure_model` (and by `setup` on an existing model)."""
        if any(p.is_meta for p in model.parameters()):
            # A strategy's empty init would later initialise every layer, the adapter's B included
            # (which must start at zero), and the base's pretrained weights never arrive on meta.
            raise ValueError("LoRA needs the base's weights, and this model was created on the meta device (a "
                             "strategy's empty init): use ZeROStrategy(empty_init=False), ParallelStrategy(empty_init=False) "
                             "or a strategy without it")
        if not isinstance(model, PeftModel):
            model = self.prepare_base(model)
        config = with_expert_targets(self.config, model, self.experts)
        model = add_adapter(model, config, self.adapter_name)
        # `from_pretrained` returns a model in eval mode and Lightning keeps the mode it finds; in eval
        # mode the adapter's dropout and transformers' gradient checkpointing are both switched off.
        model.train()
        # Checkpoints leave the frozen base out; the base is rebuilt from its spec on resume.
        pl_module.strict_loading = False
        base = getattr(pl_module.hparams, "model", None) if hasattr(pl_module, "hparams") else None
        if base is not None and not has_weights(base):
            named = f"a {type(base).__name__} object" if isinstance(base, PretrainedConfig) else repr(base)
            rank_zero_warn(f"LoRA on base {named}, which has no pretrained weights (a random initialisation): "
                           "checkpoints hold the adapter only, and resuming or merging one needs this same base")
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        # a 4-bit weight packs two parameters per byte: count the weights it stands for
        total = sum(p.quant_state.shape.numel() if is_4bit(p, "Params4bit") else p.numel()
                    for p in model.parameters())
        rank_zero_info(f"LoRA adapter {self.adapter_name!r}: {trainable:,} trainable of {total:,} parameters")
        return model

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # A model that exists already (a second fit on the same module) is not rebuilt by
        # configure_model: the adapter is added to it here, before the optimizer is built.
        model = getattr(pl_module, "model", None)
        if model is None:
            return
        if isinstance(model, PeftModel) and self.adapter_name in model.peft_config:
            # validate/test (or fit again) after a fit: the adapter is there already, and peft has resolved
            # its target_modules in place to names that a second add would look for in vain.
            model.set_adapter(self.adapter_name)
            return
        pl_module.model = self.transform_model(model, pl_module)

    # -- the optimizer ----------------------------------------------------------------------------

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The optimizer exists now and its saved state (if resuming) is loaded after this hook, so a
        # resumed run keeps the scaled learning rates of its checkpoint.
        if self.optimizer is not None:
            self._swap_optimizer(trainer)
        if self.lr_multiplier != 1.0:
            for optimizer in trainer.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] *= self.lr_multiplier
                    if "initial_lr" in group:
                        group["initial_lr"] *= self.lr_multiplier
            for config in trainer.lr_scheduler_configs:
                config.scheduler.base_lrs = [lr * self.lr_multiplier for lr in config.scheduler.base_lrs]

    def _swap_optimizer(self, trainer: Trainer) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(f"optimizer={self.optimizer!r} replaces a single optimizer; the module has {len(trainer.optimizers)}")
        old = trainer.optimizers[0]
        own = {id(p) for p in trainer.lightning_module.parameters()}
        if any(id(p) not in own for g in old.param_groups for p in g["params"]):
            # A precision plugin (fp32 master weights) has put copies in the optimizer and steps
            # through it; a new optimizer would bypass those copies.
            raise ValueError(f"optimizer={self.optimizer!r} cannot replace an optimizer whose parameters the precision "
                             f"plugin ({type(trainer.precision_plugin).__name__}) has replaced by master copies; "
                             "use optimizer=None with it")
        groups = [{k: v for k, v in g.items() if k in ("params", "lr", "weight_decay", "betas", "eps", "initial_lr")}
                  for g in old.param_groups]
        optimizer_class = getattr(require("bitsandbytes", f"optimizer={self.optimizer!r}").optim, OPTIMIZERS[self.optimizer])
        new = optimizer_class(groups, lr=old.defaults["lr"], betas=old.defaults.get("betas", (0.9, 0.999)))
        for config in trainer.lr_scheduler_configs:
            if config.scheduler.optimizer is old:
                config.scheduler.optimizer = new
        trainer.strategy.optimizers = [new]

    # -- checkpoints ------------------------------------------------------------------------------

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        keep = adapter_keys(pl_module.model, prefix=MODEL_PREFIX)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        peft_model = as_peft_model(pl_module.model)
        checkpoint[ADAPTER_KEY] = {
            "base": base_reference(getattr(pl_module.hparams, "model", None)),
            "adapters": {name: config_dict(config) for name, config in peft_model.peft_config.items()},
            "active": peft_model.active_adapter,
            "quantization": self.quantization(),
        }

    def check_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Called by the module before a checkpoint's weights load: its adapter has this run's rank (another
        `r` fails the load on the shapes of every adapter tensor, naming no option)."""
        saved = ((checkpoint.get(ADAPTER_KEY) or {}).get("adapters") or {}).get(self.adapter_name) or {}
        if saved.get("r") not in (None, self.config.r):
            raise ValueError(f"the checkpoint's LoRA adapter {self.adapter_name!r} has r={saved['r']}, but this run asks "
                             f"for r={self.config.r}: a checkpoint resumes only into adapters of its rank. Pass "
                             f"r={saved['r']} (or drop the override), or start a new run without --ckpt_path")

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # The module loaded the checkpoint non-strictly (it has no base weights): make sure the
        # adapter weights themselves were all there. A sharded checkpoint has no "state_dict" here:
        # the strategy has loaded the shards into the model itself.
        if "state_dict" not in checkpoint:
            return
        missing = sorted(adapter_keys(pl_module.model, prefix=MODEL_PREFIX) - set(checkpoint["state_dict"]))
        if missing:
            raise ValueError(f"the checkpoint lacks {len(missing)} adapter weights of this run, e.g. {missing[:2]}: "
                             f"it was not written by a LoRA run with adapter {self.adapter_name!r}")

    def quantization(self) -> dict[str, Any] | None:
        """How the base is quantized (None: it is not)."""
        return None

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        out = Path(self.adapter_dir or Path(trainer.default_root_dir) / "adapter")
        state = gathered_adapter_state(pl_module.model)
        if trainer.is_global_zero:
            check_finite(state, str(out))
            peft_model = as_peft_model(pl_module.model)
            base = getattr(pl_module.hparams, "model", None)
            if base is not None:
                peft_model.peft_config[self.adapter_name].base_model_name_or_path = base_reference(base)
            with atomic_directory(out, overwrite=True) as tmp:
                save_adapter(peft_model, tmp, self.adapter_name, getattr(pl_module, "tokenizer", None), state)
            self.adapter_path = out  # (RunSummary lists it)
            rank_zero_info(f"adapter {self.adapter_name!r} written to {out}")


class QLoRACallback(LoRACallback):
    """LoRA on a 4-bit base: the frozen linear weights are stored in NF4 (or FP4) with double
    quantization and dequantized to `compute_dtype` in each matmul; the adapter trains in fp32.

    Same arguments as `LoRACallback`, plus:
        quant_type: "nf4" (NormalFloat, for normally distributed weights) or "fp4".
        double_quant: also quantize the per-block absmax constants (0.5 -> 0.127 bits per weight).
        compute_dtype: "bfloat16", "float16" or "float32", the dtype the 4-bit weights are
            dequantized to.
        gradient_checkpointing: recompute activations in the backward pass (the QLoRA recipe).
        experts: only False: adapters on a mixture of experts' fused expert weights are not built for a 4-bit
            base (bitsandbytes stores linear layers in 4 bits, and fused 3-D experts are none); the experts stay
            frozen in 16/32 bits and the linear layers are adapted.
    """

    def __init__(self, r: int = 16, alpha: float = 32, dropout: float = 0.05,
                 target_modules: str | list[str] = "all-linear", adapter_name: str = "default",
                 lr_multiplier: float = 1.0,
                 optimizer: Literal["adamw8bit", "paged_adamw", "paged_adamw8bit"] | None = None,
                 adapter_dir: str | None = None, quant_type: Literal["nf4", "fp4"] = "nf4",
                 double_quant: bool = True, compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16",
                 gradient_checkpointing: bool = True, experts: bool = False) -> None:
        if experts is not False:
            raise NotImplementedError(f"QLoRACallback(experts={experts!r}): adapters on the experts are not built for a "
                                      "4-bit base (its fused 3-D expert weights are no linear layers, which bitsandbytes "
                                      "quantizes); use LoRACallback(experts=True) on a 16/32-bit base, or experts=False")
        require("bitsandbytes", type(self).__name__)
        super().__init__(r=r, alpha=alpha, dropout=dropout, target_modules=target_modules, adapter_name=adapter_name,
                         lr_multiplier=lr_multiplier, optimizer=optimizer, adapter_dir=adapter_dir)
        if quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
        if compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, got {compute_dtype!r}")
        self.quant_type, self.double_quant, self.compute_dtype = quant_type, double_quant, compute_dtype
        self.gradient_checkpointing = gradient_checkpointing

    def quantization(self) -> dict[str, Any]:
        return {"quant_type": self.quant_type, "double_quant": self.double_quant, "compute_dtype": self.compute_dtype}

    def model_load_kwargs(self, pl_module: LightningModule) -> dict[str, Any]:
        """What the module passes to `from_pretrained` for a base with weights: load it straight into
        4 bits, layer by layer, so the whole model never exists in 16/32 bits (a base initialised at
        random is quantized after it is built, in `prepare_base`)."""
        return {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=self.quant_type, bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=COMPUTE_DTYPES[self.compute_dtype])}

    def prepare_base(self, model: PreTrainedModel) -> PreTrainedModel:
        model = quantize_4bit(model, self.quant_type, self.double_quant, COMPUTE_DTYPES[self.compute_dtype])
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=self.gradient_checkpointing,
                                               gradient_checkpointing_kwargs={"use_reentrant": False})


# -- from a checkpoint to an adapter or a merged model --------------------------------------------


def peft_model_from_checkpoint(checkpoint: dict[str, Any], base: str | None = None) -> PeftModel:
    """Rebuild the adapted model of a LoRA/QLoRA checkpoint: its base (quantized as in training) and
    its adapters, the active one active."""
    if not is_adapter_checkpoint(checkpoint):
        raise ValueError("the checkpoint was not written by a LoRA or QLoRA run (it has no 'lora' entry)")
    info = checkpoint[ADAPTER_KEY]
    spec = base or info["base"]
    if spec is None or not has_weights(spec):
        raise ValueError(f"the checkpoint holds adapters only and its base {spec!r} has no pretrained weights to "
                         "rebuild it from: give the base model directory it was trained on")
    model = build_model(spec)
    quant = info["quantization"]
    if quant is not None:
        model = quantize_4bit(model, quant["quant_type"], quant["double_quant"], COMPUTE_DTYPES[quant["compute_dtype"]])
    for name, config in info["adapters"].items():
        model = add_adapter(model, LoraConfig(**config), name)
    state = {k[len(MODEL_PREFIX):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(MODEL_PREFIX)}
    check_adapter_fits(model, state)
    missing = sorted(adapter_keys(model) - set(state))
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} adapter weights, e.g. {missing[:2]}")
    model.load_state_dict(state, strict=False)
    model.set_adapter(info["active"])
    return model.eval()


def probe_logits(model: nn.Module, vocab_size: int, seed: int = 0) -> torch.Tensor:
    """Logits of `model` on a fixed random batch: what a merge is checked against."""
    ids = torch.randint(0, vocab_size, (2, 32), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids.to(next(model.parameters()).device)).logits.float().cpu()


def export_lora_checkpoint(checkpoint: str | os.PathLike | dict[str, Any], out_dir: str | os.PathLike,
                           merge: bool = False, base: str | None = None,
                           overwrite: bool = False) -> tuple[Path, float | None]:
    """`lightning-llm export` of a LoRA/QLoRA checkpoint (a path or an already loaded one): the
    adapter in peft's format, or with `merge=True` a Hugging Face model with the active adapter
    merged into its base.

    Returns the output directory and, for a merge, the largest absolute difference between the
    merged model's logits and the adapted model's on a probe batch (for QLoRA this is the error of
    merging into the dequantized base in the compute dtype).
    """
    if not isinstance(checkpoint, dict):
        checkpoint = load_checkpoint(checkpoint)
    model = peft_model_from_checkpoint(checkpoint, base)
    tokenizer = tokenizer_from_checkpoint(checkpoint)
    if not merge:
        check_finite(gathered_adapter_state(model), str(out_dir))
        with atomic_directory(out_dir, overwrite) as tmp:
            save_adapter(model, tmp, model.active_adapter, tokenizer)
        return Path(out_dir), None
    vocab_size = model.get_base_model().config.vocab_size
    before = probe_logits(model, vocab_size)
    merged = merge_adapter(model).eval()
    error = (probe_logits(merged, vocab_size) - before).abs().max().item()
    return save_pretrained_atomic(merged, out_dir, tokenizer, overwrite=overwrite), error

"""Tensor parallelism (Megatron's column/row split) and sequence parallelism on DTensor.

Each decoder layer's attention and MLP are one tensor-parallel region: the projections into the
region (q, k, v; gate, up) are split by output column, so every rank computes its own heads and its
own slice of the intermediate activations with no communication, and the projections out of it
(o; down) are split by input row, so each rank holds a partial sum of the output that one collective
completes. Which linear is which comes from the model's own Hugging Face tensor-parallel plan
(`_tp_plan`, built from `config.base_model_tp_plan`), so any HF decoder that declares one splits.
Grouped-query attention with fewer kv-heads than ranks (the degree a multiple of them) replicates each
kv-head on the ranks whose query heads use it (`KeyValueHead`).

Sequence parallelism (Korthikanti et al., 2022) shards the rest of the layer along the sequence: the
norms and the residual stream between regions hold 1/T of the tokens. A region then starts with an
all-gather of its input over the sequence and ends with a reduce-scatter in place of the all-reduce
(the same bytes moved; activations outside the regions are 1/T). The residual stream is kept as a
`DTensor` so that the decoder, which derives positions and the causal mask from the hidden states'
shape, sees the whole sequence length.

The embedding is split over the vocabulary (each rank looks up the tokens in its rows), and so is
the LM head, whose logits stay split for a vocabulary-parallel cross-entropy (`loss_parallel`); see
`lightning_llm.protocols.VocabParallelLoss`.

LoRA adapters (peft) on the projections are split beside their base so that each adapter's output has the
base output's placement and adds to it locally (`adapter_styles`): on a column-split projection A is
replicated and B split like the base; on a row-split one A is split like the base and B replicated. QLoRA's
4-bit base stays whole and each rank multiplies by its slice (`QuantizedParallel`). Adapters on replicated
kv-heads, a 4-bit base with replicated kv-heads, LoRA dropout and LoRA variants (DoRA) are refused.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.distributed.tensor import distribute_module

# Entries of a Hugging Face plan that this module places (the others, e.g. mixture-of-experts ones, are refused).
PLAN_STYLES = ("colwise", "rowwise", "embedding_rowwise", "colwise_gather_output")
ISSUE = "issue 15 (ParallelStrategy)"


def hf_tensor_plan(causal_lm: nn.Module) -> dict[str, str]:
    """The model's tensor-parallel plan, `{module name pattern ("*" for a layer index): style}`.

    Raises ValueError for a model that has none (a model without a plan cannot be split safely: which
    linear is a column and which a row is not visible from the weights)."""
    plan = getattr(causal_lm, "_tp_plan", None)
    if not plan:
        base = getattr(getattr(causal_lm, "config", None), "base_model_tp_plan", None)
        prefix = getattr(causal_lm, "base_model_prefix", "model")
        plan = {f"{prefix}.{k}": v for k, v in (base or {}).items()}
    if not plan:
        raise ValueError(f"{type(causal_lm).__name__} declares no tensor-parallel plan (config.base_model_tp_plan); "
                         "tensor_parallel=1 is the only degree it supports")
    unknown = {k: v for k, v in plan.items() if v not in PLAN_STYLES}
    if unknown:
        raise NotImplementedError(f"tensor-parallel plan entries {unknown} are not supported (supported styles: "
                                  f"{PLAN_STYLES}); expert parallelism is a separate issue, see {ISSUE}")
    return dict(plan)


def check_divisible(config: Any, degree: int) -> None:
    """Refuse a model whose heads, kv-heads, intermediate size or vocabulary the degree does not divide.

    Fewer kv-heads than the degree is accepted when the degree is a multiple of them (grouped-query
    attention): each kv-head is then replicated on the ranks whose query heads use it."""
    heads = getattr(config, "num_attention_heads", None)
    sizes = {
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None) or heads,
        "intermediate_size": getattr(config, "intermediate_size", None),
        "vocab_size": getattr(config, "vocab_size", None),
    }
    bad = {name: size for name, size in sizes.items() if size is not None and size % degree
           and not (name == "num_key_value_heads" and degree % size == 0)}
    if bad:
        divisors = sorted({d for d in range(1, max(s for s in sizes.values() if s) + 1) if all(
            s % d == 0 or (name == "num_key_value_heads" and d % s == 0) for name, s in sizes.items() if s)})
        raise ValueError(f"tensor_parallel={degree} does not divide {bad} (each rank holds 1/{degree} of the heads, "
                         f"intermediate columns and vocabulary rows, and 1/{degree} of the kv-heads or, where the degree "
                         f"is a multiple of the kv-heads, one kv-head replicated on the ranks that use it); degrees "
                         f"that fit all of {sizes}: {divisors}")


def _pattern(name: str) -> str:
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)


def plan_styles(causal_lm: nn.Module, sequence_parallel: bool, prefix: str = "",
                degree: int = 1) -> dict[nn.Module, ParallelStyle]:
    """Every module of `causal_lm` that gets a parallel style, with its style (resolved on the meta model,
    applied unit by unit once each is materialised). `prefix`: the causal LM's name in the LightningModule;
    `degree`: the tensor-parallel degree (a degree above the kv-heads replicates them, see `KeyValueHead`)."""
    plan = hf_tensor_plan(causal_lm)
    kv_heads = getattr(causal_lm.config, "num_key_value_heads", None)
    residual = Shard(1) if sequence_parallel else Replicate()
    styles: dict[nn.Module, ParallelStyle] = {}
    regions: set[nn.Module] = set()
    modules = dict(causal_lm.named_modules())
    for name, module in modules.items():
        style = plan.get(_pattern(name))
        if style is None:
            continue
        layer = getattr(module, "base_layer", module)  # a peft tuner layer (LoRA) wraps the planned module
        if layer is not module and style not in ("colwise", "rowwise"):
            raise NotImplementedError(
                f"{prefix}{name}: a {type(module).__name__} adapter layer on the {style!r} entry of the tensor-parallel "
                "plan (the embedding or LM head); under tensor parallelism adapters sit on the attention and MLP "
                "projections only: leave this layer out of target_modules ('all-linear' does)")
        if style == "embedding_rowwise" and layer is module:
            if not isinstance(module, nn.Embedding):
                raise NotImplementedError(f"{prefix}{name}: plan style {style!r} on a {type(module).__name__}")
            styles[module] = RowwiseParallel(input_layouts=Replicate(), output_layouts=residual,
                                              use_local_output=not sequence_parallel)
            continue
        if is_4bit(layer) and style in ("colwise", "rowwise"):
            parent = modules[name.rpartition(".")[0]]
            if style == "colwise":
                if kv_heads and kv_heads % degree and layer.out_features == kv_heads * getattr(parent, "head_dim", 0):
                    raise NotImplementedError(
                        f"{prefix}{name}: a 4-bit (QLoRA) projection of {kv_heads} kv-heads at tensor_parallel={degree}: "
                        "replicated kv-heads are not built for a 4-bit base; use a degree that divides the kv-heads")
                styles[layer] = QuantizedParallel(columns=True)
                regions.add(parent)
            else:
                styles[layer] = QuantizedParallel(columns=False, output_layouts=residual,
                                                  use_local_output=not sequence_parallel)
            if layer is not module:
                styles.update(adapter_styles(f"{prefix}{name}", module, styles[layer], sequence_parallel))
            continue
        if not isinstance(layer, nn.Linear) or not layer.weight.is_floating_point():
            raise NotImplementedError(
                f"{prefix}{name}: plan style {style!r} on a {type(layer).__name__} with {layer.weight.dtype} weights "
                "(another quantisation than QLoRA's?); tensor parallelism splits nn.Linear layers with floating point "
                "weights and QLoRA's bitsandbytes 4-bit ones on the attention and MLP projections; a layer quantised "
                "another way trains with tensor_parallel=1 (ParallelStrategy(tensor_parallel=1, zero_stage=3, "
                "empty_init=False) shards it over every rank)")
        if style == "colwise_gather_output":  # the LM head: logits stay split over the vocabulary
            styles[layer] = ColwiseParallel(input_layouts=residual, output_layouts=Shard(-1), use_local_output=False)
        elif style == "colwise":
            parent = modules[name.rpartition(".")[0]]
            styles[layer] = ColwiseParallel()
            if kv_heads and kv_heads % degree and layer.out_features == kv_heads * getattr(parent, "head_dim", 0):
                styles[layer] = KeyValueHead(parent, kv_heads)
            regions.add(parent)
        else:
            styles[layer] = RowwiseParallel(output_layouts=residual, use_local_output=not sequence_parallel)
        if layer is not module:
            styles.update(adapter_styles(f"{prefix}{name}", module, styles[layer], sequence_parallel))
    for region in regions:
        styles[region] = RegionInput(sequence_parallel)
    # The norms on the residual stream: the decoder layers' other children, and the final norm.
    layers = {parent for parent in modules.values() if any(c in regions for c in parent.children())}
    base = getattr(causal_lm, getattr(causal_lm, "base_model_prefix", "model"), None)
    for norm in [c for layer in layers for c in layer.children() if c not in regions] + [getattr(base, "norm", None)]:
        if isinstance(norm, nn.Module) and not any(True for _ in norm.parameters()):
            continue  # dropout and the like act elementwise on the residual stream, split or not
        if not isinstance(norm, nn.Module) or "norm" not in type(norm).__name__.lower():
            raise NotImplementedError(f"tensor parallelism: {type(norm).__name__} sits on the residual stream beside "
                                      "the tensor-parallel regions and is not a norm; only norms are placed there")
        styles[norm] = SequenceParallel() if sequence_parallel else Replicated()
    return styles


def adapter_styles(name: str, module: nn.Module, base: ParallelStyle,
                   sequence_parallel: bool) -> dict[nn.Module, ParallelStyle]:
    """The styles of a peft LoRA layer's adapters, placed so that each adapter's output has its base layer's
    placement and adds to it locally (W x + (alpha / r) B A x with W split as `base` splits it).

    Column-split base (q, k, v, gate, up; output a local Shard(-1)): A replicated, taking the region's replicated
    input, and B split over its output rows like W. A's output gradient comes back as a partial sum over the group
    (each rank's B rows see its own output columns): A's weight gradient is completed by the gradient reduction
    (an all-reduce of r x in_features per adapter and step), its input gradient joins the region's one collective.
    Row-split base (o, down; output the residual stream): A split over its input columns like W, its partial
    [.., r] output completed by the same collective as W's (an all-reduce, or under sequence parallelism a
    reduce-scatter over the sequence, whose backward all-gathers the [.., r] gradient), and B replicated, applied
    to this rank's tokens (under sequence parallelism 1/T of them, so that B's weight gradient is a partial sum
    that the gradient reduction completes: an all-reduce of out_features x r)."""
    refused = []
    if isinstance(base, KeyValueHead):
        refused.append("it sits on replicated kv-heads (KeyValueHead: fewer kv-heads than the tensor-parallel degree); "
                       "leave k_proj and v_proj out of target_modules or use a degree that divides the kv-heads")
    if getattr(module, "lora_variant", None):
        refused.append(f"variant {sorted(module.lora_variant)} (DoRA or another LoRA variant): plain LoRA only")
    dropout = {k: d.p for k, d in getattr(module, "lora_dropout", {}).items() if getattr(d, "p", 0)}
    if dropout:
        refused.append(f"lora dropout {dropout}: the ranks would draw different masks for the replicated input of a "
                       "column-split projection; use dropout=0.0")
    if not isinstance(getattr(module, "lora_A", None), nn.ModuleDict) or getattr(module, "lora_embedding_A", None):
        refused.append("it is not a LoRA linear layer (lora_A / lora_B)")
    if refused:
        raise NotImplementedError(f"{name} is a {type(module).__name__} adapter layer that tensor parallelism does "
                                  f"not place: {'; '.join(refused)}")
    residual = Shard(1) if sequence_parallel else Replicate()
    styles: dict[nn.Module, ParallelStyle] = {}
    for adapter in module.lora_A:
        a, b = module.lora_A[adapter], module.lora_B[adapter]
        if isinstance(base, ColwiseParallel) or getattr(base, "columns", False):
            styles[a], styles[b] = Replicated(use_local_output=False), ColwiseParallel()
        else:
            styles[a] = RowwiseParallel(output_layouts=residual, use_local_output=False)
            styles[b] = Replicated(use_local_output=not sequence_parallel)
    return styles


def is_4bit(layer: nn.Module) -> bool:
    """A bitsandbytes `Linear4bit` (QLoRA's frozen 4-bit base), told by its quantization state (duck-typed: a
    strategy does not import bitsandbytes unless it meets one)."""
    return isinstance(layer, nn.Linear) and (getattr(layer.weight, "quant_state", None) is not None
                                             or getattr(layer, "quant_state", None) is not None)


class QuantizedParallel(ParallelStyle):
    """QLoRA's frozen 4-bit base projection under tensor parallelism: the 4-bit weight stays whole on every rank of
    the group and each rank multiplies by its own slice of the dequantized weight, its rows for a column-split
    projection (`columns=True`: q, k, v, gate, up), its columns for a row-split one (o, down).

    The 4-bit codes are not cut: NF4 quantizes blocks of 64 consecutive weights with one constant each (and those
    constants again in blocks of 256), so a slice of the codes is a valid 4-bit tensor only where every cut falls on
    a block boundary, and then its second-level constants differ from one process's. Whole, every rank dequantizes
    exactly the weights one process does; the cost is the frozen 4-bit weight replicated over the group (half a
    byte per weight) and each rank dequantizing all of it. The arithmetic is bitsandbytes' training path
    (dequantize to the compute dtype, then a matmul). Input and output are placed as torch's ColwiseParallel and
    RowwiseParallel place them: a column split takes the region's replicated input (its gradient here is this
    rank's partial sum, completed by the region's one collective) and returns its local columns; a row split
    takes the local columns and completes its partial output by an all-reduce, or a reduce-scatter over the
    sequence under sequence parallelism."""

    def __init__(self, columns: bool, output_layouts: Any = None, use_local_output: bool = True) -> None:
        super().__init__()
        self.columns, self.output, self.use_local_output = columns, output_layouts or Replicate(), use_local_output

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        from bitsandbytes.functional import dequantize_4bit
        from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

        if module.bias is not None:
            raise NotImplementedError(f"a 4-bit {type(module).__name__} with a bias under tensor parallelism: not built "
                                      "(the decoders with tensor-parallel plans here have none)")
        degree, rank = device_mesh.size(), device_mesh.get_local_rank()
        dim = 0 if self.columns else 1
        part = (module.out_features if self.columns else module.in_features) // degree

        def forward(x: torch.Tensor) -> torch.Tensor:
            fix_4bit_weight_quant_state_from_module(module)  # ZeRO's sharding may have dropped it, as in bitsandbytes
            dtype = x.dtype
            if isinstance(x, DTensor):
                x = x.to_local(grad_placements=[Partial()])
            compute = module.compute_dtype or dtype
            weight = dequantize_4bit(module.weight, module.weight.quant_state).narrow(dim, rank * part, part)
            y = nn.functional.linear(x.to(compute), weight.to(compute)).to(dtype)
            if self.columns:
                return y
            out = DTensor.from_local(y, device_mesh, [Partial()], run_check=False).redistribute(placements=[self.output])
            return out.to_local() if self.use_local_output else out

        module.forward = forward
        return module


class RegionInput(ParallelStyle):
    """The entry of a tensor-parallel region (attention, MLP): its input becomes one replicated `DTensor`
    that every column-split projection of the region takes as it is. Backward then adds the projections'
    partial input gradients locally and completes the sum with one collective per region, Megatron's
    "f": an all-reduce, or under sequence parallelism the reduce-scatter that undoes the region's
    all-gather of the sequence shards. (torch's ColwiseParallel given a plain tensor wraps it itself,
    once per projection: q, k, v, gate and up would each all-reduce their input gradient, 5 collectives
    per layer in backward where 2 complete the same sums; see benchmarks/parallel.py.)
    Hand-written rather than torch's `PrepareModuleInput`, which needs the input either positional or
    keyword: transformers calls attention with `hidden_states=` and the MLP positionally."""

    def __init__(self, sequence_parallel: bool) -> None:
        super().__init__()
        self.sequence_parallel = sequence_parallel

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def enter(x: torch.Tensor) -> DTensor:
            if not self.sequence_parallel:
                return DTensor.from_local(x, device_mesh, [Replicate()], run_check=False)
            if not isinstance(x, DTensor):
                raise TypeError(f"sequence parallelism: a tensor-parallel region got a {type(x).__name__}, expected "
                                "the sequence-sharded residual stream (a DTensor)")
            return x.redistribute(placements=[Replicate()])

        def hook(m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if args:
                return (enter(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": enter(kwargs["hidden_states"])}

        module.register_forward_pre_hook(hook, with_kwargs=True)
        return module


class KeyValueHead(ParallelStyle):
    """A key or value projection of grouped-query attention whose kv-heads are fewer than the tensor-parallel
    degree T (T a multiple of them, K): rank r's query heads all use kv-head r // (T / K), so each rank
    computes the whole projection (weight replicated over the group) and keeps that head's columns.

    The gradients that come back cover only the kept head, so they are partial sums over the group: the
    output is handed out with `Partial` gradient placements, which makes the weight's gradient a partial
    sum that the gradient reduction completes (FSDP2 redistributes it to the weight's `Replicate`) and the
    input's an all-reduced one (`from_local`'s backward), as the column-split projections beside it get.
    The attention module is told its new query-heads-per-kv-head (`num_key_value_groups`, read by
    transformers' attention functions to repeat the kv-heads). The simplest correct layout: it costs the
    whole K x head_dim projection on every rank (small beside the T-split query and MLP projections)."""

    def __init__(self, attention: nn.Module, kv_heads: int) -> None:
        super().__init__()
        self.attention, self.kv_heads = attention, kv_heads

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        degree, rank = device_mesh.size(), device_mesh.get_local_rank()
        head, width = rank // (degree // self.kv_heads), module.out_features // self.kv_heads
        self.attention.num_key_value_groups = self.attention.config.num_attention_heads // degree

        def replicate(m: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:  # `RegionInput` made it a DTensor
            if not isinstance(inputs[0], DTensor):
                raise TypeError(f"{type(m).__name__} of replicated kv-heads got a {type(inputs[0]).__name__}, "
                                "expected the tensor-parallel region's replicated DTensor input")
            return inputs

        def keep_head(m: nn.Module, out: DTensor, mesh: DeviceMesh) -> torch.Tensor:
            return out.to_local(grad_placements=[Partial()]).narrow(-1, head * width, width)

        return distribute_module(module, device_mesh, input_fn=replicate, output_fn=keep_head)


class Replicated(ParallelStyle):
    """A module computed whole on every rank of the group: a norm outside the tensor-parallel regions without
    sequence parallelism, or a LoRA adapter's replicated factor. Its parameters become `DTensor`s replicated over
    the group (so that they share one mesh with the split ones: ZeRO shards them alike and the gradient norm is
    one sum); a plain tensor input is taken as replicated, a `DTensor` one as it is (a sequence-sharded input gives
    a sequence-sharded output), and the output is a plain tensor unless `use_local_output` is False."""

    def __init__(self, use_local_output: bool = True) -> None:
        super().__init__()
        self.use_local_output = use_local_output

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def replicate(m: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
            return tuple(DTensor.from_local(x, mesh, [Replicate()], run_check=False)
                         if isinstance(x, torch.Tensor) and not isinstance(x, DTensor) else x for x in inputs)

        def output(m: nn.Module, out: DTensor, mesh: DeviceMesh) -> torch.Tensor:
            return out.to_local() if self.use_local_output else out

        return distribute_module(module, device_mesh, input_fn=replicate, output_fn=output)


def apply_styles(members: list[nn.Module], styles: dict[nn.Module, ParallelStyle], mesh: DeviceMesh) -> None:
    """Parallelise the `members` that have a style, keeping tied parameters tied and frozen ones frozen
    (parallelize_module gives each module new DTensor parameters, which torch's styles create trainable: a
    tied embedding and LM head would become two copies, and LoRA's frozen base would train)."""
    chosen = [m for m in members if m in styles]
    if not chosen:
        return
    slots = [(m, name, id(p)) for m in members for name, p in m._parameters.items() if p is not None]
    frozen = {id(p) for m in members for p in m._parameters.values() if p is not None and not p.requires_grad}
    for m in chosen:
        parallelize_module(m, mesh, styles[m])
    first: dict[int, nn.Parameter] = {}
    for m, name, old in slots:
        p = m._parameters[name]
        if old in frozen:
            p.requires_grad_(False)
        if old not in first:
            first[old] = p
            continue
        tied = first[old]
        if p is not tied:
            placements = [getattr(t, "placements", None) for t in (tied, p)]
            if placements[0] != placements[1]:
                raise NotImplementedError(f"a tied parameter is split two ways by the tensor-parallel plan {placements}")
            m._parameters[name] = tied


def gather_logits_unless(vocab_parallel: Callable[[], bool]) -> Callable[..., Any]:
    """Forward hook for the LM head: its split logits stay split while `vocab_parallel()` (a loss that
    takes them runs), and are gathered into whole logits otherwise (generation, evaluation, any module
    that is not a `VocabParallelLoss`)."""

    def hook(module: nn.Module, args: Any, output: DTensor) -> torch.Tensor:
        return output if vocab_parallel() else output.full_tensor()

    return hook

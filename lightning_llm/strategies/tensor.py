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
        if style == "embedding_rowwise":
            if not isinstance(module, nn.Embedding):
                raise NotImplementedError(f"{prefix}{name}: plan style {style!r} on a {type(module).__name__}")
            styles[module] = RowwiseParallel(input_layouts=Replicate(), output_layouts=residual,
                                              use_local_output=not sequence_parallel)
            continue
        if hasattr(module, "base_layer"):  # a peft tuner layer (LoRA, QLoRA) wrapping the planned linear
            raise NotImplementedError(
                f"{prefix}{name} is a {type(module).__name__} adapter layer (LoRA/QLoRA): adapters are not placed "
                f"under tensor parallelism yet ({ISSUE}). The placement they would take: on a column-split "
                "projection (q, k, v, gate, up) B split over its output rows like the base weight and A replicated; "
                "on a row-split one (o, down) A split over its input columns like the base weight and B replicated; "
                "so that the adapter's output has the base layer's placement. Train adapters with tensor_parallel=1 "
                "instead: ParallelStrategy(tensor_parallel=1, zero_stage=3) or ZeROStrategy(stage=3) shards the "
                "frozen base over every rank")
        if not isinstance(module, nn.Linear):
            raise NotImplementedError(f"{prefix}{name}: plan style {style!r} on a {type(module).__name__} (a quantised "
                                      "layer?); tensor parallelism splits nn.Linear only")
        if style == "colwise_gather_output":  # the LM head: logits stay split over the vocabulary
            styles[module] = ColwiseParallel(input_layouts=residual, output_layouts=Shard(-1), use_local_output=False)
        elif style == "colwise":
            parent = modules[name.rpartition(".")[0]]
            styles[module] = ColwiseParallel()
            if kv_heads and kv_heads % degree and module.out_features == kv_heads * getattr(parent, "head_dim", 0):
                styles[module] = KeyValueHead(parent, kv_heads)
            regions.add(parent)
        else:
            styles[module] = RowwiseParallel(output_layouts=residual, use_local_output=not sequence_parallel)
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
    """A module outside the tensor-parallel regions without sequence parallelism (a norm): every rank of the
    group computes it whole on the same input. Its parameters become `DTensor`s replicated over the group
    (so that they share one mesh with the split ones: ZeRO shards them alike and the gradient norm is one
    sum), taking and returning plain tensors."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def replicate(m: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
            return tuple(DTensor.from_local(x, mesh, [Replicate()], run_check=False)
                         if isinstance(x, torch.Tensor) and not isinstance(x, DTensor) else x for x in inputs)

        return distribute_module(module, device_mesh, input_fn=replicate, output_fn=lambda m, out, mesh: out.to_local())


def apply_styles(members: list[nn.Module], styles: dict[nn.Module, ParallelStyle], mesh: DeviceMesh) -> None:
    """Parallelise the `members` that have a style, keeping tied parameters tied (parallelize_module gives
    each module new DTensor parameters: a tied embedding and LM head would become two copies)."""
    chosen = [m for m in members if m in styles]
    if not chosen:
        return
    slots = [(m, name, id(p)) for m in members for name, p in m._parameters.items() if p is not None]
    for m in chosen:
        parallelize_module(m, mesh, styles[m])
    first: dict[int, nn.Parameter] = {}
    for m, name, old in slots:
        p = m._parameters[name]
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

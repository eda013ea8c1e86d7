"""Expert parallelism: each rank holds 1/N of every mixture-of-experts layer's experts.

The expert-parallel ranks are the data-parallel ranks (torchtitan's layout, DeepSpeed-MoE's and
Megatron-Core's with expert_parallel = data_parallel): `ParallelStrategy(expert_parallel=2)` on two
processes is dp2 x ep2, each rank trains on its own batch with all the non-expert parameters (under ZeRO
over the data-parallel dimension) and with half of the experts. A token routed to an expert on another
rank travels there and back by all-to-all (`lightning_llm.moe.ExpertDispatch`), so an expert computes
the tokens of every rank that chose it. No separate mesh dimension: an expert sharded over the same
ranks that ZeRO shards the rest over is a `DTensor` `Shard(0)` on the data-parallel mesh, which the
optimizer, gradient clipping (one global norm) and `torch.distributed.checkpoint` (resharding to any
number of ranks) handle as they handle ZeRO's shards. The experts are left out of ZeRO
(`fully_shard(ignored_params=...)`): they are already split, and their gradients need no reduction,
only the scale that `ExpertDispatch` applies (an expert's gradient is the sum over all ranks' tokens).
The precision plugins need nothing more: fp16's found-inf check on a `DTensor` gradient is reduced over
its mesh, so an overflow in one rank's experts skips the step on every rank. Frozen experts (LoRA on the
rest of the model) are cut the same way (tests/test_expert_parallel_precision.py, tests/test_expert_parallel_lora.py).

LoRA adapters on the experts themselves (peft's `target_parameters`: one rank-r update per expert, all experts'
factors in one pair of matrices, `ParamWrapper`s nested around the experts module) are not cut: they stay
replicated parameters that ZeRO shards and averages like any other, and each rank adds to its local experts only
their rows of the update (`LocalExpertAdapter`). Cutting them with the experts (a `DTensor` on the expert dimension)
would not fit peft's layout, where B's columns are rank-major with the expert fastest, so an expert's columns are
strided across the matrix, not one contiguous shard. Replicated, the factors' gradient is exact by the same
argument as the experts': on its owner's rank an expert's rows get the gradient of every rank's loss (the
all-to-all brings the other ranks' tokens and, in backward, their gradients), on the other ranks zero, and ZeRO's
mean over the N ranks is then 1/N of that sum: the gradient of the mean of the ranks' losses, the one the experts
get from `ExpertDispatch`'s 1/N scale. The cost is small: the factors are r (in + out) per expert against the
expert's in x out, gathered and reduced whole (zeros included) with the rest of their layer.

Which modules are experts and which weights are cut comes from the model's Hugging Face expert plan
(`config.base_model_ep_plan`: "grouped_gemm" weights are cut on the expert dimension, an
"ep_dispatch_experts" module gets the all-to-all dispatch), so any transformers MoE that declares one
is split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

from lightning_llm.moe import dispatch_of, is_experts

# Entries of a Hugging Face expert plan that this module places.
EP_PLAN_STYLES = ("grouped_gemm", "ep_dispatch_experts")


@dataclass
class PlannedExperts:
    """One experts module of the plan: the weights cut on the expert dimension, the module its MoE block calls
    (the experts module, or the outermost peft wrapper around it) and the peft wrappers adapting its weights."""

    weights: list[str]
    caller: nn.Module
    adapters: dict[str, nn.Module]


def hf_expert_plan(causal_lm: nn.Module) -> dict[str, str]:
    """The model's expert-parallel plan, `{name pattern ("*" for a layer index): style}`; ValueError for a
    model without one (a dense model, or an MoE whose experts transformers does not declare)."""
    plan = getattr(causal_lm, "_ep_plan", None)
    if not plan:
        raise ValueError(f"{type(causal_lm).__name__} declares no expert-parallel plan (config.base_model_ep_plan): "
                         "expert_parallel > 1 needs a mixture-of-experts model that has one (Qwen3-MoE, Mixtral, "
                         "OLMoE, ...; the presets tiny-moe and moe-100m)")
    unknown = {k: v for k, v in plan.items() if v not in EP_PLAN_STYLES}
    if unknown:
        raise NotImplementedError(f"expert-parallel plan entries {unknown} are not supported (supported: {EP_PLAN_STYLES})")
    return dict(plan)


def _is_parameter_adapter(module: nn.Module) -> bool:
    """A peft LoRA `ParamWrapper`: adapters on one parameter (`parameter_name`) of the module it wraps."""
    return isinstance(getattr(module, "parameter_name", None), str) and isinstance(getattr(module, "lora_A", None), nn.ModuleDict)


def plan_experts(causal_lm: nn.Module, degree: int) -> dict[nn.Module, PlannedExperts]:
    """Every experts module of `causal_lm` with the names of its weights to cut on the expert dimension (and the
    peft wrappers around it, LoRA on the experts: `LoRACallback(experts=True)`)."""
    from lightning_llm.strategies.tensor import _pattern

    plan = hf_expert_plan(causal_lm)
    modules = dict(causal_lm.named_modules())
    experts: dict[nn.Module, PlannedExperts] = {}
    for name, caller in modules.items():
        if plan.get(_pattern(name)) != "ep_dispatch_experts":
            continue
        module, adapters = caller, {}
        while _is_parameter_adapter(module):  # peft nests one wrapper per adapted parameter
            adapters[module.parameter_name] = module
            module = module.base_layer
        if not is_experts(module):
            raise NotImplementedError(f"{name}: a {type(module).__name__} (an adapter?) where the plan expects "
                                      "transformers' fused experts (3-D gate_up_proj and down_proj)")
        if module.num_experts % degree:
            raise ValueError(f"expert_parallel={degree} does not divide the {module.num_experts} experts of {name}: "
                             f"each rank holds the same number of whole experts")
        base = name if module is caller else f"{name}.{'.'.join(['base_layer'] * len(adapters))}"
        weights = [p for p, _ in module.named_parameters(recurse=False) if plan.get(_pattern(f"{name}.{p}")) == "grouped_gemm"]
        uncut = sorted(set(adapters) - set(weights))
        if uncut:
            raise NotImplementedError(f"{base}: LoRA adapters on {uncut}, which the expert plan does not cut over the "
                                      f"expert-parallel ranks (it cuts {weights}); adapt only those")
        experts[module] = PlannedExperts(weights, caller, adapters)
    if not experts:
        raise ValueError(f"{type(causal_lm).__name__}'s expert-parallel plan names no module of the model")
    return experts


class LocalExpertAdapter:
    """A peft `ParamWrapper`'s LoRA update of one fused expert weight, for this rank's experts only.

    peft holds the E experts' rank-r factors of a weight [E, out, in] in one A [E r, in] (expert e's rows
    e r ... e r + r - 1) and one B [out, r E] (expert e's columns e, E + e, 2 E + e, ...: rank-major, the expert
    fastest), and adds (alpha / r) B_e A_e to each expert's matrix ((B_e A_e)^T for a weight stored [E, in, out],
    transformers' `is_transposed`). Here only the local experts' factors are sliced and multiplied, onto the local
    weight (the other experts' factor rows get a zero gradient on this rank: see the module's docstring)."""

    def __init__(self, wrapper: nn.Module, experts: nn.Module) -> None:
        self.wrapper = wrapper
        self.num_experts: int = wrapper.num_experts  # all of them: peft counted them before the weights were cut
        self.transposed = bool(getattr(experts, "is_transposed", False))

    def __call__(self, weight: torch.Tensor, first: int) -> torch.Tensor:
        """`weight` (the local experts', from global expert `first` on) plus each active adapter's update."""
        wrapper = self.wrapper
        if wrapper.merged:
            raise RuntimeError(f"LoRA adapters {wrapper.merged_adapters} are merged into expert-parallel expert weights "
                               f"({wrapper.parameter_name}), which holds only this rank's experts: merge on one process "
                               "(lightning-llm export --merge)")
        if wrapper.disable_adapters:
            return weight
        local = slice(first, first + weight.shape[0])
        # in the weight's dtype, as peft forms the update (autocast would round the sum to its own dtype)
        with torch.autocast(weight.device.type, enabled=False):
            for adapter in [a for a in wrapper.active_adapters if a in wrapper.lora_A]:
                a, b = wrapper.lora_A[adapter].weight, wrapper.lora_B[adapter].weight
                a = a.reshape(self.num_experts, -1, a.shape[-1])[local].to(weight.dtype)  # [e, r, in]
                b = b.reshape(b.shape[0], -1, self.num_experts)[..., local].permute(2, 0, 1).to(weight.dtype)  # [e, out, r]
                lhs, rhs = (a.transpose(1, 2), b.transpose(1, 2)) if self.transposed else (b, a)
                weight = torch.baddbmm(weight, lhs, rhs, alpha=wrapper.scaling[adapter])
        return weight


def shard_experts(members: list[nn.Module], experts: dict[nn.Module, PlannedExperts], mesh: DeviceMesh) -> None:
    """Cut the planned weights of the experts among `members` (just materialised) over `mesh` and give them the
    all-to-all dispatch, which adds the local experts' LoRA updates if peft adapts them. The weights are rank 0's
    (`distribute_tensor` scatters them), as tensor parallelism does."""
    for module in members:
        planned = experts.get(module)
        if planned is None:
            continue
        for name in planned.weights:
            p = module._parameters[name]
            module._parameters[name] = nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)]),
                                                    requires_grad=p.requires_grad)
        adapters = {name: LocalExpertAdapter(wrapper, module) for name, wrapper in planned.adapters.items()}
        dispatch_of(module).shard(mesh, planned.caller, adapters)

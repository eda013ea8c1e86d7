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
rest of the model) are cut the same way; adapters on the experts themselves are not cut with them.
(tests/test_expert_parallel_precision.py, tests/test_expert_parallel_lora.py)

Which modules are experts and which weights are cut comes from the model's Hugging Face expert plan
(`config.base_model_ep_plan`: "grouped_gemm" weights are cut on the expert dimension, an
"ep_dispatch_experts" module gets the all-to-all dispatch), so any transformers MoE that declares one
is split.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

from lightning_llm.moe import dispatch_of, is_experts

# Entries of a Hugging Face expert plan that this module places.
EP_PLAN_STYLES = ("grouped_gemm", "ep_dispatch_experts")


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


def plan_experts(causal_lm: nn.Module, degree: int) -> dict[nn.Module, list[str]]:
    """Every experts module of `causal_lm` with the names of its weights to cut on the expert dimension."""
    from lightning_llm.strategies.tensor import _pattern

    plan = hf_expert_plan(causal_lm)
    modules = dict(causal_lm.named_modules())
    experts: dict[nn.Module, list[str]] = {}
    for name, module in modules.items():
        if plan.get(_pattern(name)) != "ep_dispatch_experts":
            continue
        if not is_experts(module):
            raise NotImplementedError(f"{name}: a {type(module).__name__} (an adapter?) where the plan expects "
                                      "transformers' fused experts (3-D gate_up_proj and down_proj)")
        if module.num_experts % degree:
            raise ValueError(f"expert_parallel={degree} does not divide the {module.num_experts} experts of {name}: "
                             f"each rank holds the same number of whole experts")
        experts[module] = [p for p, _ in module.named_parameters(recurse=False)
                           if plan.get(_pattern(f"{name}.{p}")) == "grouped_gemm"]
    if not experts:
        raise ValueError(f"{type(causal_lm).__name__}'s expert-parallel plan names no module of the model")
    return experts


def shard_experts(members: list[nn.Module], experts: dict[nn.Module, list[str]], mesh: DeviceMesh) -> None:
    """Cut the planned weights of the experts among `members` (just materialised) over `mesh` and give them the
    all-to-all dispatch. The weights are rank 0's (`distribute_tensor` scatters them), as tensor parallelism does."""
    for module in members:
        if module not in experts:
            continue
        for name in experts[module]:
            p = module._parameters[name]
            module._parameters[name] = nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)]),
                                                    requires_grad=p.requires_grad)
        dispatch_of(module).shard(mesh)

"""FLOPs per token, model FLOPs utilisation (MFU), and the Chinchilla compute-optimal planner."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (torch and transformers are imported where used: `lightning-llm plan` is arithmetic only)
    import torch
    from transformers import PretrainedConfig

# Peak dense (no sparsity) FLOP/s from the vendors' data sheets, by device name and compute dtype (torch's
# name; "tfloat32": fp32 matmuls on the tensor cores, which torch uses only when
# `torch.get_float32_matmul_precision()` is not "highest", its default). A key matches a whole word of
# the name as torch.cuda reports it ("L4" is not "L40S", "H200" is not "GH200"); the first key found wins,
# so a variant comes before its family. A device or dtype not here has no peak: no MFU rather than a guess.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H200 NVL": {"bfloat16": 835.5e12, "float16": 835.5e12, "tfloat32": 417.5e12, "float32": 60e12},
    "H200": {"bfloat16": 989.4e12, "float16": 989.4e12, "tfloat32": 494.7e12, "float32": 67e12},
    "H100 PCIe": {"bfloat16": 756.5e12, "float16": 756.5e12, "tfloat32": 378e12, "float32": 51.2e12},
    "H100 NVL": {"bfloat16": 835.5e12, "float16": 835.5e12, "tfloat32": 417.5e12, "float32": 60e12},
    "H100": {"bfloat16": 989.4e12, "float16": 989.4e12, "tfloat32": 494.7e12, "float32": 66.9e12},
    "B200": {"bfloat16": 2250e12, "float16": 2250e12, "tfloat32": 1100e12},
    "A100": {"bfloat16": 312e12, "float16": 312e12, "tfloat32": 156e12, "float32": 19.5e12},
    "L40S": {"bfloat16": 362.05e12, "float16": 362.05e12, "tfloat32": 183e12, "float32": 91.6e12},
    "L40": {"bfloat16": 181e12, "float16": 181e12, "tfloat32": 90.5e12, "float32": 90.5e12},
    "L4": {"bfloat16": 121e12, "float16": 121e12, "tfloat32": 60e12, "float32": 30.3e12},
    "V100-PCIE": {"float16": 112e12, "float32": 14e12},  # (no TF32 before Ampere: fp32 is fp32)
    "V100S": {"float16": 130e12, "float32": 16.4e12},
    "V100": {"float16": 125e12, "float32": 15.7e12},
}


def peak_flops(device: torch.device | str, dtype: torch.dtype) -> float | None:
    """Peak dense FLOP/s of `device` for `dtype`, or None when unknown (CPUs, devices and dtypes not in `PEAK_FLOPS`).

    fp32 counts as TF32 where the device has TF32 and torch's float32 matmul precision lets it run there."""
    import torch

    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, table in PEAK_FLOPS.items():
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", name, flags=re.IGNORECASE):
            kind = str(dtype).removeprefix("torch.")
            if kind == "float32" and "tfloat32" in table and torch.get_float32_matmul_precision() != "highest":
                kind = "tfloat32"
            return table.get(kind)
    return None


def moe_shape(config: PretrainedConfig) -> tuple[int, int, int] | None:
    """(experts, top_k, expert width) of a mixture-of-experts config; None for a dense model.

    Qwen-MoE and OLMoE call the expert count `num_experts`, Mixtral `num_local_experts`; the expert
    width is `moe_intermediate_size` where a config has both it and a dense `intermediate_size`.
    """
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    if not experts:
        return None
    width = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    return experts, config.num_experts_per_tok, width


def is_sparse_layer(config: PretrainedConfig, layer: int) -> bool:
    """Whether decoder layer `layer` is a mixture of experts (Qwen-MoE may interleave dense layers)."""
    if moe_shape(config) is None:
        return False
    step = getattr(config, "decoder_sparse_step", None) or 1
    return layer not in (getattr(config, "mlp_only_layers", None) or []) and (layer + 1) % step == 0


def matmul_params(config: PretrainedConfig) -> int:
    """Parameters that take part in a matmul per token: all but the input embedding lookup.

    Per layer: Q and O projections (d x d each), K and V (d x d_kv each), the gated MLP (3 x d x d_ff);
    plus the LM head (d x V), which computes whether or not it is tied to the embedding. In a
    mixture-of-experts layer a token meets the router (d x experts), its top-k experts (3 x d x
    expert width each) and the shared expert where there is one: the active parameters, not all.
    """
    d, L = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    attn = 2 * d * heads * head_dim + 2 * d * kv_heads * head_dim
    dense_mlp = 3 * d * config.intermediate_size
    total = L * attn + d * config.vocab_size
    shape = moe_shape(config)
    for layer in range(L):
        if not is_sparse_layer(config, layer):
            total += dense_mlp
            continue
        experts, top_k, width = shape
        shared = getattr(config, "shared_expert_intermediate_size", None) or 0
        total += d * experts + top_k * 3 * d * width + (3 * d * shared + d if shared else 0)  # (+ the shared expert's gate)
    return total


def flops_per_token(config: PretrainedConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6N + 12 * n_layer * n_head * head_dim * seq_len, N the active parameters.

    A matmul with N weights costs 2N FLOPs per token forward and 4N backward: 6N. Attention adds
    QK^T and PV, each 2 * seq_len * head_dim per head per token forward, times 3 for the backward:
    12 * L * H * head_dim * T (PaLM's appendix B count; the causal mask's halving is not credited).
    """
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 6 * matmul_params(config) + 12 * config.num_hidden_layers * heads * head_dim * seq_len


def training_flops_per_token(model: torch.nn.Module, seq_len: int) -> float | None:
    """`flops_per_token` for `model` as it trains, where some weights may be frozen (LoRA, QLoRA); None where unknown.

    A frozen matmul weight gets no weight gradient: 4 FLOPs per parameter per token (forward, input gradient)
    instead of 6. Each trainable LoRA parameter (`lora_A`/`lora_B`) is a matmul weight of its own: 6. The
    count keeps the input gradients that autograd skips below the lowest trainable weight (nothing under it
    needs them): it is high by at most those of the layer that holds that weight, 2 per matmul parameter of
    the layer plus its attention's backward (8 * n_head * head_dim * seq_len). Unknown (None): frozen weights
    or adapters in a mixture of experts, whose fused expert weights are not `nn.Linear` modules and meet only
    the top-k experts' tokens.
    """
    import torch

    config = model.config
    params = list(model.named_parameters())
    if all(p.requires_grad for _, p in params):
        return flops_per_token(config, seq_len)
    if moe_shape(config) is not None:
        return None
    frozen = 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) and ".lora_" not in f".{name}" and not weight.requires_grad:
            shape = getattr(getattr(weight, "quant_state", None), "shape", None)  # (a 4-bit weight: the shape it packs)
            frozen += (shape or weight.shape).numel()
    adapters = sum(p.numel() for name, p in params if ".lora_" in f".{name}" and p.requires_grad)
    return flops_per_token(config, seq_len) - 2 * frozen + 6 * adapters


# Chinchilla (Hoffmann et al. 2022), Approach 1: N_opt ∝ C^a and D_opt ∝ C^b with a = b ≈ 0.50.
# The paper rounds a to 0.50; its Table 3 (400M ... 10T parameters) implies a = 0.498, which we use,
# anchored at the paper's headline result: Gopher's budget of 5.76e23 FLOPs is optimal for 67B.
CHINCHILLA_A = 0.498
CHINCHILLA_ANCHOR_FLOPS = 5.76e23
CHINCHILLA_ANCHOR_PARAMS = 67e9
# The budgets of the paper's Table 3 (400M to 10T parameters): a plan outside them extrapolates the fit further
# than the paper does (its own training runs are inside them or below).
CHINCHILLA_TABLE_3_FLOPS = (1.92e19, 1.30e28)


@dataclass(frozen=True)
class Plan:
    """A compute-optimal training run: parameters N, tokens D and compute C = 6 N D."""

    params: float
    tokens: float
    compute: float

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.params

    @property
    def outside_table_3(self) -> bool:
        """Whether the budget lies outside the paper's Table 3, where the plan is a further extrapolation."""
        low, high = CHINCHILLA_TABLE_3_FLOPS
        return not low <= self.compute <= high


def chinchilla_plan(compute: float | None = None, params: float | None = None) -> Plan:
    """The compute-optimal (N, D) for a FLOP budget, or the budget and tokens for a model size."""
    if (compute is None) == (params is None):
        raise ValueError(f"give exactly one of compute or params, got compute={compute}, params={params}")
    name, value = ("compute", compute) if compute is not None else ("params", params)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    try:
        if compute is not None:
            n = CHINCHILLA_ANCHOR_PARAMS * (compute / CHINCHILLA_ANCHOR_FLOPS) ** CHINCHILLA_A
        else:
            n = params
            compute = CHINCHILLA_ANCHOR_FLOPS * (n / CHINCHILLA_ANCHOR_PARAMS) ** (1 / CHINCHILLA_A)
        plan = Plan(params=n, tokens=compute / (6 * n), compute=compute)
    except (OverflowError, ZeroDivisionError):  # (a float power overflows, or underflows to a zero N)
        plan = None
    if plan is None or not all(0 < x < math.inf for x in (plan.params, plan.tokens, plan.compute)):
        raise ValueError(f"{name}={value:g} is too {'large' if value > 1 else 'small'} for the plan's floating-point "
                         "arithmetic (a value of the plan would overflow or be 0); the paper's Table 3 spans "
                         f"{CHINCHILLA_TABLE_3_FLOPS[0]:.3g} to {CHINCHILLA_TABLE_3_FLOPS[1]:.3g} FLOPs, 400M to 10T parameters")
    return plan


def plot_plan(plan: Plan, path: str) -> None:
    """Draw the compute-optimal frontier (N and D against C) with `plan` marked, as a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    budgets = np.logspace(18, 28, 60)
    plans = [chinchilla_plan(compute=c) for c in budgets]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.loglog(budgets, [p.params for p in plans], label="parameters N")
    ax.loglog(budgets, [p.tokens for p in plans], label="tokens D")
    ax.scatter([plan.compute] * 2, [plan.params, plan.tokens], color="black", zorder=3)
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_title(f"Chinchilla plan: N={plan.params:.3g}, D={plan.tokens:.3g}, C={plan.compute:.3g}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    from lightning_llm.report import save_png  # (torch with it: only when a plot is asked for)

    save_png(fig, Path(path))  # never in place: a crash mid-write leaves the old plot
    plt.close(fig)

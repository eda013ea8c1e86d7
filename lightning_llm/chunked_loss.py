"""Fused output projection + cross-entropy over chunks of tokens: the loss without the full logits.

The plain loss materialises the logits of every token, (tokens x vocabulary) in fp32, plus their
gradient: 4k tokens of a 128k vocabulary are 2 GiB each. Here the tokens are taken `chunk_size` at a
time: a chunk's logits are computed, turned into its loss and, right away, into its gradients with
respect to the hidden states and the output weight (softmax minus one-hot, times the weight or the
hidden states), then dropped. Only the (tokens x hidden) gradient and the weight's gradient are kept
until backward, which just scales them by the incoming gradient. The loss is summed over the target
tokens (`ignore_index` targets count for nothing); the caller divides by its token count.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _LinearCrossEntropySum(torch.autograd.Function):
    """sum over tokens of cross_entropy(hidden @ weight.T + bias, targets), gradients computed in forward."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk_size: int,
                ignore_index: int) -> Tensor:
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        fp32 = torch.promote_types(torch.float32, weight.dtype)  # fp32 at least (fp64 stays fp64)
        total = torch.zeros((), dtype=fp32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        # The weight's gradient sums over every token: accumulated in fp32 whatever the weight's dtype.
        grad_weight = torch.zeros(weight.shape, dtype=fp32, device=weight.device) if want_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=fp32, device=bias.device) if want_bias else None
        for start in range(0, hidden.shape[0], chunk_size):
            h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
            # The logits in the dtype the plain head would give (autocast included), the loss in fp32.
            logits = F.linear(h, weight, bias).to(fp32)
            keep = t != ignore_index
            safe = torch.where(keep, t, 0)
            lse = torch.logsumexp(logits, dim=-1)
            total += ((lse - logits.gather(1, safe[:, None]).squeeze(1)) * keep).sum()
            if not (want_hidden or want_weight or want_bias):
                continue
            # d(loss)/d(logits) = softmax - one_hot(target), zero on ignored tokens; computed in place.
            grad = logits.sub_(lse[:, None]).exp_()
            grad[torch.arange(len(t), device=t.device), safe] -= 1
            grad *= keep[:, None]
            if want_hidden:
                grad_hidden[start:start + chunk_size] = (grad.to(weight.dtype) @ weight).to(hidden.dtype)
            if want_weight:
                grad_weight.addmm_(grad.t(), h.to(fp32))
            if want_bias:
                grad_bias += grad.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        return (None if grad_hidden is None else grad_hidden * grad_total.to(grad_hidden.dtype),
                None if grad_weight is None else (grad_weight * grad_total).to(weight_dtype),
                None if grad_bias is None else (grad_bias * grad_total).to(bias_dtype),
                None, None, None)


def linear_cross_entropy_sum(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None, *,
                             chunk_size: int = 1024, ignore_index: int = -100) -> Tensor:
    """Summed cross-entropy of the logits `hidden @ weight.T + bias` against `targets`, never holding more
    than `chunk_size` tokens' logits; equal to `F.cross_entropy(logits.float(), targets, reduction="sum")`.

    `hidden` is (..., hidden_size) and `targets` its leading shape; `ignore_index` targets count for nothing.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 tokens, got {chunk_size}")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden states {tuple(hidden.shape)} and targets {tuple(targets.shape)} disagree on the tokens")
    return _LinearCrossEntropySum.apply(hidden.flatten(0, -2), weight, bias, targets.flatten(), chunk_size, ignore_index)


# Config fields by which a Hugging Face model transforms its logits after the output projection (Gemma's
# soft-capping, Cohere's and Granite's scaling): the fused loss computes `hidden @ weight.T + bias` only.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def output_head(model: nn.Module) -> nn.Linear:
    """The output projection of a Hugging Face causal LM (PEFT-wrapped or not) whose logits the fused loss
    computes itself; raises when the model's logits are not that projection's output alone."""
    head = model.get_output_embeddings()
    fix = "set loss_chunk_size=0 for the plain loss on the model's own logits"
    if type(head) is not nn.Linear:
        raise ValueError(f"the chunked loss needs the output projection to be a plain torch.nn.Linear, but it is "
                         f"{type(head).__module__}.{type(head).__qualname__} (an adapter or a quantised layer on "
                         f"lm_head: leave lm_head out of the adapter's target_modules, or {fix})")
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    transforms = [f"{name}={getattr(base.config, name)}" for name in _LOGIT_TRANSFORMS
                  if getattr(base.config, name, None) not in (None, 1, 1.0)]
    if transforms:
        raise ValueError(f"the chunked loss computes hidden @ lm_head.weight.T, but this {base.config.model_type} model "
                         f"transforms its logits ({', '.join(transforms)}): {fix}")
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        raise ValueError(f"the chunked loss needs a model whose forward takes `logits_to_keep` (to skip its own "
                         f"logits); {type(base).__name__}.forward does not: {fix}")
    return head


def final_hidden_states(model: nn.Module, **inputs: Any) -> Tensor:
    """The hidden states the output projection would take (the decoder's output, after its final norm).

    The whole model is called, with no logits kept, rather than its decoder alone: wrappers on the
    outer model (PEFT, a sharding strategy's gather of the parameters) then run as in a plain forward.
    """
    captured: list[Tensor] = []
    handle = model.get_decoder().register_forward_hook(lambda module, args, output: captured.append(output[0]))
    try:
        model(**inputs, logits_to_keep=torch.empty(0, dtype=torch.long, device=inputs["input_ids"].device))
    finally:
        handle.remove()
    return captured[-1]

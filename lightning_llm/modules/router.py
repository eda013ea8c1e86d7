"""The router terms of a mixture-of-experts objective: load balance, z-loss, and expert token counts.

Each takes the router logits a transformers MoE model returns with `output_router_logits=True` (one
tensor of shape [tokens, experts] per sparse layer) and a mask of the tokens that count (padding
excluded), computes each layer on its own and averages over layers. transformers' own
`load_balancing_loss_func` pools the token fractions and router probabilities of all layers before
multiplying them, so it would let one layer send everything to expert 0 and another everything to
expert 1 and still read as balanced; expert i of one layer has nothing to do with expert i of
another, so the balance here is per layer (as Switch Transformer and Megatron-Core compute it).
"""

from __future__ import annotations

import torch


def _kept(router_logits: tuple[torch.Tensor, ...], mask: torch.Tensor | None) -> list[torch.Tensor]:
    # At least fp32 whatever the autocast dtype: a softmax and a square of bf16 logits would round too coarsely.
    keep = None if mask is None else mask.reshape(-1).bool()
    wide = [layer.to(torch.promote_types(layer.dtype, torch.float32)) for layer in router_logits]
    return wide if keep is None else [layer[keep.to(layer.device)] for layer in wide]


def expert_token_counts(router_logits: tuple[torch.Tensor, ...], top_k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens routed to each expert, [layers, experts]: each token counts once in each of its top-k.

    The top-k is taken on the softmax probabilities as the models route (the same order as on the logits)."""
    logits = _kept(router_logits, mask)
    experts = logits[0].shape[-1]
    return torch.stack([torch.bincount(layer.topk(top_k, dim=-1).indices.flatten(), minlength=experts)
                        for layer in logits])


def load_balancing_loss(router_logits: tuple[torch.Tensor, ...], top_k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch Transformer's auxiliary loss, per layer `experts * sum_e f_e * P_e`, averaged over layers.

    f_e is the fraction of the layer's T * top_k assignments that went to expert e (no gradient: a
    count), P_e the mean router probability of expert e over the T tokens. Normalising f by top_k
    (Megatron-Core's choice; Mixtral's form divides by T only) makes a perfectly even load read 1.0
    whatever top_k is, and concentrating all tokens on top_k experts reads experts / top_k.
    """
    logits = _kept(router_logits, mask)
    losses = []
    for layer in logits:
        tokens, experts = layer.shape
        probs = layer.softmax(dim=-1)
        counts = torch.bincount(probs.topk(top_k, dim=-1).indices.flatten(), minlength=experts)
        fraction = counts.to(probs.dtype) / max(tokens * top_k, 1)
        losses.append(experts * (fraction * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


def router_z_loss(router_logits: tuple[torch.Tensor, ...], mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE's router z-loss: the mean over tokens of logsumexp(logits)^2, averaged over layers.

    It keeps the router logits small, where the softmax (and bf16 rounding of the logits) is well behaved."""
    logits = _kept(router_logits, mask)
    return torch.stack([layer.logsumexp(dim=-1).square().mean() for layer in logits]).mean()

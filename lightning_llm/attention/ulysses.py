"""All-to-all attention (DeepSpeed Ulysses): exact attention over a sequence split across a process group by
sharding heads instead of the sequence inside attention.

Each of the N ranks holds 1/N of every sequence (the load-balanced share `shard_sequence` cuts: chunks i and
2N-1-i of 2N) for all heads. An all-to-all gives every rank the whole sequence for 1/N of the heads
([batch, heads, seq/N, dim] -> [batch, heads/N, seq, dim]); the rank runs `flash_attention` on it, causal mask
and all, as on one process; a second all-to-all gives the output back as the rank's share of the sequence for
every head. Four all-to-alls forward (Q, K, V, O), each moving (N - 1)/N of its tensor, and four backward
(dO in, dQ, dK, dV out): autograd runs the inverse all-to-all of each.

The all-to-all keeps the batch's load-balanced chunk order (one sharding of the batch for both attention
modes, and the same 2N sequence-length rule): the ranks' shares arrive in rank order, chunks 0, 2N-1, 1,
2N-2, ..., so the whole sequence is put back in token order before the causal attention and the output cut
back into that order after it (`load_balanced_indices` names which token each position holds).

Packed rows (several documents per row, a document starting wherever the position ids do not go on by one:
`document_starts`, the rule `lightning_fa2` and ring attention keep too): with the whole sequence on every rank,
each document is whole too, so the attention is the one-process packed call. Every rank gathers the rows'
position ids once per call (an all-gather of one integer per token, as ring attention does), finds the
documents' boundaries over the flattened rows (`packed_cu_seqlens`) and runs `flash_attention` on them as
varlen sequences (the Triton varlen kernels on CUDA, one CPU FlashAttention call per document on the CPU): a
query sees only the keys of its own document, causal inside it. Nothing else moves; the all-to-alls are the
unpacked ones.

Grouped-query attention: K/V heads are split as the query heads are when N divides their count; when N is a
multiple of it, each K/V head is repeated N / kv_heads times before the all-to-all so that every rank receives
the one K/V head its query heads read (autograd sums the repeats' gradients). Other counts are refused.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_llm.attention.flash import as_tokens, autocast_inputs, flash_attention, packed_cu_seqlens
from lightning_llm.attention.ring import check_position_ids, load_balanced_indices, whole_position_ids


def check_heads(heads: int, kv_heads: int, world_size: int) -> None:
    """Raise unless `world_size` ranks can each take 1/world_size of the query heads and of the K/V heads (or,
    when world_size is a multiple of the K/V heads, one K/V head repeated on the ranks whose query heads read it)."""
    if heads % world_size or (kv_heads % world_size and world_size % kv_heads):
        fits = [n for n in range(1, heads + 1) if heads % n == 0 and (kv_heads % n == 0 or n % kv_heads == 0)]
        raise ValueError(f"all-to-all context parallelism over {world_size} ranks gives each rank 1/{world_size} of "
                         f"the attention heads, but the model has {heads} query heads and {kv_heads} K/V heads: "
                         f"the degree must divide the query heads, and divide the K/V heads or be a multiple of "
                         f"them; degrees that fit: {fits} (or context_parallel_mode='ring', which takes any head "
                         f"count)")


class _AllToAll(torch.autograd.Function):
    """`dist.all_to_all_single` of equal parts along dim 0 (part j to rank j), differentiable: the gradient
    takes the same exchange back. By hand because torch's differentiable versions are deprecated
    (torch.distributed.nn) or private (_functional_collectives); this one calls only the public collective."""

    @staticmethod
    def forward(ctx, parts: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        ctx.group = group
        received = torch.empty_like(parts, memory_format=torch.contiguous_format)  # the parts' views are strided
        dist.all_to_all_single(received, parts.contiguous(), group=group)
        return received

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        returned = torch.empty_like(grad, memory_format=torch.contiguous_format)
        dist.all_to_all_single(returned, grad.contiguous(), group=ctx.group)
        return returned, None


def _token_order(seq_len: int, world_size: int, device: torch.device) -> Tensor:
    """The token each position of the ranks' shares laid end to end in rank order holds."""
    return torch.cat([load_balanced_indices(seq_len, world_size, r, device) for r in range(world_size)])


def _heads_to_sequence(x: Tensor, group: dist.ProcessGroup | None, order: Tensor) -> Tensor:
    """[batch, heads, seq/N, dim] shares of the sequence -> [batch, heads/N, seq, dim] whole sequences in token
    order (`order` from `_token_order`): rank j receives head block j from every rank."""
    world_size = dist.get_world_size(group)
    batch, heads, share, dim = x.shape
    parts = x.reshape(batch, world_size, heads // world_size, share, dim).transpose(0, 1)
    shares = _AllToAll.apply(parts, group)  # [N, batch, heads/N, share, dim]: shares[r] is rank r's tokens
    in_rank_order = shares.permute(1, 2, 0, 3, 4).reshape(batch, heads // world_size, world_size * share, dim)
    return in_rank_order.index_select(2, torch.argsort(order))


def _sequence_to_heads(x: Tensor, group: dist.ProcessGroup | None, order: Tensor) -> Tensor:
    """The inverse of `_heads_to_sequence`: [batch, heads/N, seq, dim] -> this rank's [batch, heads, seq/N, dim]."""
    world_size = dist.get_world_size(group)
    batch, heads, seq, dim = x.shape
    share = seq // world_size
    parts = x.index_select(2, order).reshape(batch, heads, world_size, share, dim).permute(2, 0, 1, 3, 4)
    blocks = _AllToAll.apply(parts, group)  # [N, batch, heads/N, share, dim]: blocks[j] is head block j
    return blocks.transpose(0, 1).reshape(batch, world_size * heads, share, dim)


def _attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor | None, **options) -> Tensor:
    """`flash_attention` over whole rows [batch, heads, seq, head_dim] in token order: dense, or, given the
    packed documents' boundaries over the flattened rows, one varlen call in which no document sees another."""
    if cu_seqlens is None:
        return flash_attention(q, k, v, **options)
    batch, heads, seq, head_dim = q.shape
    o = flash_attention(as_tokens(q), as_tokens(k), as_tokens(v), cu_seqlens=cu_seqlens, **options)
    return o.view(batch, seq, heads, head_dim).transpose(1, 2)


def ulysses_attention(
    q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup | None = None, *, causal: bool = True,
    scale: float | None = None, deterministic: bool = False, position_ids: Tensor | None = None,
) -> Tensor:
    """`flash_attention(q, k, v, causal=causal)` over sequences split across the ranks of `group`, by all-to-all.

    q is [batch, heads, seq, head_dim] and k, v [batch, kv_heads, seq, head_dim]: this rank's share of the
    sequence, the positions `load_balanced_indices` names (as `ring_attention` takes them). The group's size N
    must divide the heads, and divide the K/V heads or be a multiple of them (`check_heads`). Returns this rank's
    share of the output; the backward pass returns each rank the gradient of its own share. Every rank of
    `group` must call it with the same shapes.

    `position_ids` ([batch or 1, seq], this rank's share of them, as `shard_sequence` cuts the rows' position
    ids): where they restart inside a row (packed documents), a query sees only the keys of its own document,
    as `flash_attention` with those documents' `cu_seqlens` would.
    """
    world_size = dist.get_world_size(group)
    if q.dim() != 4 or k.dim() != 4 or k.shape[2] != q.shape[2]:
        raise ValueError(f"ulysses_attention takes [batch, heads, seq, head_dim] shares with as many queries as keys, "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}")
    check_heads(q.shape[1], k.shape[1], world_size)
    cu_seqlens = None
    if position_ids is not None:
        check_position_ids(position_ids, q)
        cu_seqlens = packed_cu_seqlens(whole_position_ids(position_ids, q.shape[0], group), q.shape[0])
    q, k, v = autocast_inputs(q, k, v)  # the all-to-alls move the attention's dtype, as SDPA would compute in
    options = dict(causal=causal, scale=scale, deterministic=deterministic)
    if world_size == 1:
        return _attention(q, k, v, cu_seqlens, **options)
    if k.shape[1] < world_size:  # every rank receives the one K/V head its query heads read
        k, v = (x.repeat_interleave(world_size // x.shape[1], dim=1) for x in (k, v))
    order = _token_order(q.shape[2] * world_size, world_size, q.device)
    q, k, v = (_heads_to_sequence(x, group, order) for x in (q, k, v))
    return _sequence_to_heads(_attention(q, k, v, cu_seqlens, **options), group, order)

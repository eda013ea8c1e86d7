"""Ring attention: exact attention over a sequence split across the ranks of a process group.

Each of the N ranks holds 1/N of every sequence's queries, keys and values. The K/V blocks travel around
the ring (rank r sends to r + 1 and receives from r - 1) with point-to-point sends that run while the
current block is computed; each block's partial output is merged into the running one by their
log-sum-exps (Liu, Zaharia and Abbeel, "Ring Attention with Blockwise Transformers", 2023). The backward
pass sends K/V around once more, together with the dK/dV accumulated so far for that block, which arrives
home after a full turn; every block's share of the gradient comes from `flash_attention_backward` with the
merged output and log-sum-exp.

Load balance for causal masks: the sequence is cut into 2N chunks and rank i holds chunks i and 2N-1-i
(`load_balanced_indices`), so that every rank has as many visible (query, key) pairs: against the K/V of a
rank j < i both of its query chunks see j's first chunk whole and its second not at all; against j > i only
its second query chunk sees anything, and it sees both of j's chunks whole. Every step is then one
unmasked half-size block (the diagonal step one causal full-size block), the same work on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_llm.attention.flash import autocast_inputs, flash_attention, flash_attention_backward


def load_balanced_indices(seq_len: int, world_size: int, rank: int, device: torch.device | str = "cpu") -> Tensor:
    """The positions of a `seq_len` sequence that `rank` of `world_size` holds: chunks rank and
    2 world_size - 1 - rank of 2 world_size equal chunks, in that order."""
    check_sequence_length(seq_len, world_size)
    chunk = seq_len // (2 * world_size)
    first, second = rank * chunk, (2 * world_size - 1 - rank) * chunk
    return torch.cat([torch.arange(first, first + chunk, device=device),
                      torch.arange(second, second + chunk, device=device)])


def check_sequence_length(seq_len: int, world_size: int) -> None:
    """Raise unless a `seq_len` sequence cuts into 2 x `world_size` equal chunks."""
    chunks = 2 * world_size
    if seq_len % chunks:
        raise ValueError(f"context parallelism over {world_size} ranks cuts a sequence into 2 x {world_size} = "
                         f"{chunks} equal chunks, but the sequence length {seq_len} is not a multiple of {chunks}: "
                         f"pad or cut sequences to a multiple of it (e.g. {seq_len // chunks * chunks} or "
                         f"{-(-seq_len // chunks) * chunks})")


def shard_sequence(x: Tensor, dim: int, group: dist.ProcessGroup | None = None) -> Tensor:
    """This rank's load-balanced share of `x` along its sequence dimension `dim` (the whole of `x` on every rank)."""
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    return x.index_select(dim, load_balanced_indices(x.shape[dim], world_size, rank, x.device))


def unshard_sequence(x: Tensor, dim: int, group: dist.ProcessGroup | None = None) -> Tensor:
    """The whole sequence from every rank's `shard_sequence` share (an all-gather, then the chunks put back in order)."""
    world_size = dist.get_world_size(group)
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    chunks: list[Tensor | None] = [None] * (2 * world_size)
    for rank, part in enumerate(parts):
        chunks[rank], chunks[2 * world_size - 1 - rank] = part.chunk(2, dim=dim)
    return torch.cat(chunks, dim=dim)


_KV, _DKV = 0, 1  # the tags of the two streams the backward pass has in flight at once


class _Ring:
    """Sends to the next rank and receives from the previous one, asynchronously (one batch of point-to-point
    operations, so that NCCL pairs every send with its receive and two neighbours cannot wait on each other)."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)

    def start(self, send: Tensor, tag: int) -> tuple[list[dist.Work], Tensor]:
        """Send `send` on, receive the previous rank's tensor of its shape; `tag` keeps two streams apart."""
        received = torch.empty_like(send)
        ops = [dist.P2POp(dist.isend, send, group=self.group, group_peer=(self.rank + 1) % self.size, tag=tag),
               dist.P2POp(dist.irecv, received, group=self.group, group_peer=(self.rank - 1) % self.size, tag=tag)]
        return dist.batch_isend_irecv(ops), received

    @staticmethod
    def wait(pending: tuple[list[dist.Work], Tensor]) -> Tensor:
        works, received = pending
        for work in works:
            work.wait()
        return received


def _block(step: int, rank: int, chunk: int, causal: bool) -> tuple[slice, slice, bool]:
    """Which local queries see which keys of the K/V that came from rank - step: (query rows, key rows, causal)."""
    every = slice(None)
    if not causal:
        return every, every, False
    if step == 0:
        return every, every, True
    if step <= rank:  # from a rank before this one: both query chunks see its first chunk only
        return every, slice(0, chunk), False
    return slice(chunk, None), every, False  # from a rank after: only the second query chunk, all its keys


def _merge(o: Tensor, lse: Tensor, block_o: Tensor, block_lse: Tensor) -> tuple[Tensor, Tensor]:
    """Two softmax-weighted outputs over disjoint keys as one: weights exp(lse_part - lse_all), in float32."""
    merged = torch.logaddexp(lse, block_lse)
    o = o * torch.exp(lse - merged)[..., None] + block_o.float() * torch.exp(block_lse - merged)[..., None]
    return o, merged


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal, scale, deterministic):
        ctx.set_materialize_grads(False)
        ring = _Ring(group)
        chunk = q.shape[2] // 2
        kv = torch.stack([k, v])
        o = q.new_zeros(q.shape, dtype=torch.float32)
        lse = q.new_full(q.shape[:3], -torch.inf, dtype=torch.float32)
        for step in range(ring.size):
            pending = ring.start(kv, _KV) if step < ring.size - 1 else None
            rows, cols, block_causal = _block(step, ring.rank, chunk, causal)
            block_o, block_lse = flash_attention(q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols],
                                                 causal=block_causal, scale=scale, return_lse=True)
            o[:, :, rows], lse[:, :, rows] = _merge(o[:, :, rows], lse[:, :, rows], block_o, block_lse)
            if pending is not None:
                kv = _Ring.wait(pending)
        o = o.to(q.dtype)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.group, ctx.causal, ctx.scale, ctx.deterministic = group, causal, scale, deterministic
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        if dlse is not None:
            raise NotImplementedError("ring_attention's log-sum-exp (return_lse=True) carries no gradient: use it "
                                      "detached")
        if do is None:
            return (None,) * 7
        q, k, v, o, lse = ctx.saved_tensors
        ring = _Ring(ctx.group)
        chunk = q.shape[2] // 2
        kv = torch.stack([k, v])
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)
        pending_dkv = None
        for step in range(ring.size):
            pending_kv = ring.start(kv, _KV) if step < ring.size - 1 else None
            rows, cols, block_causal = _block(step, ring.rank, chunk, ctx.causal)
            block_dq, block_dk, block_dv = flash_attention_backward(
                do[:, :, rows], q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols], o[:, :, rows],
                lse[:, :, rows], causal=block_causal, scale=ctx.scale, deterministic=ctx.deterministic)
            dq[:, :, rows] += block_dq
            if pending_dkv is not None:
                # The dK/dV of the block in hand, accumulated by the ranks it visited before this one.
                dkv = _Ring.wait(pending_dkv)
            dkv[0][:, :, cols] += block_dk
            dkv[1][:, :, cols] += block_dv
            pending_dkv = ring.start(dkv, _DKV)
            if pending_kv is not None:
                kv = _Ring.wait(pending_kv)
        # After a full turn every block's gradient is back with its owner.
        dk, dv = _Ring.wait(pending_dkv)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def ring_attention(
    q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup | None = None, *, causal: bool = True,
    scale: float | None = None, deterministic: bool = False, return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """`flash_attention(q, k, v, causal=causal)` over sequences split across the ranks of `group`.

    q is [batch, heads, seq, head_dim] and k, v [batch, kv_heads, seq, head_dim] (grouped-query heads are sent
    and computed unrepeated): this rank's share of the sequence, the positions `load_balanced_indices` names
    (`shard_sequence` cuts it). Returns this rank's share of the output, and with `return_lse` the float32
    log-sum-exp [batch, heads, seq] of its queries over all keys (no gradient flows through it). The backward
    pass returns each rank the gradient of its own share. Every rank of `group` must call it with the same
    shapes.
    """
    world_size = dist.get_world_size(group)
    q, k, v = autocast_inputs(q, k, v)  # the whole ring, backward included, in the dtype of its forward
    seq = q.shape[2]
    if q.dim() != 4 or k.dim() != 4 or k.shape[2] != seq:
        raise ValueError(f"ring_attention takes [batch, heads, seq, head_dim] shares with as many queries as keys, "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if causal and seq % 2:
        raise ValueError(f"causal ring attention holds two equal chunks per rank (load balance), but this rank's "
                         f"share has an odd length {seq}: shard a sequence whose length is a multiple of "
                         f"2 x {world_size} with shard_sequence")
    if world_size == 1:
        return flash_attention(q, k, v, causal=causal, scale=scale, deterministic=deterministic, return_lse=return_lse)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    o, lse = _RingAttention.apply(q, k.contiguous(), v.contiguous(), group, causal, scale, deterministic)
    return (o, lse) if return_lse else o

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

Packed rows (several documents per row, a document starting wherever the position ids do not go on by one:
`document_starts`, the rule `lightning_fa2` keeps too): a query sees a key only in its own document. Every rank
gathers the rows' position ids once per call (an all-gather of one integer per token) and numbers the
documents, so it knows the documents of every rank's tokens and nothing more travels with K/V (the numbers,
one int64 per token of the whole rows, are kept for the backward pass). A block pair then runs as one packed
(varlen) call over the documents its queries and keys share: a document's tokens are one run in every
rank's share (chunk i precedes chunk 2N-1-i), so the query run and key run of each shared document pair up as
the varlen kernels' sequences; causal attention stays causal on the diagonal step (the same tokens on both
sides) and is full on the others (there all keys precede the queries). Queries whose document has no key in
the block get nothing from it (log-sum-exp -inf in the merge). Finding the shared documents costs a few
host syncs per block. This runs on the Triton varlen kernels on CUDA and on torch's CPU FlashAttention op,
one call per document, on the CPU: no masked fallback is needed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_llm.attention.flash import (
    autocast_inputs,
    cu_seqlens_of,
    document_starts,
    flash_attention,
    flash_attention_backward,
)


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
    # A row no key has reached in either part (both -inf) stays 0 with lse -inf, not exp(-inf - -inf) = nan.
    safe = merged.masked_fill(merged == -torch.inf, 0.0)
    o = o * torch.exp(lse - safe)[..., None] + block_o.float() * torch.exp(block_lse - safe)[..., None]
    return o, merged


def check_position_ids(position_ids: Tensor, q: Tensor) -> None:
    """Raise unless `position_ids` is this rank's share [batch or 1, seq] for its queries q [batch, heads, seq, dim]."""
    batch, seq = q.shape[0], q.shape[2]
    if position_ids.dim() != 2 or position_ids.shape[1] != seq or position_ids.shape[0] not in (1, batch):
        raise ValueError(f"position_ids must be this rank's share [batch or 1, seq] = [{batch} or 1, {seq}], "
                         f"got {tuple(position_ids.shape)}")


def whole_position_ids(position_ids: Tensor, batch: int, group: dist.ProcessGroup | None) -> Tensor:
    """The whole rows' position ids [batch, seq] in sequence order, from every rank's share of them (an
    all-gather of one integer per token): every rank gathers the same rows, so every rank finds the same
    documents and takes the same path."""
    shares = position_ids.expand(batch, -1).contiguous()
    return unshard_sequence(shares, dim=1, group=group) if dist.get_world_size(group) > 1 else shares


def _documents(position_ids: Tensor, batch: int, group: dist.ProcessGroup | None) -> Tensor | None:
    """The document number of every token of the whole rows [batch, seq], in sequence order (numbers rise along
    each row and from row to row), from every rank's share of the position ids; None when no row is packed."""
    starts = document_starts(whole_position_ids(position_ids, batch, group))
    if not bool(starts[:, 1:].any()):
        return None
    return starts.flatten().cumsum(0).view(starts.shape)


class _SharedDocuments(NamedTuple):
    """The (query, key) pairs of a block that share a document, as packed sequences: which of the block's
    tokens (flattened over batch and sequence) take part, and the sequences' boundaries on each side."""
    q_index: Tensor
    k_index: Tensor
    packing: dict


def _shared_documents(q_documents: Tensor, k_documents: Tensor) -> _SharedDocuments | None:
    """The documents that a block's queries and keys ([batch, len] document numbers) both hold, None if none."""
    q_ids, q_lengths = torch.unique_consecutive(q_documents.flatten(), return_counts=True)
    k_ids, k_lengths = torch.unique_consecutive(k_documents.flatten(), return_counts=True)
    q_shared, k_shared = torch.isin(q_ids, k_ids), torch.isin(k_ids, q_ids)
    if not bool(q_shared.any()):
        return None
    q_index = torch.repeat_interleave(q_shared, q_lengths).nonzero().flatten()
    k_index = torch.repeat_interleave(k_shared, k_lengths).nonzero().flatten()
    q_lengths, k_lengths = q_lengths[q_shared], k_lengths[k_shared]
    packing = dict(cu_seqlens=cu_seqlens_of(q_lengths), cu_seqlens_k=cu_seqlens_of(k_lengths),
                   max_seqlen=int(q_lengths.max()), max_seqlen_k=int(k_lengths.max()))
    return _SharedDocuments(q_index, k_index, packing)


def _gather(x: Tensor, index: Tensor) -> Tensor:
    """Tokens `index` (flattened over batch and sequence) of [batch, heads, seq, ...] as packed [n, heads, ...]."""
    return x.transpose(1, 2).flatten(0, 1).index_select(0, index)


def _scatter(tokens: Tensor, index: Tensor, batch: int, seq: int, fill: float) -> Tensor:
    """`_gather`'s inverse: packed [n, heads, ...] tokens put at `index` of a [batch, heads, seq, ...] tensor
    filled with `fill` elsewhere."""
    whole = tokens.new_full((batch * seq, *tokens.shape[1:]), fill).index_copy(0, index, tokens)
    return whole.unflatten(0, (batch, seq)).transpose(1, 2)


def _document_attention(q: Tensor, k: Tensor, v: Tensor, shared: _SharedDocuments, causal: bool, scale: float,
                        deterministic: bool = False) -> tuple[Tensor, Tensor]:
    """Attention of [batch, heads, seq, head_dim] queries over keys of their own documents only, as one packed
    call: (O, float32 lse) with O 0 and lse -inf for queries whose document has no key here."""
    batch, _, seq, _ = q.shape
    o, lse = flash_attention(_gather(q, shared.q_index), _gather(k, shared.k_index), _gather(v, shared.k_index),
                             causal=causal, scale=scale, deterministic=deterministic, return_lse=True,
                             **shared.packing)
    return (_scatter(o, shared.q_index, batch, seq, 0.0),
            _scatter(lse.t()[..., None], shared.q_index, batch, seq, -torch.inf)[..., 0])


def _document_attention_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                                 shared: _SharedDocuments, causal: bool, scale: float,
                                 deterministic: bool) -> tuple[Tensor, Tensor, Tensor]:
    """`_document_attention`'s share of dQ, dK, dV (zero off the shared documents), from the merged O and lse."""
    (batch, _, seq_q, _), seq_k = q.shape, k.shape[2]
    dq, dk, dv = flash_attention_backward(
        _gather(do, shared.q_index), _gather(q, shared.q_index), _gather(k, shared.k_index),
        _gather(v, shared.k_index), _gather(o, shared.q_index),
        _gather(lse[..., None], shared.q_index)[..., 0].t().contiguous(), causal=causal, scale=scale,
        deterministic=deterministic, **shared.packing)
    return (_scatter(dq, shared.q_index, batch, seq_q, 0.0), _scatter(dk, shared.k_index, batch, seq_k, 0.0),
            _scatter(dv, shared.k_index, batch, seq_k, 0.0))


def _share(documents: Tensor | None, rank: int, world_size: int) -> Tensor | None:
    """The document numbers of the tokens `rank` holds (its `load_balanced_indices`), or None for unpacked rows."""
    if documents is None:
        return None
    return documents.index_select(1, load_balanced_indices(documents.shape[1], world_size, rank, documents.device))


def _attend(q: Tensor, k: Tensor, v: Tensor, q_documents: Tensor | None, k_documents: Tensor | None, causal: bool,
            scale: float) -> tuple[Tensor, Tensor] | None:
    """One block's (O, lse): dense, or for packed rows over the keys of each query's document only (None when
    the block's queries and keys share no document)."""
    if q_documents is None:
        return flash_attention(q, k, v, causal=causal, scale=scale, return_lse=True)
    shared = _shared_documents(q_documents, k_documents)
    return None if shared is None else _document_attention(q, k, v, shared, causal, scale)


def _attend_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                     q_documents: Tensor | None, k_documents: Tensor | None, causal: bool, scale: float,
                     deterministic: bool) -> tuple[Tensor, Tensor, Tensor] | None:
    """`_attend`'s block's share of dQ, dK, dV from the merged O and lse (None where it had no pair)."""
    if q_documents is None:
        return flash_attention_backward(do, q, k, v, o, lse, causal=causal, scale=scale, deterministic=deterministic)
    shared = _shared_documents(q_documents, k_documents)
    if shared is None:
        return None
    return _document_attention_backward(do, q, k, v, o, lse, shared, causal, scale, deterministic)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal, scale, deterministic, documents):
        ctx.set_materialize_grads(False)
        ring = _Ring(group)
        chunk = q.shape[2] // 2
        mine = _share(documents, ring.rank, ring.size)
        kv = torch.stack([k, v])
        o = q.new_zeros(q.shape, dtype=torch.float32)
        lse = q.new_full(q.shape[:3], -torch.inf, dtype=torch.float32)
        for step in range(ring.size):
            pending = ring.start(kv, _KV) if step < ring.size - 1 else None
            rows, cols, block_causal = _block(step, ring.rank, chunk, causal)
            theirs = _share(documents, (ring.rank - step) % ring.size, ring.size)
            block = _attend(q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols], None if mine is None else mine[:, rows],
                            None if theirs is None else theirs[:, cols], block_causal, scale)
            if block is not None:
                o[:, :, rows], lse[:, :, rows] = _merge(o[:, :, rows], lse[:, :, rows], *block)
            if pending is not None:
                kv = _Ring.wait(pending)
        # O in [batch, seq, heads, head_dim] memory, as the kernels write it: the output projection's input is
        # then a view of it, not one more saved copy per layer.
        batch, heads, seq, head_dim = q.shape
        o = q.new_empty(batch, seq, heads, head_dim).transpose(1, 2).copy_(o)
        ctx.save_for_backward(q, k, v, o, lse, documents)
        ctx.group, ctx.causal, ctx.scale, ctx.deterministic = group, causal, scale, deterministic
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        if dlse is not None:
            raise NotImplementedError("ring_attention's log-sum-exp (return_lse=True) carries no gradient: use it "
                                      "detached")
        if do is None:
            return (None,) * 8
        q, k, v, o, lse, documents = ctx.saved_tensors
        ring = _Ring(ctx.group)
        chunk = q.shape[2] // 2
        mine = _share(documents, ring.rank, ring.size)
        kv = torch.stack([k, v])
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)
        pending_dkv = None
        for step in range(ring.size):
            pending_kv = ring.start(kv, _KV) if step < ring.size - 1 else None
            rows, cols, block_causal = _block(step, ring.rank, chunk, ctx.causal)
            theirs = _share(documents, (ring.rank - step) % ring.size, ring.size)
            grads = _attend_backward(do[:, :, rows], q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols],
                                     o[:, :, rows], lse[:, :, rows], None if mine is None else mine[:, rows],
                                     None if theirs is None else theirs[:, cols], block_causal, ctx.scale,
                                     ctx.deterministic)
            if grads is not None:
                dq[:, :, rows] += grads[0]
            if pending_dkv is not None:
                # The dK/dV of the block in hand, accumulated by the ranks it visited before this one.
                dkv = _Ring.wait(pending_dkv)
            if grads is not None:
                dkv[0][:, :, cols] += grads[1]
                dkv[1][:, :, cols] += grads[2]
            pending_dkv = ring.start(dkv, _DKV)
            if pending_kv is not None:
                kv = _Ring.wait(pending_kv)
        # After a full turn every block's gradient is back with its owner.
        dk, dv = _Ring.wait(pending_dkv)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def ring_attention(
    q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup | None = None, *, causal: bool = True,
    scale: float | None = None, deterministic: bool = False, return_lse: bool = False,
    position_ids: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """`flash_attention(q, k, v, causal=causal)` over sequences split across the ranks of `group`.

    q is [batch, heads, seq, head_dim] and k, v [batch, kv_heads, seq, head_dim] (grouped-query heads are sent
    and computed unrepeated): this rank's share of the sequence, the positions `load_balanced_indices` names
    (`shard_sequence` cuts it). Returns this rank's share of the output, and with `return_lse` the float32
    log-sum-exp [batch, heads, seq] of its queries over all keys (no gradient flows through it). The backward
    pass returns each rank the gradient of its own share. Every rank of `group` must call it with the same
    shapes.

    `position_ids` ([batch or 1, seq], this rank's share of them, as `shard_sequence` cuts the rows' position
    ids): where they restart inside a row (packed documents, the rule of `attention/registry.py`), a query
    sees only the keys of its own document, as `flash_attention` with those documents' `cu_seqlens` would.
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
    if position_ids is not None:
        check_position_ids(position_ids, q)
    documents = None if position_ids is None else _documents(position_ids, q.shape[0], group)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if world_size == 1:
        if documents is None:
            return flash_attention(q, k, v, causal=causal, scale=scale, deterministic=deterministic,
                                   return_lse=return_lse)
        o, lse = _document_attention(q, k, v, _shared_documents(documents, documents), causal, scale, deterministic)
        return (o, lse) if return_lse else o
    o, lse = _RingAttention.apply(q, k.contiguous(), v.contiguous(), group, causal, scale, deterministic, documents)
    return (o, lse) if return_lse else o

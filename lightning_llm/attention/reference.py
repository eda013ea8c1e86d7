"""FlashAttention-2 in plain PyTorch, block by block: the algorithm the Triton kernel runs, to be read beside it.

`tiled_attention_forward` and `tiled_attention_backward` follow Algorithms 1 and 2 of the FlashAttention-2
paper (Dao, 2023) with the kernel's names (`m_i`, `l_i`, `acc`, `delta`, `diagonal`): the N x N score matrix
is never formed, only one BLOCK_M x BLOCK_N tile of it at a time, and the backward pass recomputes each tile
from Q, K and the saved log-sum-exp. They are the documentation and a test oracle, not a fast path (Python
loops over blocks). `naive_attention` is the textbook softmax(QK^T * scale)V that everything is checked against.

Conventions shared with the kernel: tensors are [batch, heads, seq, head_dim]; K and V may have fewer heads
than Q (grouped-query attention: query head h reads K/V head h // (heads // kv_heads)); with `causal`, query i
sees key j when j <= i + (seq_k - seq_q), so the last query sees the last key (bottom-right alignment, as in
FlashAttention >= 2.1 and as a KV cache needs); a query that sees no key at all gets output 0 and
log-sum-exp +inf (so that P = exp(S - lse) = 0 for it in the backward pass).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _visible(rows: Tensor, cols: Tensor, seqlen_q: int, seqlen_k: int, causal: bool) -> Tensor:
    """Which (query, key) pairs of a tile exist: [len(rows), len(cols)] booleans."""
    if not causal:
        return torch.ones(len(rows), len(cols), dtype=torch.bool, device=rows.device)
    diagonal = seqlen_k - seqlen_q
    return cols[None, :] <= rows[:, None] + diagonal


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    # Like the kernel, accumulate half-precision inputs in float32; float64 inputs stay float64.
    return torch.promote_types(dtype, torch.float32)


def _expand_kv(x: Tensor, num_heads: int) -> Tensor:
    # Readability over memory: the kernel never copies K/V, it indexes head // group instead.
    return x.repeat_interleave(num_heads // x.shape[1], dim=1)


def naive_attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """softmax(Q K^T * scale) V with the whole score matrix in memory; returns (output, log-sum-exp)."""
    num_heads, seqlen_q, seqlen_k = q.shape[1], q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k, v = _expand_kv(k, num_heads), _expand_kv(v, num_heads)
    s = (q @ k.transpose(-1, -2)) * scale
    rows = torch.arange(seqlen_q, device=q.device)
    cols = torch.arange(seqlen_k, device=q.device)
    s = s.masked_fill(~_visible(rows, cols, seqlen_q, seqlen_k, causal), -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    # Rows that see no key: softmax is 0/0 there; the convention is output 0 and lse +inf.
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return p @ v, lse.masked_fill(lse == -math.inf, math.inf)


def tiled_attention_forward(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: float | None = None,
    block_m: int = 64, block_n: int = 64,
) -> tuple[Tensor, Tensor]:
    """FlashAttention-2 forward (Algorithm 1): returns (output, log-sum-exp of the scaled scores)."""
    batch, num_heads, seqlen_q, _ = q.shape
    seqlen_k = k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    acc_dtype = _accumulation_dtype(q.dtype)
    k, v = _expand_kv(k, num_heads).to(acc_dtype), _expand_kv(v, num_heads).to(acc_dtype)
    diagonal = seqlen_k - seqlen_q
    o = torch.empty_like(q)
    lse = torch.empty(batch, num_heads, seqlen_q, dtype=acc_dtype, device=q.device)
    # One iteration of this loop is one program of the kernel (for every batch and head at once).
    for start_m in range(0, seqlen_q, block_m):
        rows = torch.arange(start_m, min(start_m + block_m, seqlen_q), device=q.device)
        q_i = q[:, :, rows].to(acc_dtype)
        m_i = torch.full((batch, num_heads, len(rows)), -math.inf, dtype=acc_dtype, device=q.device)
        l_i = torch.zeros_like(m_i)
        acc = torch.zeros_like(q_i)
        # Causal: key blocks past the last key this query block sees are skipped, not masked.
        end_n = max(0, min(seqlen_k, start_m + len(rows) + diagonal)) if causal else seqlen_k
        for start_n in range(0, end_n, block_n):
            cols = torch.arange(start_n, min(start_n + block_n, seqlen_k), device=q.device)
            s = (q_i @ k[:, :, cols].transpose(-1, -2)) * scale
            s = s.masked_fill(~_visible(rows, cols, seqlen_q, seqlen_k, causal), -math.inf)
            # Online softmax: a new running maximum rescales what was summed so far by exp(m_old - m_new).
            m_new = torch.maximum(m_i, s.amax(dim=-1))
            m_safe = m_new.masked_fill(m_new == -math.inf, 0.0)  # a row with no key yet: p = 0, not nan
            p = torch.exp(s - m_safe[..., None])
            alpha = torch.exp(m_i - m_safe)
            l_i = l_i * alpha + p.sum(dim=-1)
            acc = acc * alpha[..., None] + p.to(q.dtype).to(acc_dtype) @ v[:, :, cols]
            m_i = m_new
        seen = l_i > 0
        o[:, :, rows] = (acc / torch.where(seen, l_i, 1.0)[..., None]).to(q.dtype)
        lse[:, :, rows] = torch.where(seen, m_i + torch.log(l_i), math.inf)
    return o, lse


def tiled_attention_backward(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, *, causal: bool = True,
    scale: float | None = None, block_m: int = 64, block_n: int = 64,
) -> tuple[Tensor, Tensor, Tensor]:
    """FlashAttention-2 backward (Algorithm 2): dQ, dK, dV from recomputed tiles of S and P."""
    batch, num_heads, seqlen_q, head_dim = q.shape
    num_kv_heads, seqlen_k = k.shape[1], k.shape[2]
    scale = head_dim ** -0.5 if scale is None else scale
    acc_dtype = _accumulation_dtype(q.dtype)
    q, do, lse = q.to(acc_dtype), do.to(acc_dtype), lse.to(acc_dtype)
    k, v = _expand_kv(k, num_heads).to(acc_dtype), _expand_kv(v, num_heads).to(acc_dtype)
    diagonal = seqlen_k - seqlen_q
    # delta_i = rowsum(dO_i * O_i) = sum_j P_ij dP_ij: the term the softmax Jacobian subtracts.
    delta = (do * o.to(acc_dtype)).sum(dim=-1)
    dq = torch.zeros_like(q)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    # One iteration of the outer loop is one program of the dK/dV kernel: a block of keys stays on chip
    # while the query blocks that see it stream past.
    for start_n in range(0, seqlen_k, block_n):
        cols = torch.arange(start_n, min(start_n + block_n, seqlen_k), device=q.device)
        k_j, v_j = k[:, :, cols], v[:, :, cols]
        first_m = max(0, start_n - diagonal) // block_m * block_m if causal else 0
        for start_m in range(first_m, seqlen_q, block_m):
            rows = torch.arange(start_m, min(start_m + block_m, seqlen_q), device=q.device)
            s = (q[:, :, rows] @ k_j.transpose(-1, -2)) * scale
            p = torch.exp(s - lse[:, :, rows, None])  # the forward's softmax, recomputed from its lse
            p = p.masked_fill(~_visible(rows, cols, seqlen_q, seqlen_k, causal), 0.0)
            dv[:, :, cols] += p.transpose(-1, -2) @ do[:, :, rows]
            dp = do[:, :, rows] @ v_j.transpose(-1, -2)
            ds = p * (dp - delta[:, :, rows, None])
            dq[:, :, rows] += (ds @ k_j) * scale
            dk[:, :, cols] += (ds.transpose(-1, -2) @ q[:, :, rows]) * scale
    # Every query head of a group wrote into its own copy of the shared K/V head: sum them.
    group = num_heads // num_kv_heads
    dk = dk.view(batch, num_kv_heads, group, seqlen_k, head_dim).sum(dim=2)
    dv = dv.view(batch, num_kv_heads, group, seqlen_k, head_dim).sum(dim=2)
    return dq, dk, dv

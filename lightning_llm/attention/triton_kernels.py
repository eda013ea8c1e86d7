"""FlashAttention-2 in Triton: the forward kernel, the two backward kernels and the launchers that call them.

Each program keeps one block of queries (forward, dQ) or of keys (dK/dV) in on-chip memory and streams
the blocks of the other side past it; the N x N matrices S and P exist one BLOCK_M x BLOCK_N tile at a time.
Only O and the row log-sum-exp go back to memory, and the backward kernels recompute S and P from them.
`reference.py` is the same algorithm in plain PyTorch, with the same names, to read beside this file.

Tensors are [batch, heads, seq, head_dim] views with any strides whose last one is 1. A packed batch of
variable-length sequences is the same view with batch 1 plus `cu_seqlens` (sequence b holds tokens
cu_seqlens[b]:cu_seqlens[b+1]); its programs index the sequence with the batch coordinate of the grid.

Importing this module imports triton. Triton decides between compiling and interpreting (TRITON_INTERPRET=1,
kernels run on the CPU with numpy) when a function is decorated, and decorated triton.language's own helpers
when triton was first imported; this module's kernels must agree with them, so the variable has to be set
before anything imports triton (Lightning does).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

INTERPRETED: bool = triton.knobs.runtime.interpret
if INTERPRETED != isinstance(tl.zeros, InterpretedFunction):
    raise RuntimeError(
        f"TRITON_INTERPRET is {'set' if INTERPRETED else 'unset'} now but was "
        f"{'unset' if INTERPRETED else 'set'} when triton was imported: set it before importing triton "
        "(or anything that imports it, such as lightning)"
    )

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # The interpreter multiplies bfloat16 tiles as raw 16-bit integers (numpy has no bfloat16). There the
    # operands go up to float32 first: a product of two bfloat16 numbers is exact in float32, so the result
    # is what the tensor cores compute, up to the order of the sum.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _sequence(batch, CU_SEQLENS_Q, CU_SEQLENS_K, seqlen_q, seqlen_k, VARLEN: tl.constexpr):
    """Where sequence `batch` starts in the token axis, and its query and key lengths."""
    if VARLEN:
        q_start = tl.load(CU_SEQLENS_Q + batch)
        k_start = tl.load(CU_SEQLENS_K + batch)
        q_len = tl.load(CU_SEQLENS_Q + batch + 1) - q_start
        k_len = tl.load(CU_SEQLENS_K + batch + 1) - k_start
    else:
        q_start = 0
        k_start = 0
        q_len = seqlen_q
        k_len = seqlen_k
    return q_start, k_start, q_len, k_len


@triton.jit
def _visible(rows, cols, q_len, k_len, CAUSAL: tl.constexpr):
    """Which (query, key) pairs of a tile exist; rows and cols broadcast against each other."""
    visible = cols < k_len
    if CAUSAL:
        # Bottom-right alignment: the last query sees the last key (and a KV cache's new tokens see it all).
        visible = visible & (cols <= rows + (k_len - q_len))
    return visible


@triton.jit
def _key_range(start_m, q_len, k_len, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """For a block of queries: the end of the keys any of them sees, and the end of those all of them see."""
    if CAUSAL:
        diagonal = k_len - q_len
        end_n = tl.minimum(k_len, start_m + BLOCK_M + diagonal)
        unmasked_end = tl.minimum(k_len, start_m + diagonal + 1)
    else:
        end_n = k_len
        unmasked_end = k_len
    return end_n, unmasked_end


# -- tile configurations ---------------------------------------------------------------------------
# Each kernel is autotuned over a short list of (BLOCK_M, BLOCK_N, num_warps, num_stages) per head-dim class
# (BLOCK_D up to 64, or 128), once per head dim, sequence-length bucket, causality, layout and dtype. The
# first entry of each list is the starting point from the Triton tutorial's and FlashAttention-2's choices,
# and the only one the CPU interpreter runs (it cannot time a kernel, and the tests' tails are sized to it).
# Head dims above 64 halve the backward blocks: its programs hold two [BLOCK_N, head_dim] float32
# accumulators. `benchmarks/gpu.sh` records which entry won where.
_FORWARD_TILES = {
    64: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4)],
    128: [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3)],
}
_BACKWARD_DKDV_TILES = {
    64: [(64, 64, 4, 2), (32, 128, 8, 2), (32, 64, 4, 3)],
    128: [(32, 64, 8, 2), (32, 128, 8, 2), (16, 64, 4, 2)],
}
_BACKWARD_DQ_TILES = {
    64: [(64, 64, 4, 2), (128, 64, 8, 2)],
    128: [(32, 64, 8, 2), (64, 32, 4, 2)],
}


def _head_dim_class(block_d: int) -> int:
    return 64 if block_d <= 64 else 128


def _tile_configs(table: dict[int, list[tuple[int, int, int, int]]]) -> list[triton.Config]:
    """Every entry of `table` once, as triton configs."""
    entries = dict.fromkeys(entry for entries in table.values() for entry in entries)
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in entries]


def _tiles_for_head_dim(table: dict[int, list[tuple[int, int, int, int]]]):
    """An `early_config_prune` that keeps the configs of the launch's head-dim class (the first one alone
    under the interpreter)."""
    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        wanted = table[_head_dim_class({**named_args, **kwargs}["BLOCK_D"])]
        wanted = wanted[:1] if INTERPRETED else wanted
        by_entry = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages): c for c in configs}
        return [by_entry[entry] for entry in wanted]

    return prune


def _autotune(table: dict[int, list[tuple[int, int, int, int]]], key: list[str], **options):
    return triton.autotune(configs=_tile_configs(table), key=key,
                           prune_configs_by={"early_config_prune": _tiles_for_head_dim(table)}, **options)


def _seqlen_bucket(seqlen_q: int, seqlen_k: int) -> int:
    """The tuning key's sequence length: the longer side rounded up to a power of two (at least 128), so a
    KV cache that grows by one token, or packed batches of varying longest sequences, do not retune."""
    return max(128, triton.next_power_of_2(max(seqlen_q, seqlen_k)))


_TUNING_KEY = ["HEAD_DIM", "seqlen_bucket", "CAUSAL", "VARLEN"]


@_autotune(_FORWARD_TILES, _TUNING_KEY)
@triton.jit
def _forward_kernel(
    Q, K, V, O, LSE, CU_SEQLENS_Q, CU_SEQLENS_K,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot, stride_lb, stride_lh,
    seqlen_q, seqlen_k, group_size, qk_scale, seqlen_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1).to(tl.int64)
    batch = tl.program_id(2).to(tl.int64)
    kv_head = head // group_size
    q_start, k_start, q_len, k_len = _sequence(batch, CU_SEQLENS_Q, CU_SEQLENS_K, seqlen_q, seqlen_k, VARLEN)
    if start_m >= q_len:
        return

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM  # BLOCK_D is HEAD_DIM rounded up to a power of two
    q_ptrs = Q + batch * stride_qb + head * stride_qh + (q_start + offs_m[:, None]) * stride_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < q_len) & d_ok[None, :], other=0.0)
    # K is read transposed, [BLOCK_D, BLOCK_N], so that S = Q K^T is one dot.
    kt_ptrs = K + batch * stride_kb + kv_head * stride_kh + (k_start + offs_n[None, :]) * stride_kt + offs_d[:, None]
    v_ptrs = V + batch * stride_vb + kv_head * stride_vh + (k_start + offs_n[:, None]) * stride_vt + offs_d[None, :]

    # Running row maximum and row sum of the online softmax, in log2 units (qk_scale includes log2(e)).
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    end_n, unmasked_end = _key_range(start_m, q_len, k_len, BLOCK_M, CAUSAL)
    for start_n in range(0, end_n, BLOCK_N):
        offs_kv = start_n + offs_n
        kt = tl.load(kt_ptrs + start_n * stride_kt, mask=(offs_kv[None, :] < k_len) & d_ok[:, None], other=0.0)
        s = _dot(q, kt, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), UPCAST, PRECISION) * qk_scale
        # Only blocks on the causal diagonal or past the last key pay for a mask.
        if start_n + BLOCK_N > unmasked_end:
            s = tl.where(_visible(offs_m[:, None], offs_kv[None, :], q_len, k_len, CAUSAL), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: p = 0, not nan
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs + start_n * stride_vt, mask=(offs_kv[:, None] < k_len) & d_ok[None, :], other=0.0)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], UPCAST, PRECISION)
        m_i = m_new

    # A row that sees no key (causal with more queries than keys, or an empty sequence) gets O = 0 and
    # lse = +inf, which makes its P = exp(S - lse) = 0 in the backward pass.
    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) * _LN2, float("inf"))
    o_ptrs = O + batch * stride_ob + head * stride_oh + (q_start + offs_m[:, None]) * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=(offs_m[:, None] < q_len) & d_ok[None, :])
    tl.store(LSE + batch * stride_lb + head * stride_lh + q_start + offs_m, lse, mask=offs_m < q_len)


# The atomic path adds into DQ: every timed run starts from zeros, and so does the run that counts.
@_autotune(_BACKWARD_DKDV_TILES, _TUNING_KEY + ["ATOMIC_DQ"], reset_to_zero=["DQ"])
@triton.jit
def _backward_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DK, DV, CU_SEQLENS_Q, CU_SEQLENS_K,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot, stride_dqb, stride_dqh, stride_dqt,
    stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt, stride_lb, stride_lh,
    seqlen_q, seqlen_k, group_size, sm_scale, seqlen_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, ATOMIC_DQ: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    kv_head = tl.program_id(1).to(tl.int64)
    batch = tl.program_id(2).to(tl.int64)
    q_start, k_start, q_len, k_len = _sequence(batch, CU_SEQLENS_Q, CU_SEQLENS_K, seqlen_q, seqlen_k, VARLEN)
    if start_n >= k_len:
        return

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    kv_mask = (offs_n[:, None] < k_len) & d_ok[None, :]
    k_rows = (k_start + offs_n[:, None])
    k = tl.load(K + batch * stride_kb + kv_head * stride_kh + k_rows * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + batch * stride_vb + kv_head * stride_vh + k_rows * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * _LOG2E

    if CAUSAL:
        diagonal = k_len - q_len
        # Queries before start_n - diagonal see none of these keys; from unmasked_start on they see all.
        first_m = tl.maximum(start_n - diagonal, 0) // BLOCK_M * BLOCK_M
        unmasked_start = start_n + BLOCK_N - 1 - diagonal
    else:
        first_m = 0
        unmasked_start = 0
    # Grouped-query attention: this K/V head serves `group_size` query heads; their contributions to dK and
    # dV are summed here, on chip, instead of in a repeated copy of K and V.
    for head in range(kv_head * group_size, kv_head * group_size + group_size):
        q_base = Q + batch * stride_qb + head * stride_qh + q_start * stride_qt
        do_base = DO + batch * stride_dob + head * stride_doh + q_start * stride_dot
        row_base = batch * stride_lb + head * stride_lh + q_start
        for start_m in range(first_m, q_len, BLOCK_M):
            rows = start_m + offs_m
            q_mask = (rows[:, None] < q_len) & d_ok[None, :]
            q = tl.load(q_base + rows[:, None] * stride_qt + offs_d[None, :], mask=q_mask, other=0.0)
            do = tl.load(do_base + rows[:, None] * stride_dot + offs_d[None, :], mask=q_mask, other=0.0)
            # Rows past the sequence load lse = +inf, so their P is 0 without a mask.
            lse = tl.load(LSE + row_base + rows, mask=rows < q_len, other=float("inf"))
            delta = tl.load(DELTA + row_base + rows, mask=rows < q_len, other=0.0)
            # Transposed tiles, [BLOCK_N, BLOCK_M]: keys are this program's rows.
            st = _dot(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), UPCAST, PRECISION)
            pt = tl.exp2(st * qk_scale - lse[None, :] * _LOG2E)
            if (start_m < unmasked_start) | (start_n + BLOCK_N > k_len):
                pt = tl.where(_visible(rows[None, :], offs_n[:, None], q_len, k_len, CAUSAL), pt, 0.0)
            dv = _dot(pt.to(do.dtype), do, dv, UPCAST, PRECISION)  # dV = P^T dO
            dpt = _dot(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), UPCAST, PRECISION)
            dst = pt * (dpt - delta[None, :])  # dS = P * (dP - delta), the softmax Jacobian
            dk = _dot(dst.to(q.dtype), q, dk, UPCAST, PRECISION)  # dK = dS^T Q (times the scale, below)
            if ATOMIC_DQ:
                # FlashAttention-2's single pass: every key block adds its share of dQ = dS K to a float32
                # buffer. Fast, but the order of the additions, hence the rounding, varies run to run.
                dq = _dot(tl.trans(dst).to(k.dtype), k, tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32),
                          UPCAST, PRECISION)
                dq_ptrs = DQ + batch * stride_dqb + head * stride_dqh + (q_start + rows[:, None]) * stride_dqt
                tl.atomic_add(dq_ptrs + offs_d[None, :], dq * sm_scale, mask=q_mask)

    tl.store(DK + batch * stride_dkb + kv_head * stride_dkh + k_rows * stride_dkt + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + batch * stride_dvb + kv_head * stride_dvh + k_rows * stride_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@_autotune(_BACKWARD_DQ_TILES, _TUNING_KEY)
@triton.jit
def _backward_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_SEQLENS_Q, CU_SEQLENS_K,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot, stride_dqb, stride_dqh, stride_dqt, stride_lb, stride_lh,
    seqlen_q, seqlen_k, group_size, sm_scale, seqlen_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # The deterministic dQ: one program owns a block of queries and sums over the key blocks itself, in a
    # fixed order, recomputing S and dP (two more matrix products than the atomic path).
    start_m = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1).to(tl.int64)
    batch = tl.program_id(2).to(tl.int64)
    kv_head = head // group_size
    q_start, k_start, q_len, k_len = _sequence(batch, CU_SEQLENS_Q, CU_SEQLENS_K, seqlen_q, seqlen_k, VARLEN)
    if start_m >= q_len:
        return

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_mask = (offs_m[:, None] < q_len) & d_ok[None, :]
    q_rows = q_start + offs_m[:, None]
    q = tl.load(Q + batch * stride_qb + head * stride_qh + q_rows * stride_qt + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + batch * stride_dob + head * stride_doh + q_rows * stride_dot + offs_d[None, :],
                 mask=q_mask, other=0.0)
    row_ptrs = batch * stride_lb + head * stride_lh + q_start + offs_m
    lse = tl.load(LSE + row_ptrs, mask=offs_m < q_len, other=float("inf"))
    delta = tl.load(DELTA + row_ptrs, mask=offs_m < q_len, other=0.0)
    kt_ptrs = K + batch * stride_kb + kv_head * stride_kh + (k_start + offs_n[None, :]) * stride_kt + offs_d[:, None]
    vt_ptrs = V + batch * stride_vb + kv_head * stride_vh + (k_start + offs_n[None, :]) * stride_vt + offs_d[:, None]
    qk_scale = sm_scale * _LOG2E
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    end_n, unmasked_end = _key_range(start_m, q_len, k_len, BLOCK_M, CAUSAL)
    for start_n in range(0, end_n, BLOCK_N):
        offs_kv = start_n + offs_n
        kv_mask = (offs_kv[None, :] < k_len) & d_ok[:, None]
        kt = tl.load(kt_ptrs + start_n * stride_kt, mask=kv_mask, other=0.0)
        vt = tl.load(vt_ptrs + start_n * stride_vt, mask=kv_mask, other=0.0)
        s = _dot(q, kt, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), UPCAST, PRECISION)
        p = tl.exp2(s * qk_scale - lse[:, None] * _LOG2E)
        if start_n + BLOCK_N > unmasked_end:
            p = tl.where(_visible(offs_m[:, None], offs_kv[None, :], q_len, k_len, CAUSAL), p, 0.0)
        dp = _dot(do, vt, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), UPCAST, PRECISION)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(kt.dtype), tl.trans(kt), dq, UPCAST, PRECISION)  # dQ = dS K

    tl.store(DQ + batch * stride_dqb + head * stride_dqh + q_rows * stride_dqt + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


def _head_block(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot wants every dimension >= 16


def _dot_options(dtype: torch.dtype) -> dict[str, object]:
    # float32 inputs ask for float32 products ("ieee"), not the tensor cores' tf32.
    return dict(UPCAST=INTERPRETED and dtype == torch.bfloat16, PRECISION="ieee" if dtype == torch.float32 else "tf32")


def _strides(x: Tensor, varlen: bool) -> tuple[int, int, int]:
    # In a packed batch the grid's batch coordinate is the sequence, whose offset comes from cu_seqlens.
    return (0 if varlen else x.stride(0)), x.stride(1), x.stride(2)


def _row_strides(rows: Tensor, varlen: bool) -> tuple[int, int]:
    return (0 if varlen else rows.stride(0)), rows.stride(1)


def attention_forward(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float,
    cu_seqlens_q: Tensor | None = None, cu_seqlens_k: Tensor | None = None,
    max_seqlen_q: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Run the forward kernel: returns O (a [B, H, T, D] view of [B, T, H, D] memory) and the float32
    log-sum-exp of the scaled scores, [B, H, T]. Inputs are already validated by the caller."""
    batch, num_heads, seqlen_q, head_dim = q.shape
    num_kv_heads, seqlen_k = k.shape[1], k.shape[2]
    varlen = cu_seqlens_q is not None
    # O in [B, T, H, D] memory: the layout a transformer's output projection reads, so no copy follows.
    o = torch.empty(batch, seqlen_q, num_heads, head_dim, dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty(batch, num_heads, seqlen_q, dtype=torch.float32, device=q.device)
    block_d = _head_block(head_dim)
    num_sequences = cu_seqlens_q.numel() - 1 if varlen else batch
    rows = max_seqlen_q if varlen else seqlen_q
    # (a packed batch's longest key sequence is not passed here: its query bound stands in, for the key only)
    bucket = _seqlen_bucket(rows, rows if varlen else seqlen_k)
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), num_heads, num_sequences)  # noqa: E731
    _forward_kernel[grid](
        q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k,
        *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(o, varlen),
        *_row_strides(lse, varlen),
        seqlen_q, seqlen_k, num_heads // num_kv_heads, scale * math.log2(math.e), bucket,
        HEAD_DIM=head_dim, BLOCK_D=block_d, CAUSAL=causal, VARLEN=varlen, **_dot_options(q.dtype),
    )
    return o, lse


def attention_backward(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, *, causal: bool, scale: float,
    deterministic: bool, cu_seqlens_q: Tensor | None = None, cu_seqlens_k: Tensor | None = None,
    max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Run the backward kernels: returns dQ, dK, dV (dK and dV with K's and V's heads)."""
    batch, num_heads, seqlen_q, head_dim = q.shape
    num_kv_heads, seqlen_k = k.shape[1], k.shape[2]
    varlen = cu_seqlens_q is not None
    if do.stride(-1) != 1:
        do = do.contiguous()
    # delta_i = rowsum(dO_i * O_i): one number per query row, read by every key block.
    delta = (do.float() * o.float()).sum(dim=-1).contiguous()
    # The kernels index delta with the log-sum-exp's strides: both must be [B, H, T] contiguous (a caller's lse
    # may be a slice of a longer one, as ring attention's second query chunk is).
    lse = lse.contiguous()
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    # The atomic path sums dQ in float32 across programs; the deterministic one writes it once per block.
    dq = torch.empty_like(q) if deterministic else torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    block_d = _head_block(head_dim)
    num_sequences = cu_seqlens_q.numel() - 1 if varlen else batch
    rows_q, rows_k = (max_seqlen_q, max_seqlen_k) if varlen else (seqlen_q, seqlen_k)
    common = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, CAUSAL=causal, VARLEN=varlen, **_dot_options(q.dtype))
    input_strides = (*_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(do, varlen))
    sizes = (seqlen_q, seqlen_k, num_heads // num_kv_heads, scale, _seqlen_bucket(rows_q, rows_k))
    grid = lambda meta: (triton.cdiv(rows_k, meta["BLOCK_N"]), num_kv_heads, num_sequences)  # noqa: E731
    _backward_dkdv_kernel[grid](
        q, k, v, do, lse, delta, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
        *input_strides, *_strides(dq, varlen), *_strides(dk, varlen), *_strides(dv, varlen),
        *_row_strides(lse, varlen), *sizes, ATOMIC_DQ=not deterministic, **common,
    )
    if not deterministic:
        return dq.to(q.dtype), dk, dv
    grid = lambda meta: (triton.cdiv(rows_q, meta["BLOCK_M"]), num_heads, num_sequences)  # noqa: E731
    _backward_dq_kernel[grid](
        q, k, v, do, lse, delta, dq, cu_seqlens_q, cu_seqlens_k,
        *input_strides, *_strides(dq, varlen), *_row_strides(lse, varlen), *sizes, **common,
    )
    return dq, dk, dv

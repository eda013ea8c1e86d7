"""`flash_attention` (dense or packed variable-length sequences) and the `FlashAttention` module.

They check their inputs, then dispatch: on CUDA to the Triton kernels (`triton_kernels.py`) through a
`torch.autograd.Function`; on the CPU to `torch.nn.functional.scaled_dot_product_attention`, which gives
the same result; and anywhere to the Triton kernels under Triton's interpreter when TRITON_INTERPRET=1
(how CI tests the kernels without a GPU). `attention_backend(device)` says which path runs, the first use
of each path is logged, and `FlashAttention.backend` records the path of its last call.

`flash_attention(..., return_lse=True)` also returns the log-sum-exp of the scores (on the CPU through torch's
CPU FlashAttention op, which returns it; SDPA does not), and `flash_attention_backward` runs the backward pass
from an output and log-sum-exp the caller holds: the two pieces ring attention (`ring.py`) is built from.
"""

from __future__ import annotations

import logging
import math
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128

TRITON = "triton"
TRITON_INTERPRETER = "triton-interpreter"
SDPA = "sdpa"

_announced: set[str] = set()


def _triton_kernels() -> ModuleType | None:
    """The kernels module, or None where triton is not installed (then only the SDPA path exists)."""
    try:
        from lightning_llm.attention import triton_kernels
    except ImportError:
        return None
    return triton_kernels


def attention_backend(device: torch.device | str) -> str:
    """Which path `flash_attention` takes for tensors on `device`: "triton", "triton-interpreter" or "sdpa"."""
    kernels = _triton_kernels()
    if kernels is not None and kernels.INTERPRETED:
        return TRITON_INTERPRETER
    if kernels is not None and torch.device(device).type == "cuda":
        return TRITON
    return SDPA


def _announce(backend: str, device: torch.device) -> None:
    if backend in _announced:
        return
    _announced.add(backend)
    why = {
        TRITON: "the Triton FlashAttention-2 kernels",
        TRITON_INTERPRETER: "the Triton FlashAttention-2 kernels under Triton's CPU interpreter (TRITON_INTERPRET=1; slow)",
        SDPA: "torch's scaled_dot_product_attention (the Triton kernels need CUDA or TRITON_INTERPRET=1)",
    }[backend]
    log.info("lightning_llm attention on %s: %s", device, why)


def _check(q: Tensor, k: Tensor, v: Tensor, token_dim: int) -> None:
    """Shapes, dtypes and devices the kernels accept; `token_dim` is 2 for [B, H, T, D], 0 for [T, H, D]."""
    head_dim_of = {"q": q.shape[-1], "k": k.shape[-1], "v": v.shape[-1]}
    expected_dims = 4 if token_dim == 2 else 3
    layout = "[batch, heads, seq, head_dim]" if token_dim == 2 else "[tokens, heads, head_dim]"
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != expected_dims:
            raise ValueError(f"{name} must be {layout}, got shape {tuple(x.shape)}")
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {x.dtype}; supported: {', '.join(map(str, SUPPORTED_DTYPES))}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if len(set(head_dim_of.values())) != 1:
        raise ValueError(f"q, k and v must share head_dim, got {head_dim_of}")
    if not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim {q.shape[-1]} is not supported: the kernels take head dims 1 to {MAX_HEAD_DIM}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    num_heads, num_kv_heads = q.shape[1], k.shape[1]  # the head axis is 1 in both layouts
    if num_heads % num_kv_heads:
        raise ValueError(f"q's {num_heads} heads are not a multiple of k's and v's {num_kv_heads} heads")
    if token_dim == 2 and q.shape[0] != k.shape[0]:
        raise ValueError(f"q has batch {q.shape[0]} but k and v have batch {k.shape[0]}")
    if q.shape[token_dim] == 0 or k.shape[token_dim] == 0:
        raise ValueError(f"empty sequence: q {tuple(q.shape)}, k {tuple(k.shape)}")


def _unit_stride(x: Tensor) -> Tensor:
    # The kernels take any strides but need head_dim contiguous (one vectorised load per row).
    return x if x.stride(-1) == 1 else x.contiguous()


class _FlashAttentionFunction(torch.autograd.Function):
    """`attention_forward` and `attention_backward` as one differentiable op returning (O, log-sum-exp): the
    Triton kernels on [B, H, T, D] views (packed batches: batch 1 plus cu_seqlens), or torch's CPU
    FlashAttention op. No gradient flows through the log-sum-exp: one that arrives is refused."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, deterministic, backend, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                max_seqlen_k):
        ctx.set_materialize_grads(False)
        packing = dict(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                       max_seqlen_k=max_seqlen_k)
        o, lse = _forward(q, k, v, causal=causal, scale=scale, backend=backend, **packing)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.options = dict(causal=causal, scale=scale, deterministic=deterministic, backend=backend, **packing)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        if dlse is not None:
            raise NotImplementedError("flash_attention's log-sum-exp (return_lse=True) carries no gradient: use it "
                                      "detached (ring attention merges blocks with it inside its own backward)")
        if do is None:
            return (None,) * 11
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, lse, **ctx.options)
        return dq, dk, dv, None, None, None, None, None, None, None, None


def _bottom_right_mask(seqlen_q: int, seqlen_k: int, device: torch.device) -> Tensor:
    """Which keys each query sees under the kernels' causal alignment (the last query sees the last key)."""
    return torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device).tril(seqlen_k - seqlen_q)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> Tensor:
    """The CPU path for [B, H, T, D] inputs, with the kernels' bottom-right causal alignment."""
    seqlen_q, seqlen_k = q.shape[2], k.shape[2]
    mask = None
    if causal and seqlen_q != seqlen_k:
        # SDPA's is_causal aligns the first query with the first key; the kernels align the last ones.
        mask = _bottom_right_mask(seqlen_q, seqlen_k, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def _cpu_mask(q: Tensor, k: Tensor, causal: bool) -> tuple[bool, Tensor | None]:
    """(is_causal, additive mask) for torch's CPU FlashAttention op: its is_causal aligns the first query with the
    first key, so unequal lengths get the kernels' bottom-right alignment as a mask."""
    seqlen_q, seqlen_k = q.shape[2], k.shape[2]
    if not causal or seqlen_q == seqlen_k:
        return causal, None
    hidden = ~_bottom_right_mask(seqlen_q, seqlen_k, q.device)
    return False, torch.zeros(seqlen_q, seqlen_k, dtype=q.dtype, device=q.device).masked_fill(hidden, -math.inf)


def _cpu_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """torch's CPU FlashAttention op (what SDPA runs on the CPU; it indexes shared K/V heads, no repeat), which
    also returns the log-sum-exp, on [B, H, T, D] inputs."""
    is_causal, mask = _cpu_mask(q, k, causal)
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, attn_mask=mask,
                                                                         scale=scale)
    if causal and q.shape[2] > k.shape[2]:
        # The op gives a query that sees no key lse 0; the kernels' convention is +inf (so P = exp(S - lse) = 0).
        lse[:, :, :q.shape[2] - k.shape[2]] = math.inf
    return o, lse


def _cpu_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, causal: bool,
                  scale: float) -> tuple[Tensor, Tensor, Tensor]:
    is_causal, mask = _cpu_mask(q, k, causal)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        do, q, k, v, o, lse.contiguous(), 0.0, is_causal, attn_mask=mask, scale=scale)


def cu_seqlens_of(lengths: Tensor) -> Tensor:
    """The int32 sequence boundaries [0, l0, l0 + l1, ...] of sequences of these lengths, laid end to end."""
    return F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)


def document_starts(position_ids: Tensor) -> Tensor:
    """[batch, seq] booleans: True where a packed document starts, i.e. at each row's first token and wherever
    the position ids do not go on by one (the one rule for what a packed document is)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts


def packed_cu_seqlens(position_ids: Tensor, batch: int) -> Tensor | None:
    """The int32 boundaries of the packed documents of `batch` rows ([batch or 1, seq] position ids) as
    `flash_attention(..., cu_seqlens=)` takes them for the flattened [batch * seq] tokens (`as_tokens`);
    None when no row is packed. A row always starts a document: documents are packed within rows, never
    across them."""
    starts = document_starts(position_ids.expand(batch, -1))
    if not starts[:, 1:].any():
        return None
    first_tokens = starts.flatten().nonzero().flatten()
    total = torch.tensor([starts.numel()], device=position_ids.device)
    return torch.cat([first_tokens, total]).to(torch.int32)


def as_tokens(x: Tensor) -> Tensor:
    """[batch, heads, seq, head_dim] -> the packed [batch * seq, heads, head_dim] layout; free for the transposed
    [batch, seq, heads, head_dim] projections transformers passes."""
    return x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3])


def _per_sequence(x: Tensor, lengths: list[int]) -> list[Tensor]:
    """A packed [1, H, T, D] (or [1, H, T]) view split into its sequences, each a batch of one."""
    return list(x.split(lengths, dim=2))


def _forward(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float, backend: str,
             cu_seqlens_q: Tensor | None = None, cu_seqlens_k: Tensor | None = None, max_seqlen_q: int | None = None,
             max_seqlen_k: int | None = None) -> tuple[Tensor, Tensor]:
    """O and the float32 log-sum-exp of [B, H, T, D] inputs on `backend`, without autograd."""
    if backend != SDPA:
        return _triton_kernels().attention_forward(q, k, v, causal=causal, scale=scale, cu_seqlens_q=cu_seqlens_q,
                                                   cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q)
    if cu_seqlens_q is None:
        return _cpu_forward(q, k, v, causal, scale)
    lengths_q, lengths_k = _lengths(cu_seqlens_q.tolist()), _lengths(cu_seqlens_k.tolist())
    outs = [_cpu_forward(q_i, k_i, v_i, causal, scale) for q_i, k_i, v_i in
            zip(_per_sequence(q, lengths_q), _per_sequence(k, lengths_k), _per_sequence(v, lengths_k))]
    return torch.cat([o for o, _ in outs], dim=2), torch.cat([lse for _, lse in outs], dim=2)


def _backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, *, causal: bool, scale: float,
              deterministic: bool, backend: str, cu_seqlens_q: Tensor | None = None,
              cu_seqlens_k: Tensor | None = None, max_seqlen_q: int | None = None,
              max_seqlen_k: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """dQ, dK, dV of [B, H, T, D] inputs on `backend`, from O and a log-sum-exp (its own or a merged one)."""
    if backend != SDPA:
        return _triton_kernels().attention_backward(
            do, q, k, v, o, lse, causal=causal, scale=scale, deterministic=deterministic, cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
    if cu_seqlens_q is None:
        return _cpu_backward(do, q, k, v, o, lse, causal, scale)
    lengths_q, lengths_k = _lengths(cu_seqlens_q.tolist()), _lengths(cu_seqlens_k.tolist())
    grads = [_cpu_backward(*parts, causal, scale) for parts in zip(
        *(_per_sequence(x, lengths_q) for x in (do, q)), *(_per_sequence(x, lengths_k) for x in (k, v)),
        *(_per_sequence(x, lengths_q) for x in (o, lse)))]
    return tuple(torch.cat(parts, dim=2) for parts in zip(*grads))


def flash_attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: float | None = None,
    cu_seqlens: Tensor | None = None, max_seqlen: int | None = None,
    cu_seqlens_k: Tensor | None = None, max_seqlen_k: int | None = None, deterministic: bool = False,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Exact attention softmax(Q K^T * scale) V without the N x N matrix in memory (FlashAttention-2).

    Dense: q is [batch, heads, seq_q, head_dim]; k and v are [batch, kv_heads, seq_k, head_dim]; returns
    [batch, heads, seq_q, head_dim].

    Packed (`cu_seqlens` given): q is [total_q, heads, head_dim] and k, v are [total_k, kv_heads, head_dim],
    sequences laid end to end; sequence b holds tokens cu_seqlens[b]:cu_seqlens[b+1] (int32 or int64, from 0
    to the total) and never attends to another one. `cu_seqlens_k` bounds the keys (default: `cu_seqlens`).
    `max_seqlen` is the longest query sequence and `max_seqlen_k` the longest key sequence (default:
    `max_seqlen` when `cu_seqlens_k` is not given): given, the boundaries are trusted and the kernels launch
    without a device-to-host copy (as flash-attn's varlen functions do); omitted, the boundaries are checked
    and the longest sequence found on the host. Returns [total_q, heads, head_dim].

    kv_heads must divide heads (grouped-query or multi-query attention: query head h reads K/V head
    h // (heads // kv_heads), nothing is repeated in memory). `scale` defaults to 1/sqrt(head_dim). With
    `causal`, query i sees key j when j <= i + seq_k - seq_q (the last query sees the last key; a query that
    sees no key gets 0). `deterministic` makes the backward pass reproducible bit for bit, at the cost of
    recomputing S and dP once more for dQ. float16, bfloat16 (float32 accumulation) and float32 (under
    autocast, q, k and v are cast to its dtype first, as SDPA does); head dims up to 128; any sequence
    length and strides.

    `return_lse`: also return the float32 log-sum-exp of each query's scaled scores, [batch, heads, seq_q]
    dense or [heads, total_q] packed (+inf for a query that sees no key). It carries no gradient (a backward
    pass through it is refused); `flash_attention_backward` takes it, or a merged one, back. On the CPU this
    form runs torch's CPU FlashAttention op, which returns the log-sum-exp, instead of SDPA.
    """
    q, k, v = autocast_inputs(q, k, v)
    backend, scale, packing = _prepare(q, k, v, scale, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k)
    if backend == SDPA and not return_lse:
        if packing is None:
            return _sdpa(q, k, v, causal, scale)
        return _sdpa_per_sequence(q, k, v, _lengths(packing["cu_seqlens_q"].tolist()),
                                  _lengths(packing["cu_seqlens_k"].tolist()), causal, scale)
    o, lse = _FlashAttentionFunction.apply(*_as_batch(q, k, v, packed=packing is not None), causal, scale,
                                           deterministic, backend, *(packing or _DENSE).values())
    if packing is not None:
        o, lse = o[0].transpose(0, 1), lse[0]
    return (o, lse) if return_lse else o


def autocast_inputs(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v in autocast's dtype where autocast is on, as SDPA computes: under mixed precision a model hands
    over q and k in float32 (rotary embeddings multiply them by float32 tables) and v in the autocast dtype."""
    if not torch.is_autocast_enabled(q.device.type):
        return q, k, v
    dtype = torch.get_autocast_dtype(q.device.type)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def flash_attention_backward(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, *, causal: bool = True,
    scale: float | None = None, cu_seqlens: Tensor | None = None, max_seqlen: int | None = None,
    cu_seqlens_k: Tensor | None = None, max_seqlen_k: int | None = None, deterministic: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """dQ, dK, dV of `flash_attention(q, k, v, ...)` for the output gradient `do`, from an output `o` and its
    log-sum-exp `lse` given by the caller, in the layouts `flash_attention(..., return_lse=True)` returns.

    The softmax is recomputed as P = exp(S - lse) and delta = rowsum(dO * O): given the O and lse of attention
    over MORE keys than `k` holds (ring attention merges blocks of keys), this is the share of the gradient that
    flows through these keys, so the blocks' shares add up to the whole gradient. No autograd; dK and dV come
    with K's and V's heads (grouped-query heads summed, K/V never repeated).
    """
    backend, scale, packing = _prepare(q, k, v, scale, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k)
    expected_lse = (q.shape[1], q.shape[0]) if packing is not None else q.shape[:3]
    if do.shape != q.shape or o.shape != q.shape or tuple(lse.shape) != tuple(expected_lse):
        raise ValueError(f"do and o must have q's shape {tuple(q.shape)} and lse {tuple(expected_lse)}, got do "
                         f"{tuple(do.shape)}, o {tuple(o.shape)}, lse {tuple(lse.shape)}")
    packed = packing is not None
    q4, k4, v4, do4, o4 = _as_batch(q, k, v, do, o, packed=packed)
    dq, dk, dv = _backward(do4, q4, k4, v4, o4, lse.unsqueeze(0) if packed else lse, causal=causal, scale=scale,
                           deterministic=deterministic, backend=backend, **(packing or _DENSE))
    if packed:
        dq, dk, dv = (x[0].transpose(0, 1) for x in (dq, dk, dv))
    return dq, dk, dv


_DENSE = dict(cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None)


def _as_batch(*xs: Tensor, packed: bool) -> list[Tensor]:
    """[B, H, T, D] views with a unit last stride; packed [T, H, D] tokens as [1, H, T, D] views (the packed
    tokens share the dense layout and code)."""
    return [_unit_stride(x.unsqueeze(0).transpose(1, 2) if packed else x) for x in xs]


def _prepare(q: Tensor, k: Tensor, v: Tensor, scale: float | None, cu_seqlens: Tensor | None,
             max_seqlen: int | None, cu_seqlens_k: Tensor | None,
             max_seqlen_k: int | None) -> tuple[str, float, dict[str, object] | None]:
    """Check the inputs; return the backend, the scale and (packed) the sequence boundaries the kernels take."""
    packed = cu_seqlens is not None
    if not packed and (cu_seqlens_k is not None or max_seqlen is not None or max_seqlen_k is not None):
        raise ValueError("cu_seqlens_k, max_seqlen and max_seqlen_k describe packed sequences: pass cu_seqlens too")
    _check(q, k, v, token_dim=0 if packed else 2)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    backend = attention_backend(q.device)
    _announce(backend, q.device)
    packing = _packing(q, k, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k, backend) if packed else None
    return backend, scale, packing


def _check_cu_seqlens(name: str, cu_seqlens: Tensor, device: torch.device) -> None:
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be a 1-d int32 or int64 tensor of sequence starts plus the total, got "
                         f"shape {tuple(cu_seqlens.shape)} and dtype {cu_seqlens.dtype}")
    if cu_seqlens.device != device:
        raise ValueError(f"{name} is on {cu_seqlens.device} but the tokens are on {device}")


def _bounds(name: str, cu_seqlens: Tensor, total: int) -> list[int]:
    """The sequence boundaries on the host, checked (one device-to-host copy)."""
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != total or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError(f"{name} must rise from 0 to the number of tokens ({total}), got {bounds}")
    return bounds


def _lengths(bounds: list[int]) -> list[int]:
    return [b - a for a, b in zip(bounds[:-1], bounds[1:])]


def _longest(bounds: list[int]) -> int:
    return max(_lengths(bounds))


def _sdpa_per_sequence(q: Tensor, k: Tensor, v: Tensor, lengths_q: list[int], lengths_k: list[int], causal: bool,
                       scale: float) -> Tensor:
    """The CPU path for packed [tokens, heads, head_dim] inputs: one SDPA call per sequence, as the varlen
    kernel runs one program per sequence, so attention costs the sum of the squared sequence lengths
    rather than the square of the block that a block-diagonal mask over it pays for.

    A loop rather than nested tensors: torch's jagged SDPA refuses `is_causal`. `split`, not slicing:
    a slice's backward writes a zero-filled gradient the size of the whole packed tensor, so slicing
    would cost sequences x tokens in the backward pass, where split's backward is one concatenation.
    """
    as_batch = lambda x: x.unsqueeze(0).transpose(1, 2)  # noqa: E731  [len, heads, head_dim] -> [1, heads, len, head_dim]
    return torch.cat([
        _sdpa(as_batch(q_i), as_batch(k_i), as_batch(v_i), causal, scale)[0].transpose(0, 1)
        for q_i, k_i, v_i in zip(q.split(lengths_q), k.split(lengths_k), v.split(lengths_k))
    ])


def _packing(
    q: Tensor, k: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor | None, max_seqlen_q: int | None,
    max_seqlen_k: int | None, backend: str,
) -> dict[str, object]:
    """The checked sequence boundaries of a packed call, as the kernels take them."""
    if cu_seqlens_k is None:
        cu_seqlens_k = cu_seqlens_q
        max_seqlen_k = max_seqlen_q if max_seqlen_k is None else max_seqlen_k
    _check_cu_seqlens("cu_seqlens", cu_seqlens_q, q.device)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.device)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens has {cu_seqlens_q.numel() - 1} sequences but cu_seqlens_k has "
                         f"{cu_seqlens_k.numel() - 1}")
    if backend == SDPA or max_seqlen_q is None or max_seqlen_k is None:
        bounds_q = _bounds("cu_seqlens", cu_seqlens_q, q.shape[0])
        bounds_k = _bounds("cu_seqlens_k", cu_seqlens_k, k.shape[0])
        max_seqlen_q, max_seqlen_k = _longest(bounds_q), _longest(bounds_k)
    return dict(cu_seqlens_q=cu_seqlens_q.to(torch.int32), cu_seqlens_k=cu_seqlens_k.to(torch.int32),
                max_seqlen_q=int(max_seqlen_q), max_seqlen_k=int(max_seqlen_k))


class FlashAttention(nn.Module):
    """Attention as a module: `FlashAttention(causal=True)(q, k, v, ...)` is `flash_attention(q, k, v,
    causal=True, ...)`, packed sequences included. `backend` names the path of the last call."""

    def __init__(self, causal: bool = True, scale: float | None = None, deterministic: bool = False) -> None:
        super().__init__()
        if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive finite number or None (1/sqrt(head_dim)), got {scale!r}")
        self.causal = bool(causal)
        self.scale = scale
        self.deterministic = bool(deterministic)
        self.backend: str | None = None

    def forward(self, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor | None = None,
                max_seqlen: int | None = None, cu_seqlens_k: Tensor | None = None,
                max_seqlen_k: int | None = None) -> Tensor:
        out = flash_attention(q, k, v, causal=self.causal, scale=self.scale, cu_seqlens=cu_seqlens,
                              max_seqlen=max_seqlen, cu_seqlens_k=cu_seqlens_k, max_seqlen_k=max_seqlen_k,
                              deterministic=self.deterministic)
        self.backend = attention_backend(q.device)
        return out

    def extra_repr(self) -> str:
        return f"causal={self.causal}, scale={self.scale}, deterministic={self.deterministic}"

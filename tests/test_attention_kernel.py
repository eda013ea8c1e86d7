"""The Triton FlashAttention kernels against naive attention computed in float64.

These tests need the kernels to run in this process: on CUDA, or on the CPU under Triton's interpreter,
which must be switched on (TRITON_INTERPRET=1) before triton is first imported. A plain CPU run of the
suite skips them here and runs this file in a child process with the interpreter instead
(`test_attention.py::test_kernels_under_triton_interpreter`).

The sweep is a fixed table so that every value of every axis appears at least once in a few cases
(the interpreter is slow): sequence lengths 1, 17, 65, 130, 257 (one, several and partial blocks of 64
and 128), unequal query and key lengths (KV-cache decoding, and more queries than keys, where the first
queries see nothing), GQA ratios 1, 2, 4 and 8, head dims 16 (the tiny test model), 32, 64, 128 and 40
(not a power of two), causal and full, float32, float16 and bfloat16.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_llm.attention import attention_backend, flash_attention
from lightning_llm.attention.reference import naive_attention, tiled_attention_backward, tiled_attention_forward

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    attention_backend(DEVICE) == "sdpa",
    reason="the Triton kernels do not run in this process (no CUDA, TRITON_INTERPRET unset at triton import); "
    "test_attention.py runs this file under the interpreter",
)

# Largest error allowed against float64, relative to max(1, largest magnitude of the expected tensor).
# Half precision is bounded by rounding O (and P, before P V) to 8 or 11 significant bits.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def assert_close_to(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    error = (actual.double() - expected).abs().max().item()
    bound = TOLERANCE[dtype] * max(1.0, expected.abs().max().item())
    assert error <= bound, f"{what}: max error {error:.3g} > {bound:.3g} ({dtype})"


def random_inputs(shape_q, shape_kv, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=generator).to(DEVICE, dtype) for shape in (shape_q, shape_kv, shape_kv))
    return q, k, v


def float64_oracle(q, k, v, do, causal):
    """Naive attention and its autograd gradients, in float64."""
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    o, lse = naive_attention(q64, k64, v64, causal=causal)
    return o, lse, torch.autograd.grad(o, (q64, k64, v64), do.double())


# batch, heads, kv_heads, seq_q, seq_k, head_dim, causal, dtype
CASES = [
    (2, 4, 2, 17, 17, 16, True, torch.float32),
    (1, 2, 2, 1, 1, 32, True, torch.float32),
    (1, 8, 1, 65, 65, 32, False, torch.float32),
    (1, 4, 1, 130, 130, 64, True, torch.float32),
    (1, 2, 2, 257, 257, 64, True, torch.bfloat16),
    (1, 2, 1, 130, 130, 128, False, torch.bfloat16),
    (2, 2, 2, 65, 65, 40, True, torch.bfloat16),
    (1, 4, 2, 1, 65, 64, True, torch.bfloat16),
    (1, 8, 2, 130, 130, 32, True, torch.float16),
    (1, 2, 1, 17, 130, 128, True, torch.float16),
    (1, 2, 2, 130, 65, 64, True, torch.float16),
    (1, 4, 4, 257, 130, 16, False, torch.float16),
]


@pytest.mark.parametrize("batch,heads,kv_heads,seq_q,seq_k,head_dim,causal,dtype", CASES,
                         ids=[f"b{c[0]}h{c[1]}kv{c[2]}-q{c[3]}k{c[4]}-d{c[5]}-{'causal' if c[6] else 'full'}-"
                              f"{str(c[7])[6:]}" for c in CASES])
def test_forward_lse_and_gradients_match_float64(batch, heads, kv_heads, seq_q, seq_k, head_dim, causal, dtype):
    from lightning_llm.attention import triton_kernels

    q, k, v = random_inputs((batch, heads, seq_q, head_dim), (batch, kv_heads, seq_k, head_dim), dtype, seed=seq_q)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    o_ref, lse_ref, grads_ref = float64_oracle(q, k, v, do, causal)
    scale = head_dim ** -0.5

    o, lse = triton_kernels.attention_forward(q, k, v, causal=causal, scale=scale)
    assert_close_to(o, o_ref, dtype, "O")
    # A row that sees no key has lse +inf in both; the finite ones agree to float32 rounding.
    assert torch.equal(lse.isinf(), lse_ref.isinf())
    finite = lse_ref.isfinite()
    assert_close_to(lse[finite], lse_ref[finite], torch.float32, "log-sum-exp")
    for deterministic in (False, True):
        grads = triton_kernels.attention_backward(do, q, k, v, o, lse, causal=causal, scale=scale,
                                                  deterministic=deterministic)
        for name, grad, grad_ref in zip(("dQ", "dK", "dV"), grads, grads_ref):
            assert grad.shape == grad_ref.shape and grad.dtype == dtype
            assert_close_to(grad, grad_ref, dtype, f"{name} (deterministic={deterministic})")


# (dtype, whether the caller passes max_seqlen: then the boundaries are trusted, not copied to the host)
@pytest.mark.parametrize("dtype,pass_max_seqlen", [(torch.float32, True), (torch.bfloat16, False)])
def test_varlen_sequences_never_attend_across_boundaries(dtype, pass_max_seqlen):
    # Lengths straddle the 64/128 blocks; a block of queries holds the end of one sequence and the start
    # of the next, and the keys are shorter than the queries in one sequence (its first queries see nothing).
    lengths_q, lengths_k = [17, 1, 130, 65], [17, 1, 65, 130]
    heads, kv_heads, head_dim = 4, 2, 32
    q, k, v = random_inputs((sum(lengths_q), heads, head_dim), (sum(lengths_k), kv_heads, head_dim), dtype, seed=7)
    for x in (q, k, v):
        x.requires_grad_()
    cu_q = torch.tensor([0, 17, 18, 148, 213], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 17, 18, 83, 213], dtype=torch.int32, device=DEVICE)
    max_seqlen = dict(max_seqlen=max(lengths_q), max_seqlen_k=max(lengths_k)) if pass_max_seqlen else {}
    o = flash_attention(q, k, v, cu_seqlens=cu_q, cu_seqlens_k=cu_k, **max_seqlen)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    grads = torch.autograd.grad(o, (q, k, v), do)

    # Oracle: each sequence alone, in float64.
    as_batch = lambda x: x.detach().transpose(0, 1).unsqueeze(0)  # noqa: E731  [T, H, D] -> [1, H, T, D]
    expected_o, expected_grads = [], [[], [], []]
    for q0, q1, k0, k1 in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist()):
        o_ref, _, grads_ref = float64_oracle(as_batch(q[q0:q1]), as_batch(k[k0:k1]), as_batch(v[k0:k1]),
                                             as_batch(do[q0:q1]), causal=True)
        expected_o.append(o_ref[0].transpose(0, 1))
        for i, g in enumerate(grads_ref):
            expected_grads[i].append(g[0].transpose(0, 1))
    assert_close_to(o, torch.cat(expected_o), dtype, "O")
    for name, grad, parts in zip(("dQ", "dK", "dV"), grads, expected_grads):
        assert_close_to(grad, torch.cat(parts), dtype, name)


def test_autograd_through_strided_views_and_gqa():
    # transformers hands the kernel transposed views of [B, T, H, D] projections; any layout with a unit
    # last stride is read in place, and one without is copied first.
    batch, seq, heads, kv_heads, head_dim = 2, 65, 8, 2, 32
    q = torch.randn(batch, seq, heads, head_dim, device=DEVICE).transpose(1, 2).requires_grad_()
    k_t = torch.randn(batch, kv_heads, head_dim, seq, device=DEVICE)
    k = k_t.transpose(-1, -2).requires_grad_()  # last stride is seq, not 1
    v = torch.randn(batch, kv_heads, seq, head_dim, device=DEVICE).requires_grad_()
    o = flash_attention(q, k, v, causal=True)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    o_ref, _, grads_ref = float64_oracle(q, k, v, do, causal=True)
    assert_close_to(o, o_ref, torch.float32, "O")
    for name, grad, grad_ref in zip(("dQ", "dK", "dV"), grads, grads_ref):
        assert_close_to(grad, grad_ref, torch.float32, name)


def test_deterministic_backward_is_reproducible_bit_for_bit():
    q, k, v = random_inputs((1, 4, 130, 64), (1, 2, 130, 64), torch.bfloat16, seed=3)
    for x in (q, k, v):
        x.requires_grad_()

    def gradients():
        o = flash_attention(q, k, v, deterministic=True)
        return torch.autograd.grad(o, (q, k, v), torch.ones_like(o))

    first, second = gradients(), gradients()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype,head_dim,causal", [(torch.float32, 64, True), (torch.bfloat16, 128, False)])
def test_gradients_match_the_tiled_reference_and_sdpa(dtype, head_dim, causal):
    # The same dQ, dK, dV three ways: the kernels, reference.py's tiled backward run on its own forward, and
    # torch's scaled_dot_product_attention through autograd, all in `dtype` (tails: 65 = 64 + 1).
    q, k, v = random_inputs((2, 4, 65, head_dim), (2, 2, 65, head_dim), dtype, seed=11)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE, dtype)
    for x in (q, k, v):
        x.requires_grad_()
    grads = torch.autograd.grad(flash_attention(q, k, v, causal=causal), (q, k, v), do)
    o_tiled, lse_tiled = tiled_attention_forward(q.detach(), k.detach(), v.detach(), causal=causal)
    grads_tiled = tiled_attention_backward(do, q.detach(), k.detach(), v.detach(), o_tiled, lse_tiled, causal=causal)
    o_sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    grads_sdpa = torch.autograd.grad(o_sdpa, (q, k, v), do)
    for name, grad, tiled, sdpa in zip(("dQ", "dK", "dV"), grads, grads_tiled, grads_sdpa):
        assert_close_to(grad, tiled.double(), dtype, f"{name} vs tiled reference")
        assert_close_to(grad, sdpa.double(), dtype, f"{name} vs SDPA")


class _Allocations(TorchDispatchMode):
    """Records the shape of every tensor that a torch operation returns."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [tuple(t.shape) for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


@pytest.mark.parametrize("kv_heads", [1, 2])  # multi-query and grouped-query
def test_grouped_query_attention_never_materialises_repeated_kv(kv_heads):
    # Naive GQA repeats K and V to [batch, heads, seq, head_dim]; the kernels index head // group instead,
    # so no tensor of that shape with the keys' length may appear, forward or backward (seq_q != seq_k so
    # that Q-shaped tensors do not count).
    batch, heads, seq_q, seq_k, head_dim = 1, 8, 17, 40, 32
    q, k, v = random_inputs((batch, heads, seq_q, head_dim), (batch, kv_heads, seq_k, head_dim), torch.float32, 5)
    for x in (q, k, v):
        x.requires_grad_()
    with _Allocations() as allocations:
        o = flash_attention(q, k, v)
        grads = torch.autograd.grad(o, (q, k, v), torch.ones_like(o))
    assert (batch, kv_heads, seq_k, head_dim) in allocations.shapes  # dK and dV: the mode does see allocations
    assert (batch, heads, seq_k, head_dim) not in allocations.shapes
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]

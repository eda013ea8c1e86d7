"""`flash_attention(..., return_lse=True)` and `flash_attention_backward` against naive attention in float64.

Whatever path this process takes: torch's CPU FlashAttention op in a plain CPU run, the Triton kernels on
CUDA or (run again by `test_attention.py::test_kernels_under_triton_interpreter`) under Triton's interpreter.
The backward is checked with its own log-sum-exp and with an external one: the softmax over two disjoint
halves of the keys, backpropagated half by half with the log-sum-exp of the whole, must add up to the
gradient of the whole (what ring attention relies on).
"""

from __future__ import annotations

import pytest
import torch

from lightning_llm.attention import flash_attention, flash_attention_backward
from lightning_llm.attention.reference import naive_attention
from tolerances import reordered_sum_rtol

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def close_to(actual: torch.Tensor, expected: torch.Tensor, terms: int, what: str) -> None:
    # float32 against float64: each entry is a sum of `terms` products (keys for O and dQ, queries times the
    # query heads of a group for dK and dV) whose magnitudes sum to at most a few times max(1, |expected|) for
    # these unit-normal inputs, plus the exp/log of the softmax (a few ulps): the reordered-sum bound of that
    # many terms, with a factor 4 for the sum of magnitudes.
    bound = 4 * reordered_sum_rtol(torch.float32, terms) * max(1.0, expected.abs().max().item())
    error = (actual.double() - expected).abs().max().item()
    assert error <= bound, f"{what}: max error {error:.3g} > {bound:.3g}"


def inputs(batch, heads, kv_heads, seq_q, seq_k, head_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq_q, head_dim, generator=g, dtype=torch.float64)
    k, v = (torch.randn(batch, kv_heads, seq_k, head_dim, generator=g, dtype=torch.float64) for _ in range(2))
    do = torch.randn(q.shape, generator=g, dtype=torch.float64)
    return q, k, v, do


def oracle(q, k, v, do, causal):
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    o, lse = naive_attention(q, k, v, causal=causal)
    return o, lse, torch.autograd.grad(o, (q, k, v), do)


def on_device(*xs):
    return [x.to(DEVICE, torch.float32) for x in xs]


# batch, heads, kv_heads, seq_q, seq_k, head_dim, causal: GQA 1/2/4, more and fewer queries than keys (the
# first queries of 40 x 17 causal see no key: output 0, lse +inf), head dim 40 (not a power of two)
CASES = [
    (2, 4, 2, 33, 33, 16, True),
    (1, 4, 1, 17, 40, 32, True),
    (1, 2, 2, 40, 17, 40, True),
    (2, 4, 4, 33, 65, 16, False),
]


@pytest.mark.parametrize("batch,heads,kv_heads,seq_q,seq_k,head_dim,causal", CASES)
def test_return_lse_and_backward_from_it_match_naive(batch, heads, kv_heads, seq_q, seq_k, head_dim, causal):
    q, k, v, do = inputs(batch, heads, kv_heads, seq_q, seq_k, head_dim)
    o_ref, lse_ref, grads_ref = oracle(q, k, v, do, causal)
    q32, k32, v32, do32 = on_device(q, k, v, do)
    o, lse = flash_attention(q32, k32, v32, causal=causal, return_lse=True)
    assert lse.dtype == torch.float32 and lse.shape == (batch, heads, seq_q)
    close_to(o, o_ref, seq_k, "O")
    assert torch.equal(lse.isinf().cpu(), lse_ref.isinf())
    finite = lse_ref.isfinite()
    close_to(lse.cpu()[finite], lse_ref[finite], seq_k, "log-sum-exp")
    grads = flash_attention_backward(do32, q32, k32, v32, o, lse, causal=causal)
    group = heads // kv_heads
    for name, grad, grad_ref, terms in zip(("dQ", "dK", "dV"), grads, grads_ref, (seq_k, seq_q * group, seq_q * group)):
        assert grad.shape == grad_ref.shape
        close_to(grad, grad_ref, terms, name)
    # autograd through the returned output is the same backward
    q32, k32, v32 = (x.requires_grad_() for x in (q32, k32, v32))
    o, _ = flash_attention(q32, k32, v32, causal=causal, return_lse=True)
    autograd_grads = torch.autograd.grad(o, (q32, k32, v32), do32)
    terms = (seq_k, seq_q * group, seq_q * group)
    for name, grad, grad_ref, n in zip(("dQ", "dK", "dV"), autograd_grads, grads_ref, terms):
        close_to(grad, grad_ref, n, f"{name} (autograd)")


def test_backward_with_an_external_lse_adds_up_over_blocks_of_keys():
    # Attention over keys [A | B] merged from attention over A and over B by log-sum-exp; each block's
    # backward with the merged O and lse gives that block's dK, dV and a share of dQ.
    q, k, v, do = inputs(1, 4, 2, 24, 48, 16, seed=1)
    o_ref, lse_ref, (dq_ref, dk_ref, dv_ref) = oracle(q, k, v, do, causal=False)
    q32, k32, v32, do32 = on_device(q, k, v, do)
    halves = [(k32[:, :, :20], v32[:, :, :20]), (k32[:, :, 20:], v32[:, :, 20:])]
    parts = [flash_attention(q32, kb, vb, causal=False, return_lse=True) for kb, vb in halves]
    lse = torch.logaddexp(parts[0][1], parts[1][1])
    o = sum(o_b * torch.exp(lse_b - lse)[..., None] for o_b, lse_b in parts)
    close_to(o, o_ref, 48, "merged O")
    close_to(lse, lse_ref, 48, "merged log-sum-exp")
    grads = [flash_attention_backward(do32, q32, kb, vb, o, lse, causal=False) for kb, vb in halves]
    close_to(grads[0][0] + grads[1][0], dq_ref, 48, "dQ summed over the blocks")
    close_to(torch.cat([grads[0][1], grads[1][1]], dim=2), dk_ref, 24 * 2, "dK")
    close_to(torch.cat([grads[0][2], grads[1][2]], dim=2), dv_ref, 24 * 2, "dV")
    # A block of queries too, whose O and lse are slices of the whole's (strided views, as ring attention's
    # second query chunk): its rows of dQ.
    rows = slice(10, None)
    dq_rows, _, _ = flash_attention_backward(do32[:, :, rows], q32[:, :, rows], k32, v32, o[:, :, rows],
                                             lse[:, :, rows], causal=False)
    close_to(dq_rows, dq_ref[:, :, rows], 48, "dQ of a block of queries")


def test_packed_return_lse_and_backward_equal_each_sequence_alone():
    lengths = [7, 1, 26]
    q, k, v, do = inputs(1, 4, 2, sum(lengths), sum(lengths), 16, seed=2)
    tokens = lambda x: x[0].transpose(0, 1)  # noqa: E731  [1, H, T, D] -> [T, H, D]
    cu_seqlens = torch.tensor([0, 7, 8, 34], device=DEVICE)
    q32, k32, v32, do32 = on_device(*(tokens(x) for x in (q, k, v, do)))
    o, lse = flash_attention(q32, k32, v32, cu_seqlens=cu_seqlens, return_lse=True)
    assert o.shape == q32.shape and lse.shape == (4, 34)
    grads = flash_attention_backward(do32, q32, k32, v32, o, lse, cu_seqlens=cu_seqlens)
    start = 0
    for length in lengths:
        part = slice(start, start + length)
        o_ref, lse_ref, grads_ref = oracle(*(x[:, :, part] for x in (q, k, v, do)), causal=True)
        close_to(o[part], tokens(o_ref), length, f"O of the sequence at {start}")
        close_to(lse[:, part], lse_ref[0], length, f"lse of the sequence at {start}")
        for name, grad, grad_ref in zip(("dQ", "dK", "dV"), grads, grads_ref):
            close_to(grad[part], tokens(grad_ref), 2 * length, f"{name} of the sequence at {start}")
        start += length


def test_a_gradient_through_the_lse_is_refused():
    q, k, v = (x.requires_grad_() for x in on_device(*inputs(1, 2, 2, 8, 8, 16)[:3]))
    o, lse = flash_attention(q, k, v, return_lse=True)
    with pytest.raises(NotImplementedError, match="log-sum-exp"):
        (o.sum() + lse.sum()).backward()


def test_backward_checks_the_shapes_it_is_given():
    q, k, v, do = on_device(*inputs(1, 2, 2, 8, 8, 16))
    o, lse = flash_attention(q, k, v, return_lse=True)
    with pytest.raises(ValueError, match=r"lse \(1, 2, 8\)"):
        flash_attention_backward(do, q, k, v, o, lse[:, :, :4])


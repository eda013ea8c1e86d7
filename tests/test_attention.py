"""FlashAttention without a GPU: the tiled reference, the dispatch path, input checks, the kernels' build for
real GPUs, and (in a child process under Triton's interpreter) the kernels themselves.

Every output is checked against naive softmax(QK^T * scale)V computed in float64.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_llm.attention import FlashAttention, attention_backend, flash, flash_attention
from lightning_llm.attention.reference import naive_attention, tiled_attention_backward, tiled_attention_forward
from tolerances import reordered_sum_rtol

ROOT = Path(__file__).resolve().parents[1]
BACKEND = attention_backend("cpu")


def float64_grads(q, k, v, do, causal):
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    o, lse = naive_attention(q, k, v, causal=causal)
    return o, lse, torch.autograd.grad(o, (q, k, v), do.double())


# batch, heads, kv_heads, seq_q, seq_k, head_dim, causal: block boundaries, GQA 1/2/4/8, unequal lengths
# (with more queries than keys the first queries see no key: output 0, lse +inf).
REFERENCE_CASES = [
    (2, 4, 2, 17, 17, 32, True),
    (1, 8, 1, 65, 130, 16, True),
    (1, 4, 1, 130, 65, 16, True),
    (2, 2, 2, 33, 33, 64, False),
    (1, 2, 1, 1, 1, 8, True),
]


@pytest.mark.parametrize("batch,heads,kv_heads,seq_q,seq_k,head_dim,causal", REFERENCE_CASES)
def test_tiled_reference_matches_naive_float64(batch, heads, kv_heads, seq_q, seq_k, head_dim, causal):
    g = torch.Generator().manual_seed(seq_q)
    q = torch.randn(batch, heads, seq_q, head_dim, generator=g, dtype=torch.float64)
    k, v = (torch.randn(batch, kv_heads, seq_k, head_dim, generator=g, dtype=torch.float64) for _ in range(2))
    do = torch.randn(q.shape, generator=g, dtype=torch.float64)
    o_ref, lse_ref, grads_ref = float64_grads(q, k, v, do, causal)
    o, lse = tiled_attention_forward(q, k, v, causal=causal, block_m=16, block_n=32)
    torch.testing.assert_close(o, o_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, lse_ref, atol=1e-12, rtol=1e-12)  # +inf rows compare equal
    grads = tiled_attention_backward(do, q, k, v, o, lse, causal=causal, block_m=16, block_n=32)
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seq_q,seq_k", [(17, 17), (1, 40), (40, 17)])
def test_flash_attention_matches_naive_on_this_machines_path(seq_q, seq_k, causal):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, seq_q, 32, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 2, seq_k, 32, generator=g, requires_grad=True) for _ in range(2))
    o = flash_attention(q, k, v, causal=causal)
    do = torch.randn(o.shape, generator=g)
    o_ref, _, grads_ref = float64_grads(q, k, v, do, causal)
    torch.testing.assert_close(o.double(), o_ref, atol=2e-5, rtol=2e-5)
    for grad, grad_ref in zip(torch.autograd.grad(o, (q, k, v), do), grads_ref):
        torch.testing.assert_close(grad.double(), grad_ref, atol=2e-5, rtol=2e-5)


def test_varlen_on_this_machines_path_equals_each_sequence_alone():
    g = torch.Generator().manual_seed(1)
    lengths = [5, 1, 23]
    q = torch.randn(sum(lengths), 4, 16, generator=g)
    k, v = (torch.randn(sum(lengths), 1, 16, generator=g) for _ in range(2))
    cu_seqlens = torch.tensor([0, 5, 6, 29], dtype=torch.int32)
    out = FlashAttention(causal=True)(q, k, v, cu_seqlens=cu_seqlens)
    as_batch = lambda x: x.transpose(0, 1).unsqueeze(0).double()  # noqa: E731  [T, H, D] -> [1, H, T, D]
    expected = torch.cat([
        naive_attention(as_batch(q_i), as_batch(k_i), as_batch(v_i))[0][0].transpose(0, 1)
        for q_i, k_i, v_i in zip(q.split(lengths), k.split(lengths), v.split(lengths))
    ])
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)


def block_diagonal_oracle(q, k, v, lengths, causal):
    """Dense attention over the whole packed block under a block-diagonal mask: what transformers' sdpa
    attention computes for packed examples, each query against every key of the block, keys of other
    sequences masked. [T, H, D] in and out; K/V heads repeated by hand, not by SDPA's enable_gqa."""
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    mask = segment[:, None] == segment[None, :]
    if causal:
        mask &= torch.ones(len(segment), len(segment), dtype=torch.bool).tril()
    group = q.shape[1] // k.shape[1]
    q4, k4, v4 = (x.transpose(0, 1).unsqueeze(0) for x in (q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)))
    return torch.nn.functional.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask)[0].transpose(0, 1)


# heads, kv_heads, head_dim, lengths, causal: odd lengths with GQA (K/V unexpanded), one sequence, a block
# whose end is padding (the packer's padding is a sequence of its own: 3 tokens here), a 1-token sequence,
# multi-query attention, and bidirectional attention.
PACKED_CASES = [
    (4, 2, 16, [7, 13, 1, 29], True),
    (4, 4, 32, [37], True),
    (6, 3, 8, [11, 17, 3], True),
    (8, 1, 64, [1, 23, 9, 2], True),
    (4, 2, 16, [7, 13, 21], False),
]


@pytest.mark.skipif(BACKEND != flash.SDPA, reason="the CPU path; the kernels are checked in test_attention_kernel.py")
@pytest.mark.parametrize("heads,kv_heads,head_dim,lengths,causal", PACKED_CASES)
def test_packed_cpu_path_equals_the_block_diagonal_masked_oracle(heads, kv_heads, head_dim, lengths, causal, monkeypatch):
    g = torch.Generator().manual_seed(sum(lengths))
    q = torch.randn(sum(lengths), heads, head_dim, generator=g, requires_grad=True)
    k, v = (torch.randn(sum(lengths), kv_heads, head_dim, generator=g, requires_grad=True) for _ in range(2))
    do = torch.randn(q.shape, generator=g)
    cu_seqlens = torch.tensor([0, *lengths]).cumsum(0)
    key_lengths = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(query, key, value, **kwargs):
        key_lengths.append(key.shape[-2])
        return sdpa(query, key, value, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    out = flash_attention(q, k, v, causal=causal, cu_seqlens=cu_seqlens)
    grads = torch.autograd.grad(out, (q, k, v), do)
    assert key_lengths == lengths  # one call per sequence over its own keys: no pair across sequences is computed
    expected = block_diagonal_oracle(q, k, v, lengths, causal)
    expected_grads = torch.autograd.grad(expected, (q, k, v), do)
    # Both are float32 softmax(QK^T)V over the same keys (masked keys add exp(-inf) = 0 exactly); only the
    # order of the roundings differs: dot products of head_dim terms, sums over up to the longest sequence's
    # keys, and in the backward pass three such reductions in a row (dP = dO V^T, delta = rowsum(dO O), dS K).
    # A reordered sum of n terms moves by at most 2 (n - 1) u of the sum of the terms' magnitudes; the
    # result's largest value stands in for that sum (the softmax weights are positive and sum to 1, so
    # the terms of O are no larger than the values averaged, and likewise for the gradients' sums).
    rtol = reordered_sum_rtol(torch.float32, 3 * (max(lengths) + head_dim))
    for actual, reference in zip((out, *grads), (expected, *expected_grads)):
        torch.testing.assert_close(actual, reference, rtol=rtol, atol=rtol * reference.abs().max().item())


@pytest.mark.skipif(BACKEND != flash.SDPA, reason="the CPU path; the kernels are checked in test_attention_kernel.py")
def test_packed_cpu_backward_memory_does_not_grow_with_the_number_of_sequences():
    # The backward pass writes dQ, dK, dV once (1x the inputs), the per-sequence gradients before they are
    # joined (1x) and SDPA's small per-sequence buffers: a few times the inputs, however many sequences.
    # Gradients routed back through one slice per sequence would each fill a buffer the size of the whole
    # packed input: 64 sequences, 64x.
    lengths = [3] * 64
    q = torch.randn(sum(lengths), 4, 16, requires_grad=True)
    k, v = (torch.randn(sum(lengths), 2, 16, requires_grad=True) for _ in range(2))
    out = flash_attention(q, k, v, cu_seqlens=torch.tensor([0, *lengths]).cumsum(0))
    with torch.profiler.profile(profile_memory=True) as profile:
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    allocated = sum(event.self_cpu_memory_usage for event in profile.events() if event.self_cpu_memory_usage > 0)
    inputs = sum(x.numel() * x.element_size() for x in (q, k, v))
    assert allocated <= 8 * inputs, f"the backward pass allocated {allocated / inputs:.1f}x its inputs"


def test_the_path_taken_is_logged_once_and_recorded(monkeypatch, caplog):
    monkeypatch.setattr(flash, "_announced", set())
    module = FlashAttention(causal=True)
    q = torch.randn(1, 2, 8, 16)
    with caplog.at_level(logging.INFO, logger="lightning_llm.attention.flash"):
        module(q, q, q)
        module(q, q, q)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    assert ("scaled_dot_product_attention" if BACKEND == "sdpa" else "interpreter") in lines[0]
    assert module.backend == BACKEND
    expected = "triton-interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else "sdpa"
    assert BACKEND == expected


@pytest.mark.parametrize("q_shape,kv_shape,dtypes,message", [
    ((2, 4, 8, 32), (2, 4, 8, 16), None, "share head_dim"),
    ((2, 4, 8, 256), (2, 4, 8, 256), None, "head_dim 256 is not supported"),
    ((2, 4, 8, 32), (2, 3, 8, 32), None, "not a multiple"),
    ((2, 4, 8, 32), (1, 4, 8, 32), None, "batch"),
    ((4, 8, 32), (4, 8, 32), None, r"\[batch, heads, seq, head_dim\]"),
    ((2, 4, 0, 32), (2, 4, 8, 32), None, "empty"),
    ((2, 4, 8, 32), (2, 4, 8, 32), (torch.float16, torch.float32), "share a dtype"),
    ((2, 4, 8, 32), (2, 4, 8, 32), (torch.int64, torch.int64), "dtype torch.int64"),
])
def test_bad_inputs_are_refused_with_a_clear_error(q_shape, kv_shape, dtypes, message):
    q_dtype, kv_dtype = dtypes or (torch.float32, torch.float32)
    q = torch.ones(q_shape, dtype=q_dtype)
    k = v = torch.ones(kv_shape, dtype=kv_dtype)
    with pytest.raises((ValueError, TypeError), match=message):
        flash_attention(q, k, v)


@pytest.mark.parametrize("cu_seqlens,message", [
    (torch.tensor([0, 5, 9]), "rise from 0 to the number of tokens"),
    (torch.tensor([1, 5, 10]), "rise from 0"),
    (torch.tensor([0, 6, 5, 10]), "rise from 0"),
    (torch.tensor([0.0, 10.0]), "int32"),
    (torch.tensor([[0, 10]]), "1-d"),
])
def test_bad_cu_seqlens_are_refused(cu_seqlens, message):
    q = torch.ones(10, 2, 16)
    with pytest.raises(ValueError, match=message):
        flash_attention(q, q, q, cu_seqlens=cu_seqlens)


def test_packing_arguments_without_cu_seqlens_are_refused():
    q = torch.ones(1, 2, 10, 16)
    with pytest.raises(ValueError, match="pass cu_seqlens too"):
        flash_attention(q, q, q, max_seqlen=10)


def test_module_validates_its_scale():
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        FlashAttention(scale=-1.0)


@pytest.mark.skipif(BACKEND != "sdpa", reason="the interpreter's kernels are Python functions, not compilable")
@pytest.mark.parametrize("capability", [80, 90])
def test_kernels_build_for_ampere_and_hopper(capability):
    # The interpreter is more lenient than Triton's compiler, and runs only the first tile configuration of
    # each kernel: without a GPU, at least compile the kernels all the way to a cubin for a bf16 hd128 run,
    # for A100 (sm_80) in the first configuration and for H100 (sm_90) in every one the autotuner may pick.
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lightning_llm.attention import triton_kernels as kernels

    constexprs = dict(HEAD_DIM=128, BLOCK_D=128, CAUSAL=True, VARLEN=True, UPCAST=False, PRECISION="tf32")
    builds = [
        (kernels._forward_kernel, kernels._FORWARD_TILES, {}),
        (kernels._backward_dkdv_kernel, kernels._BACKWARD_DKDV_TILES, dict(ATOMIC_DQ=True)),
        (kernels._backward_dq_kernel, kernels._BACKWARD_DQ_TILES, {}),
    ]
    for kernel, table, extra in builds:
        float32_buffers = {"LSE", "DELTA"} | ({"DQ"} if extra.get("ATOMIC_DQ") else set())
        signature = {
            name: "constexpr" if name in {**constexprs, **extra, "BLOCK_M": 0, "BLOCK_N": 0}
            else "*i32" if name.startswith("CU_SEQLENS")
            else "*fp32" if name in float32_buffers
            else "*bf16" if name.isupper()
            else "fp32" if name.endswith("scale")
            else "i32"
            for name in kernel.arg_names
        }
        for block_m, block_n, num_warps, num_stages in table[128] if capability == 90 else table[128][:1]:
            values = {**constexprs, **extra, "BLOCK_M": block_m, "BLOCK_N": block_n}
            compiled = triton.compile(ASTSource(kernel.fn, signature, constexprs=values),
                                      target=GPUTarget("cuda", capability, 32),
                                      options=dict(num_warps=num_warps, num_stages=num_stages))
            assert compiled.asm["cubin"]


@pytest.mark.skipif(BACKEND != "sdpa" or torch.cuda.is_available(),
                    reason="the kernel tests already run in this process")
def test_kernels_under_triton_interpreter():
    # TRITON_INTERPRET=1 only takes effect if set before triton is imported, and Lightning imports triton:
    # the kernel tests and the model parity tests run in a fresh interpreter with the variable set.
    files = ["tests/test_attention_kernel.py", "tests/test_attention_hf.py", "tests/test_attention_lse.py"]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *files],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    report = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, report
    summary = result.stdout.strip().splitlines()[-1]
    assert "passed" in summary and "skipped" not in summary, report


def test_under_autocast_attention_computes_in_its_dtype_as_sdpa_does():
    # Under bf16 mixed precision a Llama hands attention float32 q and k (its rotary tables are float32) and a
    # bf16 v; SDPA casts all three to autocast's dtype, and so must flash_attention (it refused the mix).
    import torch.nn.functional as F

    from lightning_llm.models import build_model

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 19, 32, generator=g), torch.randn(1, 2, 19, 32, generator=g)
    v = torch.randn(1, 2, 19, 32, generator=g).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = flash_attention(q, k, v, causal=True)
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert out.dtype == expected.dtype == torch.bfloat16
    o_ref, _ = naive_attention(q.bfloat16().double(), k.bfloat16().double(), v.double(), causal=True)
    # Both round O to bfloat16 (8 significant bits) from inputs rounded alike: within 2^-8 of |O|'s scale.
    for got in (out, expected):
        torch.testing.assert_close(got.double(), o_ref, atol=2**-8 * o_ref.abs().max().item(), rtol=0)
    torch.manual_seed(0)
    model = build_model("tiny", vocab_size=64, attn_implementation="lightning_fa2")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.arange(24).reshape(2, 12) % 64).logits
    assert logits.dtype == torch.bfloat16 and logits.isfinite().all()

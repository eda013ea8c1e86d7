"""The Triton FlashAttention kernels on CUDA against SDPA: forward and backward in every dtype the kernels
take (float16, bfloat16, float32), causal and full, grouped-query, head dims 64 and 128, lengths that are no
multiple of a tile (and unequal query and key lengths); then every tile configuration the autotuner may
pick, each forced in turn, since a config that only wins on some GPU must be right everywhere.

The oracle is torch's scaled_dot_product_attention in float64 (its math backend) through autograd, with the
kernels' bottom-right causal alignment (`flash._sdpa`); the errors allowed are test_attention_kernel.py's:
rounding O and P to the dtype's significand, relative to the largest magnitude of the expected tensor.
"""

from __future__ import annotations

import pytest
import torch
from gpu_support import DEVICE, DRY_RUN
from test_attention_kernel import TOLERANCE, assert_close_to, random_inputs

from lightning_llm.attention import attention_backend, flash_attention
from lightning_llm.attention.flash import _sdpa

pytestmark = pytest.mark.skipif(
    attention_backend(DEVICE) == "sdpa",
    reason="the Triton kernels do not run in this process: they need CUDA, or TRITON_INTERPRET=1 set before "
    "triton is imported (gpu.sh --dry-run sets it)",
)

# (seq_q, seq_k): lengths that end in a partial tile, equal, and with fewer queries than keys.
SEQS = [(33, 33), (17, 40)] if DRY_RUN else [(1000, 1000), (257, 701)]
BATCH, HEADS, KV_HEADS = (1, 2, 1) if DRY_RUN else (2, 8, 2)
# Every dtype with both head dims and both causalities; bfloat16, the dtype of training runs and of
# benchmarks/attention.py, in all four combinations. Each compiles and tunes the kernels once (the lengths
# share a tuning key), which is most of this file's time on a GPU.
COMBINATIONS = [(torch.float16, 64, True), (torch.float16, 128, False), (torch.bfloat16, 128, True),
                (torch.bfloat16, 64, False), (torch.float32, 64, True), (torch.float32, 128, False)]
if DRY_RUN:  # the interpreter is slow: one length pair per combination, both pairs appear
    CASES = [(dtype, head_dim, causal, SEQS[i % 2]) for i, (dtype, head_dim, causal) in enumerate(COMBINATIONS)]
else:
    COMBINATIONS += [(torch.bfloat16, 64, True), (torch.bfloat16, 128, False)]
    CASES = [(dtype, head_dim, causal, seqs) for dtype, head_dim, causal in COMBINATIONS for seqs in SEQS]


def sdpa_float64(q, k, v, do, causal):
    """SDPA's output and its gradients, in float64."""
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    o = _sdpa(q64, k64, v64, causal, q.shape[-1] ** -0.5)
    return o, torch.autograd.grad(o, (q64, k64, v64), do.double())


def check_against_sdpa(dtype, head_dim, causal, seq_q, seq_k, deterministic=False):
    q, k, v = random_inputs((BATCH, HEADS, seq_q, head_dim), (BATCH, KV_HEADS, seq_k, head_dim), dtype, seed=seq_q)
    for x in (q, k, v):
        x.requires_grad_()
    o = flash_attention(q, k, v, causal=causal, deterministic=deterministic)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    grads = torch.autograd.grad(o, (q, k, v), do)
    o_ref, grads_ref = sdpa_float64(q, k, v, do, causal)
    assert o.dtype == dtype and o.device.type == DEVICE
    assert_close_to(o, o_ref, dtype, "O")
    for name, grad, grad_ref in zip(("dQ", "dK", "dV"), grads, grads_ref):
        assert grad.dtype == dtype and grad.shape == grad_ref.shape
        assert_close_to(grad, grad_ref, dtype, f"{name} (deterministic={deterministic})")


@pytest.mark.parametrize("dtype,head_dim,causal,seqs", CASES,
                         ids=[f"{str(c[0])[6:]}-d{c[1]}-{'causal' if c[2] else 'full'}-q{c[3][0]}k{c[3][1]}"
                              for c in CASES])
def test_forward_and_backward_match_sdpa(dtype, head_dim, causal, seqs):
    assert set(TOLERANCE) == {torch.float16, torch.bfloat16, torch.float32}  # every dtype the kernels take
    check_against_sdpa(dtype, head_dim, causal, *seqs)


@pytest.fixture
def force_tiles(monkeypatch):
    """Make the autotuner use entry `index` of each kernel's list (its pruner reads the tables) and forget
    what it tuned (a cached choice for the key would skip the pruner)."""
    from lightning_llm.attention import triton_kernels as kernels

    tables = {kernels._forward_kernel: kernels._FORWARD_TILES, kernels._backward_dkdv_kernel: kernels._BACKWARD_DKDV_TILES,
              kernels._backward_dq_kernel: kernels._BACKWARD_DQ_TILES}

    def force(index: int) -> list[tuple]:
        forced = []
        for kernel, table in tables.items():
            for head_class, entries in list(table.items()):
                monkeypatch.setitem(table, head_class, [entries[index % len(entries)]])
                forced.append(table[head_class][0])
            monkeypatch.setattr(kernel, "cache", {})
        return forced

    return force


TILE_INDICES = range(3)  # the longest list has 3 entries; shorter ones wrap around


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("index", TILE_INDICES)
def test_every_tile_configuration_is_correct(force_tiles, index, head_dim):
    print("forced tiles:", force_tiles(index))
    seq_q, seq_k = (17, 70) if DRY_RUN else (193, 300)  # partial blocks of 16 to 128 on both sides
    for deterministic in (False, True):
        check_against_sdpa(torch.float16, head_dim, True, seq_q, seq_k, deterministic=deterministic)

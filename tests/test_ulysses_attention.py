"""All-to-all (Ulysses) attention on gloo with 2 and 4 processes against naive attention over the whole
sequence in float64.

Every rank holds its load-balanced share of the same random sequence (as for ring attention); its outputs and
the gradients of its share (dQ, dK, dV) must equal the whole sequence's, sharded alike: causal and full
attention, multi-head, grouped-query with K/V heads split and K/V heads repeated (fewer than the ranks), and
packed rows (position ids restarting at each document: documents crossing the chunks' and the ranks'
boundaries, documents of one token, odd lengths), whose oracle is naive attention run on each document alone.
The bytes each rank sends are counted against the formula: every all-to-all sends (N - 1)/N of its tensor,
four forward (Q, K, V, O) and four backward (dO, dQ, dK, dV), packed rows or not.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from _precision_helpers import free_port
from lightning_llm.attention.ring import shard_sequence
from lightning_llm.attention.ulysses import check_heads, ulysses_attention
from test_ring_attention import CASES, PACKED_CASES, bound, check_packed_on_one_rank, whole_sequence_oracle

# As test_ring_attention's packed cases, plus odd lengths (one-token documents, documents across ranks) in
# float32 and bfloat16, and the "random" case with 4 K/V heads (split, not repeated, over 2 and 4 ranks).
ULYSSES_PACKED_CASES = [
    *PACKED_CASES,
    (2, 4, 2, 8, 16, True, torch.float32, "odd lengths"),
    (1, 4, 4, 6, 16, True, torch.float32, "random"),
    (2, 4, 2, 8, 16, True, torch.bfloat16, "odd lengths"),
]


class SentBytes:
    """Counts the bytes this rank sends to the others through all_to_all_single (its own part stays)."""

    def __init__(self) -> None:
        self.total = 0
        self._original = dist.all_to_all_single

    def __enter__(self) -> SentBytes:
        def counting(output, input, *args, group=None, **kwargs):
            world = dist.get_world_size(group)
            self.total += input.numel() * input.element_size() * (world - 1) // world
            return self._original(output, input, *args, group=group, **kwargs)

        dist.all_to_all_single = counting
        return self

    def __exit__(self, *exc) -> None:
        dist.all_to_all_single = self._original


def _check_case(rank: int, world: int, batch, heads, kv_heads, chunk, head_dim, causal, dtype,
                packing: str | None = None) -> None:
    seq = 2 * world * chunk
    q, k, v, do, position_ids, o_ref, _, grads_ref = whole_sequence_oracle(
        world, batch, heads, kv_heads, chunk, head_dim, causal, dtype, packing)

    q_l, k_l, v_l = (shard_sequence(x.to(dtype), dim=2).requires_grad_() for x in (q, k, v))
    my_positions = None if position_ids is None else shard_sequence(position_ids, dim=1)
    with SentBytes() as forward:
        o = ulysses_attention(q_l, k_l, v_l, causal=causal, position_ids=my_positions)
    with SentBytes() as backward:
        grads = torch.autograd.grad(o, (q_l, k_l, v_l), shard_sequence(do.to(dtype), dim=2))
    # Q and O, and K and V with their heads repeated up to one per rank where there are fewer: (N - 1)/N of each.
    moved = 2 * q_l.numel() + 2 * k_l.numel() * max(1, world // kv_heads)
    assert forward.total == backward.total == moved * q_l.element_size() * (world - 1) // world, \
        (forward.total, backward.total, moved)

    what = f"rank {rank}/{world}, {'causal' if causal else 'full'}, heads {heads}/{kv_heads}, {dtype}, {packing}"
    group = heads // kv_heads
    checks = [("O", o, o_ref, seq), ("dQ", grads[0], grads_ref[0], seq), ("dK", grads[1], grads_ref[1], seq * group),
              ("dV", grads[2], grads_ref[2], seq * group)]
    for name, got, full, terms in checks:
        expected = shard_sequence(full, dim=2)
        assert got.shape == expected.shape and got.dtype == dtype, name
        error = (got.double() - expected).abs().max().item()
        assert error <= bound(dtype, terms, expected), f"{name} ({what}): max error {error:.3g}"


def _worker(rank: int, world: int, port: int, cases: list) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for case in cases:
            _check_case(rank, world, *case)
        # a group of one rank: the packed call without all-to-alls
        check_packed_on_one_rank(rank, world, ulysses_attention, "odd lengths")
        share = torch.zeros(1, world, 4, 16)
        with pytest.raises(ValueError, match=r"share \[batch or 1, seq\] = \[1 or 1, 4\], got \(1, 8\)"):
            ulysses_attention(share, share, share, position_ids=torch.arange(8)[None])  # the whole row's, not a share
        indivisible = torch.zeros(1, world + 1, 4, 16)  # world + 1 heads: no degree > 1 of the world divides them
        with pytest.raises(ValueError, match=f"{world + 1} query heads and {world + 1} K/V heads"):
            ulysses_attention(indivisible, indivisible, indivisible)
    finally:
        dist.destroy_process_group()


def _spawn(world: int, cases: list) -> None:
    mp.start_processes(_worker, args=(world, free_port(), cases), nprocs=world, start_method="spawn")


def test_ulysses_attention_on_two_ranks_equals_one_process():
    # one launch for dense and packed rows: starting the processes costs more than the cases.
    # (4 heads, 1 K/V head): the K/V head repeated on both ranks
    _spawn(2, CASES + ULYSSES_PACKED_CASES)


@pytest.mark.slow
def test_ulysses_attention_on_four_ranks_equals_one_process():
    # 4 heads over 4 ranks; 2 K/V heads and 1 K/V head repeated (2 heads cannot split 4 ways: refused, below)
    _spawn(4, [case for case in CASES + ULYSSES_PACKED_CASES if case[1] % 4 == 0])


@pytest.mark.slow
def test_ulysses_attention_on_the_triton_kernels_under_the_interpreter(monkeypatch):
    # The children import triton afresh with the interpreter on: the whole-sequence call runs the Triton kernels,
    # dense and varlen (packed rows: the tokens' layout the kernels take and give back).
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _spawn(2, [CASES[2], ULYSSES_PACKED_CASES[4]])


@pytest.mark.parametrize("heads,kv_heads,world", [(6, 2, 4), (4, 4, 3), (8, 6, 4), (12, 8, 3)])
def test_head_counts_the_ranks_cannot_share_are_refused_with_the_degrees_that_fit(heads, kv_heads, world):
    with pytest.raises(ValueError, match=rf"{heads} query heads and {kv_heads} K/V heads.*degrees that fit"):
        check_heads(heads, kv_heads, world)


@pytest.mark.parametrize("heads,kv_heads,world", [(4, 2, 2), (4, 2, 4), (4, 1, 4), (8, 8, 8), (16, 4, 2)])
def test_head_counts_the_ranks_can_share_are_accepted(heads, kv_heads, world):
    check_heads(heads, kv_heads, world)

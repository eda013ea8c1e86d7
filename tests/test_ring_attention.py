"""Ring attention on gloo with 2 and 4 processes against naive attention over the whole sequence in float64.

Every rank holds its load-balanced share of the same random sequence; its outputs, log-sum-exps and the
gradients of its share (dQ, dK, dV) must equal the whole sequence's, sharded alike: causal and full attention,
multi-head and grouped-query, and packed rows (position ids restarting at each document, documents crossing
the chunks' boundaries), whose oracle is naive attention run on each document alone. The bytes each rank sends per pass are counted against the formula
(N - 1) / N of the sequence's K and V forward; the backward adds the dK/dV that travel with them.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from _precision_helpers import free_port
from lightning_llm.attention.reference import naive_attention
from lightning_llm.attention.ring import (
    check_sequence_length,
    load_balanced_indices,
    ring_attention,
    shard_sequence,
    unshard_sequence,
)
from tolerances import reordered_sum_rtol

# batch, heads, kv_heads, chunk (tokens per chunk; a sequence is 2 N chunks), head_dim, causal, dtype[, packing]
CASES = [
    (2, 2, 2, 12, 16, True, torch.float32),
    (1, 4, 2, 9, 16, False, torch.float32),
    (1, 4, 1, 12, 32, True, torch.float32),
    (1, 4, 2, 12, 16, True, torch.bfloat16),
]
# packing: "random" cuts each row into 3 N documents at random points (most cross a chunk boundary, some span
# several chunks); "first chunk" makes the first chunk a document of its own, so that some ranks' queries
# share no document with some K/V blocks (a block that contributes nothing); "odd lengths" lays documents of
# odd lengths 1, 2 chunk + 1, 3, 1, 2 chunk - 1, 5, ... end to end (each row starting further along the
# pattern, the last cut to fit): documents of one token, and long ones crossing chunks and ranks.
PACKED_CASES = [
    (2, 4, 2, 8, 16, True, torch.float32, "random"),
    (1, 2, 2, 6, 16, False, torch.float32, "random"),
    (1, 4, 1, 6, 16, True, torch.float32, "first chunk"),
    (2, 4, 2, 8, 16, True, torch.bfloat16, "random"),
]


def packed_position_ids(batch: int, seq: int, chunk: int, packing: str, g: torch.Generator) -> torch.Tensor:
    """[batch, seq] position ids restarting at 0 at each document."""
    rows = []
    for row in range(batch):
        if packing == "first chunk":
            cuts = [chunk]
        elif packing == "odd lengths":
            pattern = [1, 2 * chunk + 1, 3, 1, 2 * chunk - 1, 5]
            cuts = [0]
            while cuts[-1] < seq:
                cuts.append(cuts[-1] + pattern[(row + len(cuts)) % len(pattern)])
            cuts = cuts[1:-1]
        else:
            cuts = sorted((torch.randperm(seq - 1, generator=g)[:3 * seq // (2 * chunk)] + 1).tolist())
        lengths = [b - a for a, b in zip([0, *cuts], [*cuts, seq])]
        rows.append(torch.cat([torch.arange(n) for n in lengths]))
    return torch.stack(rows)


def per_document_attention(q, k, v, position_ids, causal):
    """naive_attention on every document of every row alone (an independent oracle for packed rows)."""
    outs, lses = [], []
    for row, positions in enumerate(position_ids):
        starts = [i for i in range(len(positions)) if positions[i] == 0] + [len(positions)]
        parts = [naive_attention(q[row:row + 1, :, a:b], k[row:row + 1, :, a:b], v[row:row + 1, :, a:b],
                                 causal=causal) for a, b in zip(starts[:-1], starts[1:])]
        outs.append(torch.cat([o for o, _ in parts], dim=2))
        lses.append(torch.cat([lse for _, lse in parts], dim=2))
    return torch.cat(outs), torch.cat(lses)


def bound(dtype: torch.dtype, terms: int, expected: torch.Tensor) -> float:
    # As tests/test_attention_lse.py: a sum of `terms` products whose magnitudes sum to a few times
    # max(1, |expected|). bfloat16: each rank's block output is rounded to bfloat16 (8 significant bits) before
    # the float32 merge, and the inputs are bfloat16 roundings of the float64 ones: a few units of 2^-8.
    if dtype == torch.bfloat16:
        return 4 * 2.0**-8 * max(1.0, expected.abs().max().item())
    return 4 * reordered_sum_rtol(dtype, terms) * max(1.0, expected.abs().max().item())


class SentBytes:
    """Counts the bytes this rank sends through batch_isend_irecv, the ring's only communication."""

    def __init__(self) -> None:
        self.total = 0
        self._original = dist.batch_isend_irecv

    def __enter__(self) -> SentBytes:
        def counting(ops):
            self.total += sum(op.tensor.numel() * op.tensor.element_size() for op in ops if op.op is dist.isend)
            return self._original(ops)

        dist.batch_isend_irecv = counting
        return self

    def __exit__(self, *exc) -> None:
        dist.batch_isend_irecv = self._original


def whole_sequence_oracle(world: int, batch, heads, kv_heads, chunk, head_dim, causal, dtype,
                          packing: str | None = None):
    """A case's random whole-sequence q, k, v and output gradient dO (rounded to `dtype`, held in float64, as
    the split attention sees them), its position ids (None unpacked), and the float64 oracle: O, lse and
    (dQ, dK, dV) of naive attention, on each document alone for packed rows."""
    seq = 2 * world * chunk
    g = torch.Generator().manual_seed(seq + heads)
    q = torch.randn(batch, heads, seq, head_dim, generator=g, dtype=torch.float64)
    k, v = (torch.randn(batch, kv_heads, seq, head_dim, generator=g, dtype=torch.float64) for _ in range(2))
    do = torch.randn(q.shape, generator=g, dtype=torch.float64)
    q, k, v, do = (x.to(dtype).double() for x in (q, k, v, do))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    if packing is None:
        position_ids = None
        o_ref, lse_ref = naive_attention(*leaves, causal=causal)
    else:
        position_ids = packed_position_ids(batch, seq, chunk, packing, g)
        o_ref, lse_ref = per_document_attention(*leaves, position_ids, causal)
    return q, k, v, do, position_ids, o_ref, lse_ref, torch.autograd.grad(o_ref, leaves, do)


def _check_case(rank: int, world: int, batch, heads, kv_heads, chunk, head_dim, causal, dtype,
                packing: str | None = None) -> None:
    seq = 2 * world * chunk
    q, k, v, do, position_ids, o_ref, lse_ref, grads_ref = whole_sequence_oracle(
        world, batch, heads, kv_heads, chunk, head_dim, causal, dtype, packing)

    q_l, k_l, v_l = (shard_sequence(x.to(dtype), dim=2).requires_grad_() for x in (q, k, v))
    my_positions = None if position_ids is None else shard_sequence(position_ids, dim=1)
    with SentBytes() as forward:
        o, lse = ring_attention(q_l, k_l, v_l, causal=causal, return_lse=True, position_ids=my_positions)
    kv_bytes = 2 * k_l.numel() * k_l.element_size()  # this rank's K and V: 1/N of the sequence's
    assert forward.total == (world - 1) * kv_bytes, (forward.total, kv_bytes)
    with SentBytes() as backward:
        grads = torch.autograd.grad(o, (q_l, k_l, v_l), shard_sequence(do.to(dtype), dim=2))
    # K/V once more (N - 1 hops), and their float32 gradients a full turn (N hops) home.
    assert backward.total == (world - 1) * kv_bytes + world * 2 * k_l.numel() * 4

    what = f"rank {rank}/{world}, {'causal' if causal else 'full'}, heads {heads}/{kv_heads}, {dtype}, {packing}"
    group = heads // kv_heads
    checks = [("O", o, o_ref, seq), ("lse", lse, lse_ref, seq), ("dQ", grads[0], grads_ref[0], seq),
              ("dK", grads[1], grads_ref[1], seq * group), ("dV", grads[2], grads_ref[2], seq * group)]
    for name, got, full, terms in checks:
        expected = shard_sequence(full, dim=2)
        assert got.shape == expected.shape and got.dtype == (torch.float32 if name == "lse" else dtype), name
        error = (got.double() - expected).abs().max().item()
        assert error <= bound(dtype, terms, expected), f"{name} ({what}): max error {error:.3g}"
    assert torch.equal(unshard_sequence(shard_sequence(q, dim=2), dim=2), q)


def _check_autocast(world: int) -> None:
    # Under bf16 autocast a Llama hands attention float32 q and k (rotary tables are float32) and a bf16 v: the
    # ring casts all three first, as SDPA does, and then computes exactly what it computes on bf16 inputs.
    g = torch.Generator().manual_seed(world)
    q, k = torch.randn(1, 4, 8 * world, 16, generator=g), torch.randn(1, 2, 8 * world, 16, generator=g)
    v = torch.randn(1, 2, 8 * world, 16, generator=g).bfloat16()
    leaves = [shard_sequence(x, dim=2).requires_grad_() for x in (q, k, v)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o = ring_attention(*leaves, causal=True)
    expected = ring_attention(*(x.detach().bfloat16() for x in leaves), causal=True)
    assert o.dtype == torch.bfloat16 and torch.equal(o, expected)
    grads = torch.autograd.grad(o, leaves, torch.ones_like(o))
    assert [g.dtype for g in grads] == [torch.float32, torch.float32, torch.bfloat16]
    assert all(g.isfinite().all() and g.abs().sum() > 0 for g in grads)


def check_packed_on_one_rank(rank: int, world: int, attention=ring_attention, packing: str = "random") -> None:
    # A group of one rank holds the whole rows: the packed path without communication, on this rank's own group.
    groups = [dist.new_group([r]) for r in range(world)]  # (every rank creates every group)
    g = torch.Generator().manual_seed(7)
    q, k, v = torch.randn(2, 4, 24, 16, generator=g), torch.randn(2, 2, 24, 16, generator=g), torch.randn(2, 2, 24, 16, generator=g)
    position_ids = packed_position_ids(2, 24, 6, packing, g)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o = attention(*leaves, groups[rank], causal=True, position_ids=position_ids)
    do = torch.randn(o.shape, generator=g)
    grads = torch.autograd.grad(o, leaves, do)
    references = [x.double().requires_grad_() for x in (q, k, v)]
    expected, _ = per_document_attention(*references, position_ids, True)
    expected_grads = torch.autograd.grad(expected, references, do.double())
    # dK and dV sum over the 2 query heads that share a K/V head
    for got, want, terms in zip((o, *grads), (expected, *expected_grads), (24, 24, 48, 48)):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=bound(torch.float32, terms, want))


def _worker(rank: int, world: int, port: int, cases: list) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for case in cases:
            _check_case(rank, world, *case)
        check_packed_on_one_rank(rank, world)
        _check_autocast(world)
        odd = torch.zeros(1, 2, 2 * world + 1, 16)
        with pytest.raises(ValueError, match=f"odd length {2 * world + 1}"):
            ring_attention(odd, odd, odd, causal=True)
    finally:
        dist.destroy_process_group()


def _spawn(world: int, cases: list) -> None:
    mp.start_processes(_worker, args=(world, free_port(), cases), nprocs=world, start_method="spawn")


def test_ring_attention_on_two_ranks_equals_one_process():
    # one launch for dense and packed rows: starting the processes costs more than the cases
    _spawn(2, CASES + PACKED_CASES)


@pytest.mark.slow
def test_ring_attention_on_four_ranks_equals_one_process():
    _spawn(4, CASES[:3] + PACKED_CASES[:3])


@pytest.mark.slow
def test_ring_attention_on_the_triton_kernels_under_the_interpreter(monkeypatch):
    # The children import triton afresh with the interpreter on: the ring runs the Triton kernels' forward
    # and their backward from the merged log-sum-exp.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _spawn(2, [CASES[2], PACKED_CASES[0]])


def test_load_balanced_chunks_cover_the_sequence_once_with_equal_causal_work():
    world, seq = 4, 32
    shares = [load_balanced_indices(seq, world, rank) for rank in range(world)]
    assert torch.equal(torch.sort(torch.cat(shares)).values, torch.arange(seq))
    # A causal query at position p sees p + 1 keys: every rank's queries see as many keys in total.
    work = {int((share + 1).sum()) for share in shares}
    assert len(work) == 1, work


@pytest.mark.parametrize("seq,world", [(30, 2), (12, 4)])
def test_a_sequence_not_divisible_into_two_chunks_per_rank_is_refused(seq, world):
    with pytest.raises(ValueError, match=f"sequence length {seq} is not a multiple of {2 * world}"):
        check_sequence_length(seq, world)


"""Context parallelism 1, 2, 4 in both modes (ring, all-to-all): attention activation bytes per rank, bytes each
rank sends per pass against the formula, and the time of one attention layer's forward and backward.

    OMP_NUM_THREADS=1 python benchmarks/context_parallel.py --seq 2048 --rounds 3

One causal grouped-query attention layer (`--heads` query heads, `--kv-heads` K/V heads, `--head-dim`) over one
sequence of `--seq` tokens, split over N gloo processes (N = 1 is `flash_attention` on the whole sequence,
the baseline). Activation bytes: what autograd saves for the backward pass on each rank, counted with
saved-tensor hooks; the expectation is 1/N of N = 1's (all-to-all: more where K/V heads are repeated up to N).
Sent bytes: every tensor a rank hands to `batch_isend_irecv` (ring) or `all_to_all_single` (the (N - 1)/N of it
that leaves the rank), against each mode's formula. Ring: forward, N - 1 hops of the rank's K and V (each rank
sends (N - 1)/N of the sequence's K and V); backward, those N - 1 hops again plus N hops of their float32 dK/dV.
All-to-all: forward, (N - 1)/N of the rank's Q, K, V and O (K and V with their heads repeated up to N where
there are fewer); backward, the same of dO, dQ, dK, dV. The variants take turns for `--rounds` rounds
(benchmarks/interleave.py); times are the median over rounds of the slowest rank's median over `--steps` steps.
On a machine with fewer cores than N the processes share cores, so the times there say little; bytes do not
depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from interleave import interleaved, summary, write_result

from lightning_llm.attention import flash_attention
from lightning_llm.attention.ring import ring_attention, shard_sequence
from lightning_llm.attention.ulysses import ulysses_attention

MODES = ("ring", "all_to_all")


class _Sent:
    """Adds to `counter[0]` the bytes this rank sends: the ring's `batch_isend_irecv` sends, and the (N - 1)/N of
    each `all_to_all_single` input that goes to other ranks (each mode's only communication)."""

    def __init__(self, counter: list[int]) -> None:
        self.counter, self.originals = counter, (dist.batch_isend_irecv, dist.all_to_all_single)

    def __enter__(self) -> None:
        batch_isend_irecv, all_to_all_single = self.originals
        world = dist.get_world_size()

        def counting_p2p(ops: list) -> list:
            self.counter[0] += sum(op.tensor.numel() * op.tensor.element_size() for op in ops if op.op is dist.isend)
            return batch_isend_irecv(ops)

        def counting_all_to_all(output, input, *args, **kwargs):
            self.counter[0] += input.numel() * input.element_size() * (world - 1) // world
            return all_to_all_single(output, input, *args, **kwargs)

        dist.batch_isend_irecv, dist.all_to_all_single = counting_p2p, counting_all_to_all

    def __exit__(self, *exc) -> None:
        dist.batch_isend_irecv, dist.all_to_all_single = self.originals


def _formula(mode: str, world: int, q: torch.Tensor, k: torch.Tensor) -> tuple[int, int]:
    """Bytes one rank sends forward and backward, from the shapes of its shares of Q and K."""
    hops = world - 1
    if mode == "ring":
        kv_bytes, dkv_bytes = 2 * k.numel() * k.element_size(), 2 * k.numel() * 4  # dK/dV travel in float32
        return hops * kv_bytes, hops * kv_bytes + (world * dkv_bytes if hops else 0)
    repeated_kv = 2 * k.numel() * max(1, world // k.shape[1])
    each_pass = (2 * q.numel() + repeated_kv) * q.element_size() * hops // world  # Q and O, K and V
    return each_pass, each_pass


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, mode: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)
    shape_q, shape_kv = (1, args.heads, args.seq, args.head_dim), (1, args.kv_heads, args.seq, args.head_dim)
    q, k, v = (torch.randn(s, generator=g) for s in (shape_q, shape_kv, shape_kv))
    if world > 1:
        q, k, v = (shard_sequence(x, dim=2) for x in (q, k, v))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    # N = 1: the same kernels through flash_attention's own autograd function (return_lse selects it on the CPU too)
    split = {"ring": ring_attention, "all_to_all": ulysses_attention}[mode]
    attention = (lambda: split(q, k, v, causal=True)) if world > 1 else \
        (lambda: flash_attention(q, k, v, return_lse=True)[0])
    sent = {"forward": [0], "backward": [0]}
    saved, times = [0], []
    for step in range(args.steps + 1):
        dist.barrier()
        start = time.perf_counter()

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved[0] += t.numel() * t.element_size() if step == 0 else 0
            return t

        with _Sent(sent["forward"] if step == 0 else [0]), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            o = attention()
        with _Sent(sent["backward"] if step == 0 else [0]):
            o.backward(torch.ones_like(o))
        if step > 0:  # the first step is warm-up (and the one counted)
            times.append(time.perf_counter() - start)
    formula_forward, formula_backward = _formula(mode, world, q, k)
    result = dict(rank=rank, saved_bytes=saved[0], sent_forward=sent["forward"][0], sent_backward=sent["backward"][0],
                  formula_forward=formula_forward, formula_backward=formula_backward, seconds=statistics.median(times))
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def run(world: int, mode: str, args: argparse.Namespace, results: dict[str, list[list[dict]]]) -> float:
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(world, _free_port(), args, mode, out), nprocs=world, join=True)
        ranks = [torch.load(Path(out) / f"rank{r}.pt") for r in range(world)]
    results.setdefault(_name(world, mode), []).append(ranks)
    return max(r["seconds"] for r in ranks)


def _name(world: int, mode: str) -> str:
    return "cp=1" if world == 1 else f"{mode} cp={world}"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--degrees", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "context_parallel.json"))
    args = parser.parse_args()
    results: dict[str, list[list[dict]]] = {}
    variants = {_name(n, mode): (lambda n=n, mode=mode: run(n, mode, args, results))
                for n in args.degrees for mode in (args.modes if n > 1 else args.modes[:1])}
    samples = interleaved(variants, args.rounds)
    baseline = next(iter(variants))
    rows = summary(samples, baseline=baseline)
    base_saved = results[baseline][0][0]["saved_bytes"]
    print(f"\none causal GQA attention layer: seq {args.seq}, heads {args.heads}/{args.kv_heads}, head_dim "
          f"{args.head_dim}, float32, gloo; {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"{'run':>15} {'saved MiB/rank':>15} {'x cp=1':>7} {'sent fwd MiB':>13} {'formula':>8} {'sent bwd MiB':>13} "
          f"{'formula':>8} {'fwd+bwd s (median, range)':>28}")
    for row in rows:
        rank0 = results[row["run"]][0][0]
        row.update({key: rank0[key] for key in ("saved_bytes", "sent_forward", "sent_backward", "formula_forward",
                                                 "formula_backward")})
        mib = lambda b: b / 2**20  # noqa: E731
        print(f"{row['run']:>15} {mib(rank0['saved_bytes']):>15.2f} {rank0['saved_bytes'] / base_saved:>7.3f} "
              f"{mib(rank0['sent_forward']):>13.2f} {mib(rank0['formula_forward']):>8.2f} "
              f"{mib(rank0['sent_backward']):>13.2f} {mib(rank0['formula_backward']):>8.2f} "
              f"{row['median']:>10.3f} ({row['min']:.3f}-{row['max']:.3f})")
    write_result(args.out, {"config": vars(args), "machine": f"{platform.machine()}, {os.cpu_count()} cores", "rows": rows})


if __name__ == "__main__":
    main()

"""Context parallelism 1, 2, 4 in both modes (ring, all-to-all): attention activation bytes per rank, bytes each
rank sends per pass against the formula, the time of one attention layer's forward and backward, and the longest
sequence one training step of a model fits in a fixed budget of activation bytes per rank (each mode).

    OMP_NUM_THREADS=1 python benchmarks/context_parallel.py --seq 2048 --rounds 3 --budget-mib 64
    OMP_NUM_THREADS=1 python benchmarks/context_parallel.py --quick     # small: seq 256, one round, 4 MiB budget
    OMP_NUM_THREADS=1 python benchmarks/context_parallel.py --degrees 1 2 --mean-length 110   # packed rows

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

Packed rows (`--mean-length L`): the sequence is cut into documents of random lengths (uniform from 1 to 2 L - 1,
as benchmarks/packed_attention.py draws them; the same on every rank) with position ids restarting at each, so a
query sees only its own document: N = 1 is `flash_attention` with the documents' `cu_seqlens`, and both modes
take the rank's share of the position ids. Each mode then also all-gathers the position ids once per call (one
int64 per token, forward only; counted, each rank sending its share to the N - 1 others).

Longest sequence at a budget: the `--model` preset (a Hugging Face Llama) takes one training step (forward,
next-token loss, backward) through the strategy's own pieces: `use_ring_attention` or `use_all_to_all_attention`
(each of `--modes`), `shard_batch` (the rank's load-balanced chunks and their position ids; packed rows with
`--mean-length`) and `sequence_split`; N = 1 runs the same code on one process (ring attention over one rank is
`flash_attention`). Its activation bytes per rank are what autograd saves for
the backward pass (saved-tensor hooks; each storage once, parameters not counted). From `--start-seq` tokens
the sequence doubles until a step saves more than `--budget-mib` MiB on some rank; the table gives the bytes
per rank at every length and the longest length within the budget per degree. Bytes, not time: no rounds.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from interleave import interleaved, summary, write_result

from packed_attention import block_lengths

from lightning_llm.attention import flash_attention
from lightning_llm.attention.flash import as_tokens, packed_cu_seqlens
from lightning_llm.attention.ring import ring_attention, shard_sequence
from lightning_llm.attention.ulysses import ulysses_attention
from lightning_llm.models import build_model
from lightning_llm.strategies.context import (
    sequence_split,
    shard_batch,
    use_all_to_all_attention,
    use_ring_attention,
)

MODES = ("ring", "all_to_all")
VOCAB = 512


def position_ids(seq: int, mean_length: int) -> torch.Tensor:
    """[1, seq] position ids: one document, or (`mean_length` > 0) documents of random lengths, restarting at 0
    at each (a fixed seed: the same rows on every rank and in every run)."""
    if not mean_length:
        return torch.arange(seq)[None]
    lengths = block_lengths(seq, mean_length, random.Random(0))
    return torch.cat([torch.arange(n) for n in lengths])[None]


class _Sent:
    """Adds to `counter[0]` the bytes this rank sends: the ring's `batch_isend_irecv` sends, the (N - 1)/N of each
    `all_to_all_single` input that goes to other ranks, and each `all_gather` input once per other rank (the
    position ids of packed rows): each mode's only communication."""

    def __init__(self, counter: list[int]) -> None:
        self.counter = counter
        self.originals = (dist.batch_isend_irecv, dist.all_to_all_single, dist.all_gather)

    def __enter__(self) -> None:
        batch_isend_irecv, all_to_all_single, all_gather = self.originals
        world = dist.get_world_size()

        def counting_p2p(ops: list) -> list:
            self.counter[0] += sum(op.tensor.numel() * op.tensor.element_size() for op in ops if op.op is dist.isend)
            return batch_isend_irecv(ops)

        def counting_all_to_all(output, input, *args, **kwargs):
            self.counter[0] += input.numel() * input.element_size() * (world - 1) // world
            return all_to_all_single(output, input, *args, **kwargs)

        def counting_all_gather(outputs, input, *args, **kwargs):
            self.counter[0] += input.numel() * input.element_size() * (world - 1)
            return all_gather(outputs, input, *args, **kwargs)

        dist.batch_isend_irecv, dist.all_to_all_single, dist.all_gather = (counting_p2p, counting_all_to_all,
                                                                           counting_all_gather)

    def __exit__(self, *exc) -> None:
        dist.batch_isend_irecv, dist.all_to_all_single, dist.all_gather = self.originals


def _formula(mode: str, world: int, q: torch.Tensor, k: torch.Tensor, packed: bool) -> tuple[int, int]:
    """Bytes one rank sends forward and backward, from the shapes of its shares of Q and K; packed rows add the
    all-gather of the position ids (int64, one per token of the rank's share, to each other rank) forward."""
    hops = world - 1
    positions = hops * q.shape[0] * q.shape[2] * 8 if packed else 0
    if mode == "ring":
        kv_bytes, dkv_bytes = 2 * k.numel() * k.element_size(), 2 * k.numel() * 4  # dK/dV travel in float32
        return hops * kv_bytes + positions, hops * kv_bytes + (world * dkv_bytes if hops else 0)
    repeated_kv = 2 * k.numel() * max(1, world // k.shape[1])
    each_pass = (2 * q.numel() + repeated_kv) * q.element_size() * hops // world  # Q and O, K and V
    return each_pass + positions, each_pass


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, mode: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)
    shape_q, shape_kv = (1, args.heads, args.seq, args.head_dim), (1, args.kv_heads, args.seq, args.head_dim)
    q, k, v = (torch.randn(s, generator=g) for s in (shape_q, shape_kv, shape_kv))
    positions = position_ids(args.seq, args.mean_length)
    cu_seqlens = packed_cu_seqlens(positions, 1)
    if world > 1:
        q, k, v = (shard_sequence(x, dim=2) for x in (q, k, v))
        positions = shard_sequence(positions, dim=1)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    # N = 1: the same kernels through flash_attention's own autograd function (return_lse selects it on the CPU
    # too); packed rows as one varlen call over the documents
    split = {"ring": ring_attention, "all_to_all": ulysses_attention}[mode]

    def attention() -> torch.Tensor:
        if world > 1:
            return split(q, k, v, causal=True, position_ids=None if cu_seqlens is None else positions)
        if cu_seqlens is None:
            return flash_attention(q, k, v, return_lse=True)[0]
        return flash_attention(as_tokens(q), as_tokens(k), as_tokens(v), cu_seqlens=cu_seqlens, return_lse=True)[0]
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
    formula_forward, formula_backward = _formula(mode, world, q, k, packed=cu_seqlens is not None)
    result = dict(rank=rank, saved_bytes=saved[0], sent_forward=sent["forward"][0], sent_backward=sent["backward"][0],
                  formula_forward=formula_forward, formula_backward=formula_backward, seconds=statistics.median(times))
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def saved_activation_bytes(step, parameters: list[torch.Tensor]) -> int:
    """The bytes autograd saves for the backward pass while `step()` runs its forward: every saved tensor's
    storage counted once, the parameters' storages (weights saved for their gradients) not at all."""
    weights = {p.untyped_storage().data_ptr() for p in parameters}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    return sum(storages.values())


def _longest_worker(rank: int, world: int, port: int, args: argparse.Namespace, mode: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    group = dist.group.WORLD
    torch.manual_seed(0)
    model = build_model(args.model, vocab_size=VOCAB)
    if mode == "ring":
        use_ring_attention([model])
    else:
        use_all_to_all_attention([model], world)
    parameters = list(model.parameters())
    g = torch.Generator().manual_seed(0)
    probes, seq = [], args.start_seq
    while seq <= args.max_seq:
        tokens = torch.randint(0, VOCAB, (1, seq + 1), generator=g)
        batch = shard_batch({"input_ids": tokens[:, :-1], "targets": tokens[:, 1:],
                             "position_ids": position_ids(seq, args.mean_length)}, group)

        def step() -> torch.Tensor:
            with sequence_split(group):
                logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                               use_cache=False).logits
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), reduction="sum")

        model.zero_grad(set_to_none=True)
        with sequence_split(group):  # (backward runs inside it too, as the strategy's does)
            saved = torch.tensor(saved_activation_bytes(step, parameters))
        dist.all_reduce(saved, op=dist.ReduceOp.MAX)  # the rank that holds the most decides
        probes.append({"seq": seq, "saved_bytes": int(saved)})
        if int(saved) > args.budget_mib * 2**20:
            break
        seq *= 2
    if rank == 0:
        torch.save(probes, Path(out) / "probes.pt")
    dist.destroy_process_group()


def longest_sequence(world: int, mode: str, args: argparse.Namespace) -> list[dict]:
    """Every probed length's largest activation bytes per rank at context parallelism `world` in `mode`."""
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_longest_worker, args=(world, _free_port(), args, mode, out), nprocs=world, join=True)
        return torch.load(Path(out) / "probes.pt")


def report_longest(args: argparse.Namespace) -> dict:
    budget = args.budget_mib * 2**20
    runs = [(n, mode) for n in args.degrees for mode in (args.modes if n > 1 else args.modes[:1])]
    probes = {_name(n, mode): longest_sequence(n, mode, args) for n, mode in runs}
    longest = {name: max((p["seq"] for p in found if p["saved_bytes"] <= budget), default=None)
               for name, found in probes.items()}
    baseline = next(iter(probes))
    base = {p["seq"]: p["saved_bytes"] for p in probes[baseline]}
    packing = f"documents of mean length {args.mean_length}" if args.mean_length else "one document"
    print(f"\none training step of {args.model!r} (forward, loss, backward), float32, gloo, {packing}: activation "
          f"MiB per rank (saved for backward), budget {args.budget_mib} MiB")
    print(f"{'seq':>8} " + " ".join(f"{name:>15} {'x ' + baseline:>7}" for name in probes))
    for seq in sorted({p["seq"] for found in probes.values() for p in found}):
        cells = []
        for name in probes:
            saved = {p["seq"]: p["saved_bytes"] for p in probes[name]}.get(seq)
            ratio = f"{saved / base[seq]:.3f}" if saved is not None and seq in base else "-"
            cells.append(f"{saved / 2**20:>15.2f} {ratio:>7}" if saved is not None else f"{'-':>15} {'-':>7}")
        print(f"{seq:>8} " + " ".join(cells))
    print("longest sequence within the budget: " + ", ".join(f"{name}: {n}" for name, n in longest.items()))
    return {"budget_mib": args.budget_mib, "model": args.model, "mean_length": args.mean_length, "probes": probes,
            "longest": longest}


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
    parser.add_argument("--mean-length", type=int, default=0,
                        help="packed rows: documents of random lengths averaging this (0: one document per row)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "context_parallel.json"))
    parser.add_argument("--model", default="tiny", help="preset for the longest-sequence search")
    parser.add_argument("--budget-mib", type=float, default=64.0, help="activation MiB per rank for one step")
    parser.add_argument("--start-seq", type=int, default=256)
    parser.add_argument("--max-seq", type=int, default=2**17, help="stop doubling here even within the budget")
    parser.add_argument("--quick", action="store_true", help="seq 256, one step and round, a 4 MiB budget")
    args = parser.parse_args()
    if args.quick:
        args.seq, args.steps, args.rounds, args.budget_mib, args.start_seq = 256, 1, 1, 4.0, 128
    results: dict[str, list[list[dict]]] = {}
    variants = {_name(n, mode): (lambda n=n, mode=mode: run(n, mode, args, results))
                for n in args.degrees for mode in (args.modes if n > 1 else args.modes[:1])}
    samples = interleaved(variants, args.rounds)
    baseline = next(iter(variants))
    rows = summary(samples, baseline=baseline)
    base_saved = results[baseline][0][0]["saved_bytes"]
    packing = f"documents of mean length {args.mean_length}" if args.mean_length else "one document"
    print(f"\none causal GQA attention layer: seq {args.seq} ({packing}), heads {args.heads}/{args.kv_heads}, "
          f"head_dim {args.head_dim}, float32, gloo; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores")
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
    longest = report_longest(args)
    write_result(args.out, {"config": vars(args), "machine": f"{platform.machine()}, {os.cpu_count()} cores", "rows": rows,
                            "longest_sequence": longest})


if __name__ == "__main__":
    main()

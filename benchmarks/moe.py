"""Mixture of experts: expert parallelism's throughput, memory and all-to-all volume; router balance.

    python benchmarks/moe.py [--model tiny-moe] [--rows 8] [--seq 128] [--steps 5] [--rounds 3]

- tokens/s of a forward + backward of the global batch at ep=1 (one process) and ep=2 (two processes,
  each half the batch and half the experts, `lightning_llm.strategies.expert`), interleaved. `--clock cpu`
  times each rank's step by its process CPU time on one thread (the rate if every rank had a core of its
  own, waiting left out): on a machine other jobs share, wall-clock rounds swing several-fold, CPU time
  barely moves; the CPU clock also gives the total CPU-seconds per token (the all-to-all's cost in work);
- each rank's expert bytes at each degree;
- the all-to-all volume per layer, measured (rows sent to another rank x hidden x bytes, each way)
  against the formula tokens x k x hidden x bytes x (N-1)/N (uniform routing);
- expert load balance, max/mean pairs per expert (1.0 = even), after a short training run of one process
  without and with the load-balancing loss.

Results go to benchmarks/results/moe.json (atomically).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.multiprocessing as mp

from interleave import interleaved, summary, write_result
from lightning_llm.models import build_model
from lightning_llm.moe import dispatches
from lightning_llm.modules.router import expert_token_counts, load_balancing_loss
from lightning_llm.strategies.expert import plan_experts, shard_experts

VOCAB = 4096
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _batch(rows: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, seq + 1), generator=torch.Generator().manual_seed(seed))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1 if args.clock == "cpu" else max(1, (os.cpu_count() or 2) // world))
    now = CLOCKS[args.clock]
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = build_model(args.model, vocab_size=VOCAB)
    mesh = init_device_mesh("cpu", (world,))
    shard_experts(list(model.modules()), plan_experts(model, world), mesh)
    tokens = _batch(args.rows, args.seq).chunk(world)[rank]
    expert_bytes = sum(p.to_local().nbytes for d in dispatches(model) for p in d.experts.parameters(recurse=False))
    times, sent = [], []
    for step in range(args.steps + 1):  # the first step warms up
        start = now()
        logits = model(input_ids=tokens[:, :-1]).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        if args.clock == "wall":
            dist.barrier()
        if step:
            times.append(now() - start)
        sent.append([d.sent_rows for d in dispatches(model)])
    result = {"seconds": statistics.median(times), "expert_bytes": expert_bytes, "sent_rows": sent[-1],
              "local_tokens": tokens[:, :-1].numel()}
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def run_ep(world: int, args: argparse.Namespace, results: list[dict]) -> float:
    """One measurement at ep=world: global tokens per second of forward + backward."""
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(world, _free_port(), args, out), nprocs=world, join=True)
        ranks = [torch.load(Path(out) / f"rank{r}.pt") for r in range(world)]
    results.append({"world": world, "ranks": ranks, "cpu_seconds_per_token": sum(r["seconds"] for r in ranks) / (args.rows * args.seq)})
    return args.rows * args.seq / max(r["seconds"] for r in ranks)


def balance(args: argparse.Namespace, aux_coef: float) -> float:
    """max/mean pairs per expert over the last steps of a short one-process run (mean over layers)."""
    torch.manual_seed(0)
    model = build_model(args.model, vocab_size=VOCAB)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    top_k, ratios = model.config.num_experts_per_tok, []
    for step in range(args.balance_steps):
        tokens = _batch(args.rows, args.seq, seed=step)
        outputs = model(input_ids=tokens[:, :-1], output_router_logits=True)
        loss = torch.nn.functional.cross_entropy(outputs.logits.flatten(0, 1), tokens[:, 1:].flatten())
        (loss + aux_coef * load_balancing_loss(outputs.router_logits, top_k)).backward()
        optimizer.step()
        optimizer.zero_grad()
        if step >= args.balance_steps - 5:
            counts = expert_token_counts(outputs.router_logits, top_k).float()
            ratios.append((counts.max(dim=1).values / counts.mean(dim=1)).mean().item())
    return statistics.mean(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-moe")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--balance-steps", type=int, default=40)
    parser.add_argument("--clock", default="wall", choices=sorted(CLOCKS),
                        help="wall: barrier-to-barrier wall time; cpu: each rank's CPU time on one thread")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "moe.json"))
    args = parser.parse_args()

    results: list[dict] = []
    samples = interleaved({"ep1": partial(run_ep, 1, args, results), "ep2": partial(run_ep, 2, args, results)},
                          args.rounds)
    rows = summary(samples, baseline="ep1")
    with torch.device("meta"):
        model = build_model(args.model, vocab_size=VOCAB)
    hidden, top_k = model.config.hidden_size, model.config.num_experts_per_tok
    ep2 = [r for r in results if r["world"] == 2][-1]["ranks"]
    volume = []
    for rank, r in enumerate(ep2):
        formula = r["local_tokens"] * top_k * hidden * 4 * (2 - 1) / 2
        volume.append({"rank": rank, "measured_bytes_per_layer": [n * hidden * 4 for n in r["sent_rows"]],
                       "formula_bytes": formula})
    expert_bytes = {f"ep{r['world']}": [x["expert_bytes"] for x in r["ranks"]] for r in results[:2]}
    balance_rows = {"without_aux": balance(args, 0.0), "with_aux_0.01": balance(args, 0.01)}
    print(f"{'run':6} {'tokens/s (median)':>18} {'min':>10} {'max':>10} {'ratio':>6}")
    for row in rows:
        print(f"{row['run']:6} {row['median']:18,.0f} {row['min']:10,.0f} {row['max']:10,.0f} {row['ratio_to_ep1']:6.2f}")
    work = {f"ep{w}": statistics.median(r["cpu_seconds_per_token"] for r in results if r["world"] == w) for w in (1, 2)}
    if args.clock == "cpu":
        print("CPU microseconds per token, all ranks together (median):", {k: round(v * 1e6, 1) for k, v in work.items()})
    print("expert bytes per rank:", expert_bytes)
    for v in volume:
        print(f"rank {v['rank']}: all-to-all bytes per layer each way {v['measured_bytes_per_layer']} "
              f"(formula {v['formula_bytes']:,.0f})")
    print("load balance max/mean:", {k: round(v, 3) for k, v in balance_rows.items()})
    write_result(args.out, {"args": vars(args), "throughput": rows, "clock": args.clock,
                            "seconds_per_token_all_ranks": work if args.clock == "cpu" else None, "expert_bytes_per_rank": expert_bytes,
                            "all_to_all": volume, "balance_max_over_mean": balance_rows})


if __name__ == "__main__":
    main()

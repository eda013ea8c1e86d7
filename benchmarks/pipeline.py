"""The pipeline bubble, measured: step time of PipelineStrategy on 2 gloo ranks for GPipe and 1F1B over
the number of micro-batches, beside the same model and batch trained on one process in the same run.

    python benchmarks/pipeline.py --model llama-5m --microbatches 2 4 8 --steps 6 --rounds 3

The one-process run and each pipeline configuration (a fresh pair of ranks each) take turns for
`--rounds` rounds (benchmarks/interleave.py); step times are medians with their range, and the
bubble is computed from the medians.

With p stages each doing 1/p of the work, a perfect pipeline takes T1/p per step (T1: one process).
The measured bubble is 1 - (T1/p) / Tp; the schedule's ideal is (p-1)/(m+p-1). Point-to-point
transfers and the 2-core machine's own contention add to the measured figure; on CPU both ranks share
the cores, so read the trend over m, not the absolute values.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import tempfile
import time
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, Dataset

from interleave import interleaved, summary, write_result

from lightning_llm.modules.pretrain import PretrainModule
from lightning_llm.strategies.parallel import PipelineStrategy


class RandomBlocks(Dataset):
    def __init__(self, n: int, seq: int, vocab: int) -> None:
        self.x = torch.randint(0, vocab, (n, seq + 1), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i, :-1], "targets": self.x[i, 1:]}


class Clock(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter())


def step_seconds(args, strategy, devices: int) -> float:
    torch.manual_seed(0)
    clock = Clock()
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=args.steps + 2,
                         use_distributed_sampler=False, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[clock])
    data = RandomBlocks(args.batch_size * (args.steps + 2), args.block_size, args.vocab_size)
    module = PretrainModule(args.model, vocab_size=args.vocab_size, warmup_steps=0, max_steps=args.steps + 2)
    trainer.fit(module, DataLoader(data, batch_size=args.batch_size))
    timed = clock.times[2:]  # two untimed warm-up steps
    return (timed[-1] - timed[0]) / (len(timed) - 1)


def worker(rank: int, args, port: int, schedule: str, microbatches: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0",
                      LOCAL_RANK=str(rank), GLOBAL_RANK=str(rank))
    torch.set_num_threads(1)
    seconds = step_seconds(args, PipelineStrategy(stages=2, microbatches=microbatches, schedule=schedule), devices=2)
    if rank == 0:
        Path(out).write_text(json.dumps(seconds))


def pipelined_step_seconds(args, schedule: str, microbatches: int) -> float:
    """Step time of one pipeline configuration, on a fresh pair of ranks."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "seconds.json"
        mp.spawn(worker, args=(args, free_port(), schedule, microbatches, str(out)), nprocs=2)
        return json.loads(out.read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-5m")
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--microbatches", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; step times are medians")
    parser.add_argument("--out", default="benchmarks/results/pipeline.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # each pipeline rank gets one thread: the single process gets one too
    variants = {"one process": partial(step_seconds, args, "auto", 1)}
    for schedule in ("gpipe", "1f1b"):
        for m in args.microbatches:
            variants[f"{schedule}/{m}"] = partial(pipelined_step_seconds, args, schedule, m)
    timings = summary(interleaved(variants, args.rounds), baseline="one process")
    single = timings[0]["median"]
    p = 2
    rows = []
    print(f"\n{args.model}, batch {args.batch_size} x {args.block_size}, p={p} stages, 1 thread per rank, "
          f"{platform.machine()}, {os.cpu_count()} CPUs; one process: {single * 1e3:.0f} ms/step "
          f"({timings[0]['min'] * 1e3:.0f}-{timings[0]['max'] * 1e3:.0f}); medians of {args.rounds} interleaved rounds")
    print(f"{'schedule':<8} {'m':>3} {'ms/step':>9} {'range':>13} {'bubble measured':>16} {'ideal (p-1)/(m+p-1)':>20}")
    for timing in timings[1:]:
        schedule, m = timing["run"].split("/")
        seconds = timing["median"]
        measured = 1 - (single / p) / seconds
        ideal = (p - 1) / (int(m) + p - 1)
        spread = f"{timing['min'] * 1e3:.0f}-{timing['max'] * 1e3:.0f}"
        rows.append(dict(schedule=schedule, microbatches=int(m), ms_per_step=seconds * 1e3,
                         ms_per_step_min=timing["min"] * 1e3, ms_per_step_max=timing["max"] * 1e3,
                         bubble_measured=measured, bubble_ideal=ideal))
        print(f"{schedule:<8} {m:>3} {seconds * 1e3:>9.0f} {spread:>13} {measured:>16.2f} {ideal:>20.2f}")
    write_result(args.out, dict(single_ms_per_step=single * 1e3, single_ms_per_step_min=timings[0]["min"] * 1e3,
                                single_ms_per_step_max=timings[0]["max"] * 1e3, rows=rows, args=vars(args),
                                machine=platform.machine(), cpus=os.cpu_count()))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()

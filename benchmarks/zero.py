"""Per-rank training-state bytes, peak memory and step time of ZeROStrategy stages 1, 2, 3 beside
their peers: Lightning's DDPStrategy, `ZeroRedundancyOptimizer` under DDP (torch's own ZeRO-1) and
Lightning's ModelParallelStrategy with `fully_shard` on every decoder layer (FSDP2, ZeRO-3 style).

    OMP_NUM_THREADS=1 python benchmarks/zero.py --model llama-5m --steps 8 --rounds 3

Same model, random tokens, AdamW (fp32) and steps everywhere; each configuration runs in a fresh
set of processes (so that peak RSS is its own); the first `--warmup` steps are not timed. The
configurations take turns for `--rounds` rounds (benchmarks/interleave.py): step times are the
median over rounds of the ranks' mean, with their range. Bytes are
each rank's local tensors: parameters and gradients as the optimizer step sees them, optimizer
state after the first step. Beside each, the fp32 form of the ZeRO formula (Ψ parameters, N ranks:
4Ψ weights, 4Ψ gradients, 8Ψ Adam moments; a stage divides the ones it shards by N) and the ratio.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import socket
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import lightning as L
import torch
import torch.multiprocessing as mp
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor

from interleave import interleaved, summary, write_result

from lightning_llm.models import build_config
from lightning_llm.modules.pretrain import PretrainModule, parameter_groups
from lightning_llm.strategies.zero import ZeROStrategy

# name -> (sharded by the configuration: which of params, grads, optimizer are divided by N)
CONFIGS = {
    "DDP (Lightning)": (),
    "ZeRO-1 (ZeROStrategy)": ("optimizer",),
    "ZeroRedundancyOptimizer + DDP": ("optimizer",),
    "ZeRO-2 (ZeROStrategy)": ("grads", "optimizer"),
    "ZeRO-3 (ZeROStrategy)": ("params", "grads", "optimizer"),
    "fully_shard (Lightning ModelParallel)": ("params", "grads", "optimizer"),
}
BYTES_PER_PARAM = {"params": 4, "grads": 4, "optimizer": 8}  # fp32 AdamW


class ZeroRedundancyModule(PretrainModule):
    """PretrainModule stepping AdamW through `ZeroRedundancyOptimizer` (whole parameters per rank)."""

    def configure_optimizers(self):
        hp = self.hparams
        groups = parameter_groups(self, hp.weight_decay)
        optimizer = ZeroRedundancyOptimizer(groups[0]["params"], optimizer_class=torch.optim.AdamW, lr=hp.lr,
                                            betas=tuple(hp.betas), weight_decay=hp.weight_decay)
        optimizer.add_param_group(groups[1])
        return optimizer


class FullyShardModule(PretrainModule):
    """PretrainModule sharded the way Lightning's ModelParallelStrategy expects: by `configure_model`."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        super().configure_model()
        mesh = self.device_mesh["data_parallel"]
        for layer in self.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class Meter(L.Callback):
    """Step end times and this rank's bytes of parameters, gradients and optimizer state."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.bytes: dict[str, int] = {}

    def on_before_optimizer_step(self, trainer, module, optimizer):
        if "grads" not in self.bytes:
            params = list(module.parameters())
            self.bytes["params"] = sum(_local(p).nbytes for p in params)
            self.bytes["grads"] = sum(_local(p.grad).nbytes for p in params if p.grad is not None)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter())
        if "optimizer" not in self.bytes:
            optimizer = trainer.optimizers[0]
            inner = optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer
            self.bytes["optimizer"] = sum(_local(v).nbytes for state in inner.state.values()
                                          for v in state.values() if isinstance(v, torch.Tensor))


def _strategy(name: str):
    if name.startswith("ZeRO-"):
        return ZeROStrategy(stage=int(name[5]))
    if name.startswith("fully_shard"):
        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    return DDPStrategy(process_group_backend="gloo")


def _worker(rank: int, name: str, args: argparse.Namespace, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(args.ranks), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(args.threads)
    module_class = {"ZeroRedundancyOptimizer + DDP": ZeroRedundancyModule,
                    "fully_shard (Lightning ModelParallel)": FullyShardModule}.get(name, PretrainModule)
    torch.manual_seed(0)
    module = module_class(args.model, lr=1e-3, max_steps=args.steps)
    vocab = build_config(args.model).vocab_size
    g = torch.Generator().manual_seed(rank)
    tokens = torch.randint(0, vocab, (args.steps, args.batch, args.seq + 1), generator=g)
    batches = [{"input_ids": t[:, :-1], "targets": t[:, 1:]} for t in tokens]
    meter = Meter()
    L.Trainer(accelerator="cpu", devices=args.ranks, strategy=_strategy(name), max_steps=args.steps, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              use_distributed_sampler=False, callbacks=[meter]).fit(
        module, torch.utils.data.DataLoader(batches, batch_size=None))
    step_s = statistics.median(b - a for a, b in zip(meter.times[args.warmup:], meter.times[args.warmup + 1:]))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    torch.save({"bytes": meter.bytes, "step_s": step_s, "peak_rss": rss}, Path(out) / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(name: str, args: argparse.Namespace, psi: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(name, args, _free_port(), out), nprocs=args.ranks, join=True)
        ranks = [torch.load(Path(out) / f"rank{r}.pt") for r in range(args.ranks)]
    rows = []
    for rank, result in enumerate(ranks):
        row = {"config": name, "rank": rank, "step_s": result["step_s"], "peak_rss_mib": result["peak_rss"] / 2**20}
        for kind, per_param in BYTES_PER_PARAM.items():
            formula = per_param * psi / (args.ranks if kind in CONFIGS[name] else 1)
            row[kind] = result["bytes"][kind]
            row[f"{kind}_formula"] = formula
            row[f"{kind}_ratio"] = result["bytes"][kind] / formula
        rows.append(row)
    return rows


def step_seconds(name: str, args: argparse.Namespace, psi: int, runs: dict[str, list[list[dict]]]) -> float:
    """One run of configuration `name` (kept in `runs`): the ranks' mean step time."""
    runs[name].append(run(name, args, psi))
    return statistics.mean(r["step_s"] for r in runs[name][-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-5m")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4, help="rows per rank")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; step times are medians")
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "zero.json"))
    args = parser.parse_args()

    from lightning_llm.models import build_model, count_parameters

    with torch.device("meta"):
        psi = count_parameters(build_model(args.model))
    runs: dict[str, list[list[dict]]] = {name: [] for name in args.configs}
    samples = interleaved({name: partial(step_seconds, name, args, psi, runs) for name in args.configs}, args.rounds)
    baseline = "DDP (Lightning)" if "DDP (Lightning)" in samples else None
    timings = {row["run"]: row for row in summary(samples, baseline)}
    rows = []
    for name in args.configs:  # bytes are the same every round; time and peak RSS are medians over rounds
        for rank, row in enumerate(runs[name][0]):
            timing = timings[name]
            rows.append({**row, "step_s": timing["median"], "step_s_min": timing["min"], "step_s_max": timing["max"],
                         "step_s_rounds": timing["rounds"], "vs_ddp": timing.get("ratio_to_" + str(baseline)),
                         "peak_rss_mib": statistics.median(r[rank]["peak_rss_mib"] for r in runs[name])})

    mib = 2**20
    print(f"\n{args.model} ({psi / 1e6:.2f}M parameters), {args.ranks} gloo ranks on "
          f"{platform.processor() or platform.machine()}, {args.threads} thread(s) per rank, "
          f"batch {args.batch}x{args.seq} per rank, fp32 AdamW; MiB per rank (formula, ratio); step s: median "
          f"of {args.rounds} interleaved rounds (range)")
    print(f"| {'configuration':38} | rank | {'params':>20} | {'grads':>20} | {'optimizer':>20} | peak RSS | "
          f"{'step s (range)':>22} | vs DDP |")
    print(f"|{'-' * 40}|------|{'-' * 22}|{'-' * 22}|{'-' * 22}|----------|{'-' * 24}|--------|")
    for r in rows:
        cells = [f"{r[k] / mib:6.2f} ({r[f'{k}_formula'] / mib:5.2f}, {r[f'{k}_ratio']:.2f})" for k in BYTES_PER_PARAM]
        vs = f"{r['vs_ddp']:5.2f}x" if r["vs_ddp"] is not None else "   -  "
        step = f"{r['step_s']:.3f} ({r['step_s_min']:.3f}-{r['step_s_max']:.3f})"
        print(f"| {r['config']:38} | {r['rank']:4} | {' | '.join(f'{c:>20}' for c in cells)} | "
              f"{r['peak_rss_mib']:6.0f}   | {step:>22} | {vs} |")
    write_result(args.out, {"args": vars(args), "parameters": psi, "machine": platform.platform(),
                            "cpus": os.cpu_count(), "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

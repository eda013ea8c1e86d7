"""Per-rank training state and step time of ZeROStrategy stages 1, 2, 3 beside DDP and torch's
ZeroRedundancyOptimizer, on the same model, data and AdamW, on 2 gloo ranks.

    python benchmarks/zero.py --model llama-5m --steps 6

Bytes are what each rank holds of parameters, gradients and optimizer state at the optimizer step
(`lightning_llm.strategies.zero.state_bytes`, local shards only), fp32. The ZeRO paper's count for
fp32 AdamW with Ψ parameters on N ranks: DDP 16Ψ; stage 1 8Ψ + 8Ψ/N; stage 2 4Ψ + 12Ψ/N (FSDP2
frees whole parameters after backward, so between steps it holds 16Ψ/N); stage 3 16Ψ/N.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.multiprocessing as mp
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.utils.data import DataLoader, Dataset

from lightning_llm.models import build_model, count_parameters
from lightning_llm.modules.pretrain import PretrainModule, parameter_groups
from lightning_llm.strategies.zero import ZeROStrategy, state_bytes


class RandomBlocks(Dataset):
    def __init__(self, n: int, seq: int, vocab: int, seed: int) -> None:
        self.x = torch.randint(0, vocab, (n, seq + 1), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i, :-1], "targets": self.x[i, 1:]}


class ZeROptimizerModule(PretrainModule):
    """PretrainModule whose AdamW is wrapped in torch's ZeroRedundancyOptimizer (stage 1's peer)."""

    def configure_optimizers(self):
        groups = parameter_groups(self.model, self.hparams.weight_decay)
        return ZeroRedundancyOptimizer([p for g in groups for p in g["params"]], optimizer_class=torch.optim.AdamW,
                                       lr=self.hparams.lr, betas=tuple(self.hparams.betas))


class Measure(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self.bytes: dict[str, int] = {}

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        if trainer.global_step == 1:  # the optimizer state exists from the first step on
            # ZeroRedundancyOptimizer keeps its shard's state in the optimizer it wraps.
            optimizers = [o.optim if isinstance(o, ZeroRedundancyOptimizer) else o for o in trainer.optimizers]
            self.bytes = state_bytes(module, optimizers)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter())


def run(name: str, args, rank: int) -> dict:
    strategy = {"ddp": "ddp", "ddp + ZeroRedundancyOptimizer": "ddp"}.get(name) or ZeROStrategy(stage=int(name[-1]))
    module_class = ZeROptimizerModule if "Redundancy" in name else PretrainModule
    torch.manual_seed(0)
    measure = Measure()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=args.steps + 2,
                         use_distributed_sampler=False, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[measure])
    data = RandomBlocks(args.batch_size * (args.steps + 2), args.block_size, args.vocab_size, seed=rank)
    module = module_class(args.model, vocab_size=args.vocab_size, warmup_steps=0, max_steps=args.steps + 2)
    trainer.fit(module, DataLoader(data, batch_size=args.batch_size))
    timed = measure.times[2:]
    return {"bytes": measure.bytes, "ms_per_step": 1e3 * (timed[-1] - timed[0]) / (len(timed) - 1)}


RUNS = ("ddp", "ddp + ZeroRedundancyOptimizer", "zero stage 1", "zero stage 2", "zero stage 3")


def worker(rank: int, args, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0",
                      LOCAL_RANK=str(rank), GLOBAL_RANK=str(rank))
    torch.set_num_threads(1)
    results = {name: run(name, args, rank) for name in RUNS}
    Path(f"{out}.rank{rank}").write_text(json.dumps(results))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-5m")
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=8, help="per rank")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", default="benchmarks/results/zero.json")
    args = parser.parse_args()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    mp.spawn(worker, args=(args, free_port(), args.out), nprocs=2)
    ranks = [json.loads(Path(f"{args.out}.rank{r}").read_text()) for r in range(2)]
    for r in range(2):
        Path(f"{args.out}.rank{r}").unlink()
    with torch.device("meta"):
        psi = count_parameters(build_model(args.model, vocab_size=args.vocab_size))
    formula = {"ddp": 16, "ddp + ZeroRedundancyOptimizer": 8 + 8 / 2, "zero stage 1": 8 + 8 / 2,
               "zero stage 2": 4 + 12 / 2, "zero stage 3": 16 / 2}
    print(f"\n{args.model} ({psi / 1e6:.2f}M parameters), fp32 AdamW, 2 gloo ranks, batch {args.batch_size} x "
          f"{args.block_size} per rank, {platform.machine()}, {os.cpu_count()} CPUs")
    print(f"{'run':<31} {'params MiB':>10} {'grads MiB':>10} {'optim MiB':>10} {'bytes/param':>12} {'paper':>6} {'ms/step':>8}")
    rows = []
    for name in RUNS:
        b = max((rank[name]["bytes"] for rank in ranks), key=lambda x: sum(x.values()))  # the fuller rank
        per_param = sum(b.values()) / psi
        ms = max(rank[name]["ms_per_step"] for rank in ranks)
        rows.append(dict(run=name, **b, bytes_per_param=per_param, paper=formula[name], ms_per_step=ms))
        mib = {k: v / 2**20 for k, v in b.items()}
        print(f"{name:<31} {mib['params']:>10.1f} {mib['grads']:>10.1f} {mib['optimizer']:>10.1f} "
              f"{per_param:>12.1f} {formula[name]:>6.1f} {ms:>8.0f}")
    Path(args.out).write_text(json.dumps(dict(parameters=psi, rows=rows, args=vars(args), machine=platform.machine()), indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()

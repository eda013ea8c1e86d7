"""ParallelStrategy per layout: per-rank bytes, step time and the communication of one step, measured
with torch's `CommDebugMode` against the formulas.

    OMP_NUM_THREADS=1 python benchmarks/parallel.py --model tiny --steps 6 --rounds 3
    python benchmarks/parallel.py --quick        # tiny, 2-rank layouts, one round: the test's oracle check

Layouts (each a fresh set of gloo processes; they take turns for `--rounds` rounds, benchmarks/interleave.py):
one process; tp2; tp2 with sequence parallelism; dp2 x tp2 (ZeRO-3, SP); dp2 ZeRO-2 and ZeRO-3 as
references. Every rank trains the same model on `--batch` x `--seq` tokens per data-parallel rank.

Per rank: bytes of parameters, gradients (before the optimizer step) and AdamW state (after it); the
activations saved for backward in one forward (a `saved_tensors_hooks` count, parameters left out:
the peak that activation memory reaches); the step time (median of the ranks' medians over rounds,
with the range over rounds); and the collectives of one whole step (forward, backward, optimizer)
seen by `CommDebugMode`, by type, in message bytes: the whole tensor an all-reduce sums, an all-gather
assembles or a reduce-scatter splits.

The formulas, A = b x s x h x 4 bytes (the activations of one data-parallel rank's batch, fp32), L layers:
- TP (Megatron): each layer's attention and MLP end in an all-reduce of A in forward and begin with
  one in backward: 4 L A; the embedding (split over the vocabulary) adds one in forward, the LM head's
  input one in backward: (4 L + 2) A of all-reduces.
- TP with SP: each of those all-reduces becomes an all-gather and a reduce-scatter of A (a region's
  entry gathers the sequence shards, its exit reduce-scatters): (4 L + 2) A of each, the same bytes on
  the wire (a ring all-reduce moves 2 (T-1)/T of the message per rank, an all-gather or a
  reduce-scatter (T-1)/T).
- ZeRO (benchmarks/zero.py), parameters Ψ bytes (the TP-local share under TP): stage 2 all-gathers Ψ
  once and reduce-scatters the gradients, Ψ; stage 3 all-gathers again in backward: 2Ψ and Ψ.
Besides these, a step moves small tensors: the vocabulary-parallel loss's all-reduces of b x s values
and the norms' weight gradients under SP (h values each); they are reported as "other" and are in the
measured total. A layout "holds" when measured/formula is within 5% for every collective type.

What CommDebugMode sees: the functional collectives that DTensor issues (TP, SP, loss parallel) and the
c10d collectives FSDP2 calls (all-gather of parameters, reduce-scatter of gradients) when they run on
the thread that entered the mode; the "zero" rows show whether the latter were counted here.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections import defaultdict
from functools import partial
from pathlib import Path

import lightning as L
import torch
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.debug import CommDebugMode

from interleave import interleaved, summary, write_result
from pipeline import free_port

from lightning_llm.models import build_config, build_model
from lightning_llm.modules.pretrain import PretrainModule
from lightning_llm.strategies.parallel import ParallelStrategy
from lightning_llm.strategies.zero import state_bytes

# name -> (ranks, ParallelStrategy arguments)
LAYOUTS = {
    "1 process": (1, dict(zero_stage=3)),
    "tp2": (2, dict(tensor_parallel=2, sequence_parallel=False, zero_stage=3)),
    "tp2+SP": (2, dict(tensor_parallel=2, sequence_parallel=True, zero_stage=3)),
    "dp2 x tp2 (ZeRO-3, SP)": (4, dict(data_parallel=2, tensor_parallel=2, zero_stage=3)),
    "dp2 ZeRO-2": (2, dict(zero_stage=2)),
    "dp2 ZeRO-3": (2, dict(zero_stage=3)),
}
QUICK = ["tp2", "tp2+SP", "dp2 ZeRO-2", "dp2 ZeRO-3"]
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter")
TOLERANCE = 0.05


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _message_bytes(func, args: tuple) -> tuple[str, int]:
    """The collective type and message bytes of one op that CommDebugMode counts (functional or c10d)."""
    name = func._overloadpacket.__name__
    tensors = [t for a in args for t in (a if isinstance(a, (list, tuple)) else [a]) if isinstance(t, torch.Tensor)]
    if "reduce_scatter" in name:  # the whole input is the message (c10d: (outputs, inputs); functional: (input,))
        return "reduce_scatter", _local(tensors[-1] if name.startswith("_reduce") or "coalesced" in name else tensors[0]).nbytes
    if "gather" in name:
        if name.startswith(("_allgather_base", "allgather")):  # c10d: (output, input): the whole output
            return "all_gather", sum(_local(t).nbytes for t in tensors[:max(1, len(tensors) // 2)])
        return "all_gather", _local(tensors[0]).nbytes * int(args[1])  # functional: (shard, group_size, group)
    if "reduce" in name:
        return "all_reduce", sum(_local(t).nbytes for t in tensors)
    return name, sum(_local(t).nbytes for t in tensors)


class _WholeStep:
    """Stands in for CommDebugMode's per-module tracker: every collective belongs to the whole step. (The
    tracker keys modules by name and registers a forward hook per call; under the strategy's forward
    redirection through the FSDP root it pops more than it pushed and fails.) The phase (forward,
    backward, optimizer) is set by `Meter` from Lightning's hooks instead."""

    name = "Global"
    is_bw = False
    activation_checkpointing = False
    module_parents_dict = {"Global": set()}

    def __enter__(self) -> None:
        pass

    def __exit__(self, *args) -> None:
        pass


class CommBytes(CommDebugMode):
    """CommDebugMode that also adds up the message bytes of each collective it counts, per phase."""

    def __init__(self) -> None:
        super().__init__()
        self.advanced_module_tracker = _WholeStep()
        self.phase = "forward"
        self.bytes: dict[str, int] = defaultdict(int)
        self.sizes: dict[str, list[tuple[str, int]]] = defaultdict(list)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        before = self.get_total_counts()
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if self.get_total_counts() > before:
            kind, nbytes = _message_bytes(func, args)
            self.bytes[kind] += nbytes
            self.sizes[kind].append((self.phase, nbytes))
        return out


class Meter(L.Callback):
    """Step times; bytes of state; saved activations of one forward; the collectives of one step."""

    def __init__(self, measure_step: int) -> None:
        self.measure_step = measure_step
        self.times: list[tuple[int, float, float]] = []
        self.bytes: dict[str, int] = {}
        self.comm: CommBytes | None = None
        self.saved = 0
        self._hooks = None
        self._seen: set[int] = set()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter):
            local = _local(t)
            if type(local) is torch.Tensor:  # views of one storage counted once
                key, size = local.untyped_storage().data_ptr(), local.untyped_storage().nbytes()
            else:  # a wrapper (an async collective's result) has no storage of its own
                key, size = id(local), local.numel() * local.element_size()
            if key not in self._seen:
                self._seen.add(key)
                self.saved += size
        return t

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.measure_step:
            self.comm = CommBytes()
            self.comm.__enter__()
            self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
            self._hooks.__enter__()
        self._start = time.perf_counter()

    def on_before_backward(self, trainer, module, loss):
        if self.comm is not None:
            self.comm.phase = "backward"
        if self._hooks is not None:
            self._hooks.__exit__(None, None, None)
            self._hooks = None

    def on_before_optimizer_step(self, trainer, module, optimizer):
        if self.comm is not None:
            self.comm.phase = "optimizer"
        if "grads" not in self.bytes:
            self.bytes.update({k: v for k, v in state_bytes(module).items() if k in ("params", "grads")})

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.times.append((batch_idx, self._start, time.perf_counter()))
        if batch_idx == self.measure_step:
            self.comm.__exit__(None, None, None)
            self.comm.phase = "after"
        self.bytes["optimizer"] = state_bytes(module, trainer.optimizers)["optimizer"]


def _fit(rank: int, world: int, layout: str, args: argparse.Namespace) -> dict:
    options = LAYOUTS[layout][1]
    tp = options.get("tensor_parallel", 1)
    torch.manual_seed(0)
    module = PretrainModule(args.model, lr=1e-3, max_steps=args.steps)
    vocab = build_config(args.model).vocab_size
    g = torch.Generator().manual_seed(rank // tp)  # the ranks of one tensor-parallel group share a batch
    tokens = torch.randint(0, vocab, (args.steps, args.batch, args.seq + 1), generator=g)
    batches = [{"input_ids": t[:, :-1], "targets": t[:, 1:]} for t in tokens]
    meter = Meter(measure_step=args.warmup)
    L.Trainer(accelerator="cpu", devices=world, strategy=ParallelStrategy(**options), max_steps=args.steps,
              logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              use_distributed_sampler=False, callbacks=[meter]).fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    timed = [end - start for i, start, end in meter.times if i > args.warmup]  # after warm-up and the measured step
    return {"bytes": meter.bytes, "activations": meter.saved, "step_s": statistics.median(timed),
            "comm": dict(meter.comm.bytes), "counts": {k: len(v) for k, v in meter.comm.sizes.items()},
            "sizes": dict(meter.comm.sizes)}


def _worker(rank: int, world: int, layouts: list[str], args: argparse.Namespace, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(args.threads)
    torch.save({layout: _fit(rank, world, layout, args) for layout in layouts}, Path(out) / f"rank{rank}.pt")


def run(layouts: list[str], args: argparse.Namespace) -> dict[str, list[dict]]:
    """Train each layout in turn in one set of fresh processes (all on the same number of ranks); each
    layout's per-rank results."""
    (world,) = {LAYOUTS[layout][0] for layout in layouts}
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(world, layouts, args, free_port(), out), nprocs=world, join=True)
        ranks = [torch.load(Path(out) / f"rank{r}.pt") for r in range(world)]
    return {layout: [r[layout] for r in ranks] for layout in layouts}


def formulas(layout: str, args: argparse.Namespace) -> dict[str, int]:
    """Message bytes per collective type of one step, from the formulas in the docstring."""
    config = build_config(args.model)
    ranks, options = LAYOUTS[layout]
    tp = options.get("tensor_parallel", 1)
    dp = ranks // tp
    activations = args.batch * args.seq * config.hidden_size * 4
    expected = dict.fromkeys(COLLECTIVES, 0)
    if tp > 1:
        tp_bytes = (4 * config.num_hidden_layers + 2) * activations
        if options.get("sequence_parallel", True):
            expected["all_gather"] += tp_bytes
            expected["reduce_scatter"] += tp_bytes
        else:
            expected["all_reduce"] += tp_bytes
    if dp > 1:
        with torch.device("meta"):
            model = build_model(args.model)
        matrices = sum(p.numel() for p in model.parameters() if p.ndim == 2)  # split by TP; the rest replicated
        psi = 4 * (matrices // tp + sum(p.numel() for p in model.parameters() if p.ndim < 2))
        expected["all_gather"] += psi if options["zero_stage"] == 2 else 2 * psi
        expected["reduce_scatter"] += psi
    return expected


def comparison(layout: str, ranks: list[dict], args: argparse.Namespace) -> dict:
    """Rank 0's measured message bytes per type beside the formula, the ratio, and whether all hold."""
    expected = formulas(layout, args)
    measured = ranks[0]["comm"]
    rows = {}
    for kind in COLLECTIVES:
        rows[kind] = {"measured": measured.get(kind, 0), "formula": expected[kind], "count": ranks[0]["counts"].get(kind, 0),
                      "ratio": measured.get(kind, 0) / expected[kind] if expected[kind] else None}
    others = {k: v for k, v in measured.items() if k not in COLLECTIVES}
    holds = all(abs(r["ratio"] - 1) <= TOLERANCE if r["formula"] else r["measured"] <= TOLERANCE * max(
        sum(expected.values()), 1) for r in rows.values())
    return {"collectives": rows, "other_types": others, "holds": holds}


def step_seconds(layout: str, args: argparse.Namespace, runs: dict[str, list[list[dict]]]) -> float:
    """One run of `layout` in fresh processes (kept in `runs`): the median over ranks of their median step."""
    runs[layout].append(run([layout], args)[layout])
    return statistics.median(r["step_s"] for r in runs[layout][-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps; the step after them is the measured one")
    parser.add_argument("--batch", type=int, default=4, help="rows per data-parallel rank")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; step times are medians")
    parser.add_argument("--layouts", nargs="*", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--quick", action="store_true", help=f"tiny, {QUICK} one after another in one pair of "
                        "processes, 4 steps: the communication and bytes only (step times are one untimed sample)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "parallel.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.layouts, args.steps, args.warmup, args.rounds = "tiny", QUICK, 4, 1, 1
        runs = {layout: [ranks] for layout, ranks in run(QUICK, args).items()}
        samples = {layout: [statistics.median(r["step_s"] for r in ranks[0])] for layout, ranks in runs.items()}
    else:
        runs = {name: [] for name in args.layouts}
        samples = interleaved({name: partial(step_seconds, name, args, runs) for name in args.layouts}, args.rounds)
    baseline = "1 process" if "1 process" in samples else None
    timings = {row["run"]: row for row in summary(samples, baseline)}
    rows = []
    for layout in args.layouts:
        first = runs[layout][0]  # bytes and communication are the same every round
        rows.append({"layout": layout, "ranks": LAYOUTS[layout][0], **LAYOUTS[layout][1],
                     **{k: first[0]["bytes"][k] for k in ("params", "grads", "optimizer")},
                     "activations": first[0]["activations"], "step_s": timings[layout]["median"],
                     "step_s_min": timings[layout]["min"], "step_s_max": timings[layout]["max"],
                     "vs_one_process": timings[layout].get(f"ratio_to_{baseline}"),
                     "comm": comparison(layout, first, args)})

    mib = 2**20
    print(f"\n{args.model}, gloo on {platform.processor() or platform.machine()}, batch {args.batch}x{args.seq} per "
          f"data-parallel rank, fp32 AdamW; KiB per rank (rank 0); step s: median of {args.rounds} interleaved rounds "
          "(range); one step's collectives, MiB measured / formula (ratio)")
    print("| layout | params | grads | optimizer | saved activations | step s (range) | all-reduce | all-gather | "
          "reduce-scatter | holds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = []
        for kind in COLLECTIVES:
            c = r["comm"]["collectives"][kind]
            ratio = f" ({c['ratio']:.3f})" if c["ratio"] is not None else ""
            cells.append(f"{c['measured'] / mib:.3f} / {c['formula'] / mib:.3f}{ratio}")
        print(f"| {r['layout']} | {r['params'] / 1024:.0f} | {r['grads'] / 1024:.0f} | {r['optimizer'] / 1024:.0f} | "
              f"{r['activations'] / 1024:.0f} | {r['step_s']:.4f} ({r['step_s_min']:.4f}-{r['step_s_max']:.4f}) | "
              f"{' | '.join(cells)} | {'yes' if r['comm']['holds'] else 'NO'} |")
    result = {"args": vars(args), "machine": platform.platform(), "cpus": os.cpu_count(), "rows": rows}
    write_result(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()

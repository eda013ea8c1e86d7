"""Full finetuning vs LoRA vs QLoRA on the same model and data: trainable parameters, training-state
bytes (measured beside the textbook formula), checkpoint size, peak memory and tokens/s. Each
configuration runs in a fresh process so that its peak memory is its own; the first `--warmup` steps
are not timed. The configurations take turns for `--rounds` rounds (benchmarks/interleave.py):
tokens/s and peak memory are medians over rounds, tokens/s with its range.

    python benchmarks/peft_memory.py --model llama-5m --steps 8 --rounds 3
    python benchmarks/peft_memory.py --model llama-1b --configs lora qlora --steps 3 --warmup 1 --seq-len 64 --batch-size 1

Training state = weights (a 4-bit layer counts its codes and quantization constants) + gradients +
optimizer state, counted at the end of a step. Formulas, per parameter: full finetuning with AdamW
16 bytes (weights 4 + gradients 4 + two moments 8; mixed precision keeps the same 16); LoRA 4 for
the frozen base + 16 per adapter parameter; QLoRA 4.127 / 8 = 0.516 for each 4-bit weight (NF4 with
double quantization), 4 for what stays unquantized (embeddings, norms) + 16 per adapter parameter.
The configurations that do not fit (`--formula-only`) are reported from the formula alone.
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import bitsandbytes as bnb
import torch
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader

from interleave import in_fresh_process, interleaved, summary, write_result

from lightning_llm.callbacks.lora import LoRACallback, QLoRACallback, quantization_constants
from lightning_llm.models import build_model, count_parameters
from lightning_llm.modules.pretrain import PretrainModule

CONFIGS = ("full", "lora", "qlora")
NF4_DQ_BYTES = 4.127 / 8  # bytes per 4-bit weight with double quantization (the QLoRA paper's count)


class Meter(Callback):
    """Step end times and the training-state bytes at the end of the last step."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times, self.state_bytes = device, [], 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        self.state_bytes = training_state_bytes(module, trainer.optimizers[0])


def training_state_bytes(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    params = list(module.parameters())
    tensors = params + [p.grad for p in params if p.grad is not None]
    tensors += [t for m in module.modules() if isinstance(m, bnb.nn.Linear4bit) for t in quantization_constants(m)]
    tensors += [t for state in optimizer.state.values() for t in state.values()
                if isinstance(t, torch.Tensor) and t.dim() > 0]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def formula_bytes(config: str, n_params: int, n_linear: int, n_adapter: int) -> float:
    """The textbook training-state bytes of `config` (see the module docstring)."""
    if config == "full":
        return 16 * n_params
    if config == "lora":
        return 4 * n_params + 16 * n_adapter
    return NF4_DQ_BYTES * n_linear + 4 * (n_params - n_linear) + 16 * n_adapter


def shapes(args: argparse.Namespace) -> dict[str, int]:
    """Parameter counts of the base and of a rank-r adapter on its linear layers (no weights allocated)."""
    with torch.device("meta"):
        model = build_model(args.model, vocab_size=args.vocab_size)
    output = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not output]
    return {"n_params": count_parameters(model), "n_linear": sum(m.weight.numel() for m in linears),
            "n_adapter": sum(args.r * (m.in_features + m.out_features) for m in linears)}


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def run(config: str, args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (args.steps, args.batch_size, args.seq_len + 1), generator=gen)
    batches = [{"input_ids": t[:, :-1], "targets": t[:, 1:]} for t in tokens]
    callbacks = {"full": [], "lora": [LoRACallback(r=args.r, alpha=2 * args.r)],
                 "qlora": [QLoRACallback(r=args.r, alpha=2 * args.r, compute_dtype=args.compute_dtype)]}[config]
    meter = Meter(device)
    torch.manual_seed(0)
    module = PretrainModule(args.model, vocab_size=args.vocab_size, lr=1e-4, warmup_steps=1, max_steps=args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(accelerator=device.type, devices=1, max_steps=args.steps, callbacks=[meter, *callbacks],
                          logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, default_root_dir=tmp)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        rss_before = rss_mib()
        trainer.fit(module, DataLoader(batches, batch_size=None))
        peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before)
        trainer.save_checkpoint(Path(tmp) / "last.ckpt")
        checkpoint_mib = (Path(tmp) / "last.ckpt").stat().st_size / 2**20
    timed = meter.times[args.warmup:]
    return {
        "config": config, "device": device.type,
        "trainable": count_parameters(module.model, trainable_only=True),
        "state_mib": meter.state_bytes / 2**20, "checkpoint_mib": checkpoint_mib, "peak_mib": peak,
        "tokens_per_s": (len(timed) - 1) * args.batch_size * args.seq_len / (timed[-1] - timed[0]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-5m")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--formula-only", nargs="*", default=[], choices=CONFIGS,
                        help="configurations too large for this machine: report the formula only")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--compute-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; figures are medians")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/peft_memory[_<model>].json")
    args = parser.parse_args()

    counts = shapes(args)
    measured = [config for config in CONFIGS if config in args.configs]
    runs: dict[str, list[dict]] = {config: [] for config in measured}
    samples = interleaved({config: partial(in_fresh_process, runs[config], "tokens_per_s", run, config, args)
                           for config in measured}, args.rounds)
    timings = {row["run"]: row for row in summary(samples)}
    rows = []
    for config in CONFIGS:
        if config in measured:  # bytes are the same every round; speed and peak memory are medians over rounds
            timing = timings[config]
            rows.append({**runs[config][0], "tokens_per_s": timing["median"], "tokens_per_s_min": timing["min"],
                         "tokens_per_s_max": timing["max"], "tokens_per_s_rounds": timing["rounds"],
                         "peak_mib": statistics.median(r["peak_mib"] for r in runs[config])})
        elif config in args.formula_only:
            rows.append({"config": config, "device": "-"})
    for row in rows:
        row["formula_mib"] = formula_bytes(row["config"], **counts) / 2**20
    full = formula_bytes("full", **counts) / 2**20
    device = next((row["device"] for row in rows if row["device"] != "-"), "-")
    memory = "peak GPU MiB" if device == "cuda" else "peak RSS MiB over start"
    print(f"\n{args.model} ({counts['n_params'] / 1e6:.1f}M params, {counts['n_linear'] / 1e6:.1f}M in adapted linear "
          f"layers), r={args.r}, batch {args.batch_size}x{args.seq_len}, {device}, "
          f"{platform.processor() or platform.machine()}, {args.threads} threads; medians of {args.rounds} interleaved rounds")
    print(f"| configuration | trainable params | training state MiB (measured) | formula MiB | full (formula) / this | "
          f"checkpoint MiB | {memory} | tokens/s (range) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        if row["device"] == "-":
            print(f"| {row['config']} (not run) | {counts['n_params']:,} | - | {row['formula_mib']:.0f} | 1.0x | - | - | - |")
            continue
        print(f"| {row['config']} | {row['trainable']:,} | {row['state_mib']:.1f} | {row['formula_mib']:.1f} | "
              f"{full / row['state_mib']:.1f}x | {row['checkpoint_mib']:.2f} | {row['peak_mib']:.0f} | "
              f"{row['tokens_per_s']:.0f} ({row['tokens_per_s_min']:.0f}-{row['tokens_per_s_max']:.0f}) |")
    suffix = "" if args.model == "llama-5m" else f"_{args.model}"
    out = Path(args.out or Path(__file__).parent / "results" / f"peft_memory{suffix}.json")
    write_result(out, {"args": vars(args), "machine": platform.platform(), "counts": counts, "rows": rows})
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()

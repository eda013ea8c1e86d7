"""Tokens/s, peak memory and training-state bytes per parameter of the precision plugins beside
Lightning's built-in precisions: same model, data, optimizer (AdamW) and steps; each configuration
runs in a fresh process so that its peak memory is its own; the first `--warmup` steps are not timed.
The configurations take turns for `--rounds` rounds (benchmarks/interleave.py): tokens/s and peak
memory are medians over rounds, tokens/s with its range.

    python benchmarks/precision.py --model llama-5m --steps 12 --rounds 3

Training state = model weights + gradients + optimizer-held tensors (fp32 masters, Adam moments),
counted at the end of a step; the formula column is the textbook count for AdamW.
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader

from interleave import in_fresh_process, interleaved, summary, write_result

from lightning_llm.models import build_model, count_parameters
from lightning_llm.precision import MasterWeightsPrecision, MixedPrecision

# name -> (Lightning's `precision=` string or None, our plugin or None, formula bytes/param: weights+grads+optimizer)
CONFIGS = {
    "fp32 (Lightning 32-true)": ("32-true", None, "4+4+8 = 16"),
    "bf16-mixed (Lightning)": ("bf16-mixed", None, "4+4+8 = 16"),
    "bf16-mixed (MixedPrecision)": (None, "bf16-mixed", "4+4+8 = 16"),
    "16-mixed (Lightning)": ("16-mixed", None, "4+4+8 = 16"),
    "fp16-mixed (MixedPrecision)": (None, "fp16-mixed", "4+4+8 = 16"),
    "bf16-true (Lightning)": ("bf16-true", None, "2+2+4 = 8"),
    "bf16 + fp32 master (MasterWeightsPrecision)": (None, "master", "2+2+12 = 16"),
}


class RandomTokensLM(LightningModule):
    def __init__(self, model: str, vocab_size: int, lr: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = build_model(model, vocab_size=vocab_size)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        logits = self.model(input_ids=batch["input_ids"], use_cache=False).logits
        return F.cross_entropy(logits.float().flatten(0, 1), batch["targets"].flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.0)


class Meter(Callback):
    """Step end times, the precision the forward pass really ran in, and the training-state bytes."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times, self.state_bytes, self.logits_dtype = device, [], 0, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self.logits_dtype is None:
            with trainer.precision_plugin.forward_context():
                self.logits_dtype = str(module.model(input_ids=batch["input_ids"][:1, :8]).logits.dtype)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        tensors = list(module.parameters()) + [p.grad for p in module.parameters() if p.grad is not None]
        for group in trainer.optimizers[0].param_groups:
            tensors += [p for p in group["params"]] + [p.grad for p in group["params"] if p.grad is not None]
        tensors += [t for state in trainer.optimizers[0].state.values() for t in state.values()
                    if isinstance(t, torch.Tensor) and t.dim() > 0]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        self.state_bytes = sum(storages.values())


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def run(name: str, args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    lightning_precision, ours, formula = CONFIGS[name]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    plugins = {None: [], "bf16-mixed": [MixedPrecision("bf16-mixed")], "fp16-mixed": [MixedPrecision("fp16-mixed")],
               "master": [MasterWeightsPrecision("bf16")]}[ours]
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (args.steps, args.batch_size, args.seq_len + 1), generator=gen)
    batches = [{"input_ids": t[:, :-1], "targets": t[:, 1:]} for t in tokens]
    module = RandomTokensLM(args.model, args.vocab_size, args.lr)
    n_params = count_parameters(module.model)
    meter = Meter(device)
    kwargs = {} if lightning_precision is None else {"precision": lightning_precision}
    trainer = Trainer(accelerator=device.type, devices=1, max_steps=args.steps, plugins=plugins, callbacks=[meter],
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, **kwargs)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_before = rss_mib()
    trainer.fit(module, DataLoader(batches, batch_size=None))
    timed = meter.times[args.warmup:]
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before)
    return {
        "config": name, "device": device.type, "ran_as": f"{trainer.precision} / {meter.logits_dtype}",
        "tokens_per_s": (len(timed) - 1) * args.batch_size * args.seq_len / (timed[-1] - timed[0]),
        "peak_mib": peak, "state_bytes_per_param": meter.state_bytes / n_params, "formula": formula,
        "n_params": n_params,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-5m")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; figures are medians")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "precision.json"))
    args = parser.parse_args()

    runs: dict[str, list[dict]] = {name: [] for name in args.configs}
    samples = interleaved({name: partial(in_fresh_process, runs[name], "tokens_per_s", run, name, args)
                           for name in args.configs}, args.rounds)
    rows = []
    for timing in summary(samples, baseline=args.configs[0]):
        first = runs[timing["run"]][0]  # the byte counts and the precision that ran are the same every round
        rows.append({**first, "tokens_per_s": timing["median"], "tokens_per_s_min": timing["min"],
                     "tokens_per_s_max": timing["max"], "tokens_per_s_rounds": timing["rounds"],
                     "vs_first": timing["ratio_to_" + args.configs[0]],
                     "peak_mib": statistics.median(r["peak_mib"] for r in runs[timing["run"]])})
    memory = "peak GPU MiB" if rows[0]["device"] == "cuda" else "peak RSS MiB over start"
    print(f"\n{args.model} ({rows[0]['n_params'] / 1e6:.1f}M params), batch {args.batch_size}x{args.seq_len}, "
          f"{rows[0]['device']}, {platform.processor() or platform.machine()}, {args.threads} threads; medians of "
          f"{args.rounds} interleaved rounds")
    print(f"| configuration | ran as (trainer.precision / logits) | tokens/s (range) | vs first | {memory} | "
          "state bytes/param (measured) | formula |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- |")
    for row in rows:
        print(f"| {row['config']} | {row['ran_as']} | {row['tokens_per_s']:.0f} ({row['tokens_per_s_min']:.0f}-"
              f"{row['tokens_per_s_max']:.0f}) | {row['vs_first']:.2f}x | {row['peak_mib']:.0f} | "
              f"{row['state_bytes_per_param']:.1f} | {row['formula']} |")
    write_result(args.out, {"args": vars(args), "machine": platform.platform(), "rows": rows})
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()

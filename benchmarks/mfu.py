"""Model FLOPs utilisation of pretraining presets: attention through SDPA or this project's FlashAttention
kernels (attn_implementation "lightning_fa2"), eager or compiled, under `PretrainModule` and Lightning's
`Trainer`.

Every variant trains on the same random token blocks (`--tokens-per-step` tokens of `--block-size`). The
variants of one model take turns (benchmarks/interleave.py): each round fits every variant for `--steps`
steps with a fresh Trainer (the module, its weights and any compiled code are kept) and times the steps
after the first `--warmup`; one untimed round before the counted ones compiles, tunes and allocates.
MFU = tokens/s x `scaling.flops_per_token` / `scaling.peak_flops` (the GPU's dense peak for the compute
dtype); on the CPU no peak is known, and the rows give tokens/s and TFLOP/s only.

Compiled rows need `PretrainModule(compile=True)`; where this checkout's PretrainModule takes no such
argument they are recorded as not available. A variant that fails is recorded with its error, the others
still run, and the script exits with status 1.

    python benchmarks/mfu.py                                    # CUDA: llama-124m and llama-1b, bf16
    python benchmarks/mfu.py --models tiny --block-size 64 --tokens-per-step 256 --steps 3 --rounds 1  # CPU
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch
from interleave import interleaved, summary
from lightning.pytorch import Callback, Trainer
from pretrain_throughput import step_rate
from record import environment, machine, save_figure, write_json
from torch.utils.data import DataLoader

from lightning_llm.callbacks.throughput import compute_dtype
from lightning_llm.modules.pretrain import PretrainModule
from lightning_llm.scaling import flops_per_token, peak_flops

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
COMPILE_AVAILABLE = "compile" in inspect.signature(PretrainModule).parameters


class Clock(Callback):
    """The time at the end of every training batch (after the device has finished it), and the peak FLOP/s
    of the device for the dtype the trainer computes in (None where unknown)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.peak: float | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.peak = peak_flops(pl_module.device, compute_dtype(trainer))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if CUDA:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())


def random_blocks(vocab_size: int, block_size: int, batch_size: int, steps: int) -> DataLoader:
    """`steps` batches of random token blocks with their next-token targets (the speed does not depend on the text)."""
    tokens = torch.randint(0, vocab_size, (steps, batch_size, block_size + 1), generator=torch.Generator().manual_seed(0))
    return DataLoader([{"input_ids": t[:, :-1], "targets": t[:, 1:]} for t in tokens], batch_size=None)


def variant_name(attention: str, compiled: bool) -> str:
    return f"{attention}, {'compiled' if compiled else 'eager'}"


def make_variant(args: argparse.Namespace, model: str, attention: str, compiled: bool,
                 peaks: dict[str, float | None]) -> tuple[Callable[[], float], PretrainModule]:
    """A module of `model` and a function that fits it for `args.steps` steps and returns its tokens/s (and
    notes the device's peak FLOP/s in `peaks`)."""
    torch.manual_seed(0)
    options = {"compile": True} if compiled else {}
    module = PretrainModule(model, attn_implementation=attention, warmup_steps=1, max_steps=10**6, **options)
    batch_size = max(1, args.tokens_per_step // args.block_size)

    def fit() -> float:
        clock = Clock()
        trainer = Trainer(accelerator=DEVICE.type, devices=1, max_steps=args.steps, precision=args.precision,
                          logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                          callbacks=[clock], gradient_clip_val=1.0)
        vocab_size = module.model.config.vocab_size if module.model is not None else module.model_config().vocab_size
        trainer.fit(module, random_blocks(vocab_size, args.block_size, batch_size, args.steps))
        peaks[model] = clock.peak
        module.zero_grad(set_to_none=True)  # the other variants' turns need the memory
        if CUDA:
            torch.cuda.empty_cache()
        return step_rate(clock.times, args.warmup, batch_size * args.block_size)

    return fit, module


def measure_model(args: argparse.Namespace, model: str) -> list[dict]:
    """One row per variant of `model`: tokens/s (median and range over the rounds), TFLOP/s and MFU, or why not."""
    rows, fits, modules, peaks = {}, {}, {}, {}
    for compiled in [mode == "compiled" for mode in args.modes]:
        for attention in args.attention:
            name = variant_name(attention, compiled)
            rows[name] = dict(model=model, attention=attention, compiled=compiled)
            if compiled and not COMPILE_AVAILABLE:
                rows[name]["status"] = "not available: this checkout's PretrainModule has no compile argument"
                continue
            try:
                fits[name], modules[name] = make_variant(args, model, attention, compiled, peaks)
                start = time.perf_counter()
                fits[name]()  # the untimed round: compilation, autotuning, allocation
                rows[name]["first_round_s"] = time.perf_counter() - start
            except Exception as err:  # one variant failing must not hide the others' figures
                traceback.print_exc()
                rows[name]["status"] = "error"
                rows[name]["error"] = f"{type(err).__name__}: {err}"[:2000]
                fits.pop(name, None)
                modules.pop(name, None)
    if not fits:
        return list(rows.values())
    samples = interleaved(fits, args.rounds)
    config = next(iter(modules.values())).model.config
    fpt = flops_per_token(config, args.block_size)
    peak = peaks[model]
    baseline = next(iter(samples))  # the first variant that ran: sdpa, eager if measured
    for result in summary(samples, baseline=baseline):
        rate = result["median"]
        rows[result["run"]].update(
            status="ok", tokens_per_s=rate, tokens_per_s_min=result["min"], tokens_per_s_max=result["max"],
            rounds=result["rounds"], tflops=rate * fpt / 1e12, mfu=rate * fpt / peak if peak else None,
            baseline=baseline, speed_vs_baseline=result["ratio_to_" + baseline], flops_per_token=fpt,
            parameters=sum(p.numel() for p in modules[result["run"]].parameters()))
    modules.clear()
    return list(rows.values())


def format_row(row: dict) -> str:
    start = f"{row['model']:<12}{row['attention']:<15}{'compiled' if row['compiled'] else 'eager':<10}"
    if row.get("status") != "ok":
        return start + f"  {row.get('status')}{': ' + row['error'][:80] if 'error' in row else ''}"
    mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
    span = f"[{row['tokens_per_s_min']:,.0f}, {row['tokens_per_s_max']:,.0f}]"
    return (start + f"{row['tokens_per_s']:>12,.0f}  {span:<22}{row['tflops']:>9.2f}{mfu:>8}"
            f"{row['speed_vs_baseline']:>10.2f}  vs {row['baseline']}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    use_mfu = any(r.get("mfu") is not None for r in rows)
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        values = [(r.get("mfu") or 0) * 100 if use_mfu else r.get("tokens_per_s", 0) for r in mine]
        labels = [variant_name(r["attention"], r["compiled"]) + ("" if r.get("status") == "ok" else "\n(no figure)")
                  for r in mine]
        ax.bar(range(len(mine)), values, color=["C0" if not r["compiled"] else "C1" for r in mine])
        ax.set_xticks(range(len(mine)), labels, rotation=30, ha="right", fontsize=8)
        ax.set(title=model, ylabel="MFU (%)" if use_mfu else "tokens/s")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["llama-124m", "llama-1b"])
    parser.add_argument("--attention", nargs="+", default=["sdpa", "lightning_fa2"])
    parser.add_argument("--modes", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"])
    parser.add_argument("--block-size", type=int, default=2048)
    parser.add_argument("--tokens-per-step", type=int, default=16384, help="batch size = this // block size")
    parser.add_argument("--steps", type=int, default=8, help="steps per round and variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", default="bf16-mixed", choices=["bf16-mixed", "32-true"])
    parser.add_argument("--out", default="benchmarks/results/mfu.json")
    args = parser.parse_args()
    if args.steps < args.warmup + 2:
        parser.error(f"--steps {args.steps} must exceed --warmup {args.warmup} by at least 2 (a timed interval)")
    device = machine()
    print(f"{device}; {args.precision}; block {args.block_size}; {args.tokens_per_step} tokens per step; "
          f"compile {'available' if COMPILE_AVAILABLE else 'not available in this checkout'}")
    out = Path(args.out)
    rows: list[dict] = []
    for model in args.models:
        rows += measure_model(args, model)
        # Written after each model, so a run cut short keeps the models it finished.
        write_json({"config": vars(args), "machine": device, "environment": environment(), "results": rows}, out)
    print(f"\n{device}; {args.precision}; tokens/s median [min, max] of {args.rounds} rounds")
    print(f"{'model':<12}{'attention':<15}{'mode':<10}{'tokens/s':>12}  {'[min, max]':<22}{'TFLOP/s':>9}{'MFU':>8}{'speed':>10}")
    for row in rows:
        print(format_row(row))
    plot(rows, out.with_suffix(".png"))
    print(f"written to {out} and {out.with_suffix('.png')}")
    sys.exit(1 if any(r.get("status") == "error" for r in rows) else 0)


if __name__ == "__main__":
    main()

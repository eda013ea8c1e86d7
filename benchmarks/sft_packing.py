"""Instruction tuning with and without packing on the same data: example tokens/s and padding.

Unpacked, each row is one example and a batch is padded to its longest example (dynamic padding,
the usual baseline); packed, whole examples fill blocks of `--block_size` tokens. Both train the
same model with `InstructionTuningModule` under Lightning's Trainer for `--steps` steps, the first
`--warmup` untimed. The figure that matters is example tokens (not padding) per second: packing
computes fewer padding tokens for the same examples, so its bound is 1 / (1 - unpacked padding).
A third run packs with `attn_implementation="sdpa"`, transformers' dense block-diagonal mask over
the whole block, against the default per-document attention. The runs take turns for `--rounds`
rounds (benchmarks/interleave.py) and each figure is the median, with its range.

The data is the example set of `examples/make_sft_data.py` grouped into dialogs of 1 to
`--max_turns` question/answer turns, so that lengths spread as chat data's do; `--data` takes a
JSONL file of your own instead.

    python benchmarks/sft_packing.py --model llama-5m --steps 30 --rounds 3
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer

from interleave import interleaved, summary, write_result
from lightning_llm.data.instruct import InstructionDataModule
from lightning_llm.data.pretrain import PretrainDataModule
from lightning_llm.modules.instruct import InstructionTuningModule

ROOT = Path(__file__).resolve().parents[1]


def dialogs(n: int, max_turns: int, seed: int) -> list[dict]:
    """`n` chat records of 1 to `max_turns` turns, built from the example generator's questions."""
    spec = importlib.util.spec_from_file_location("make_sft_data", ROOT / "examples" / "make_sft_data.py")
    make_sft_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_sft_data)
    turns = [r["messages"] for r in make_sft_data.make_records(("add", "reverse", "docstring"), n * max_turns, seed)]
    rng, out = random.Random(seed), []
    while turns and len(out) < n:
        k = min(rng.randint(1, max_turns), len(turns))
        out.append({"messages": [m for _ in range(k) for m in turns.pop()]})
    return out


class Clock(Callback):
    """Time and token counts of each training step."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.example_tokens: list[int] = []
        self.computed_tokens: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch["input_ids"].is_cuda:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        self.example_tokens.append(int(batch["num_tokens"].sum()))
        self.computed_tokens.append(batch["input_ids"].numel())


# name: (packing, attn_implementation); None is the module's default.
RUNS = {"unpacked": (False, None), "packed": (True, None), "packed, dense mask": (True, "sdpa")}


def run(args, data: str, tokenizer_dir: str, packing: bool, attn_implementation: str | None,
        device: torch.device) -> dict:
    dm = InstructionDataModule(data, tokenizer=tokenizer_dir, block_size=args.block_size, batch_size=args.batch_size,
                               packing=packing, val_fraction=0, seed=0)
    torch.manual_seed(0)
    module = InstructionTuningModule(args.model, lr=1e-3, warmup_steps=5, max_steps=args.steps,
                                     attn_implementation=attn_implementation)
    module.tokenizer = dm.tokenizer
    clock = Clock()
    trainer = Trainer(accelerator=device.type, devices=1, max_steps=args.steps, precision=args.precision, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, num_sanity_val_steps=0, callbacks=[clock])
    trainer.fit(module, datamodule=dm)
    w = args.warmup  # step w's end starts the timed window: steps w+1 .. last are timed
    seconds = clock.times[-1] - clock.times[w]
    example_tokens, computed = sum(clock.example_tokens[w + 1:]), sum(clock.computed_tokens[w + 1:])
    return {"example_tokens_per_sec": example_tokens / seconds, "attention": module.model.config._attn_implementation,
            "computed_tokens_per_sec": computed / seconds, "padding_fraction": 1 - example_tokens / computed,
            "seconds_per_step": seconds / (len(clock.times) - 1 - w), "epoch_steps": math.ceil(len(dm.train_set) / args.batch_size)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-5m")
    parser.add_argument("--data", help="a JSONL instruction file; default: generated dialogs")
    parser.add_argument("--examples", type=int, default=2000, help="generated dialogs")
    parser.add_argument("--max_turns", type=int, default=6)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of each run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each figure is their median")
    parser.add_argument("--block_size", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default="benchmarks/results/sft_packing.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = str(Path(tmp) / "tokenizer")
        PretrainDataModule("python-stdlib", vocab_size=4096).tokenizer.save_pretrained(tokenizer_dir)
        data = args.data
        if data is None:
            data = str(Path(tmp) / "dialogs.jsonl")
            Path(data).write_text("".join(json.dumps(r) + "\n" for r in dialogs(args.examples, args.max_turns, seed=0)))
        details: dict[str, list[dict]] = {name: [] for name in RUNS}

        def variant(name: str):
            def measure() -> float:
                details[name].append(run(args, data, tokenizer_dir, *RUNS[name], device))
                return details[name][-1]["example_tokens_per_sec"]
            return measure

        samples = interleaved({name: variant(name) for name in RUNS}, args.rounds)

    rows = summary(samples, baseline="unpacked")
    for row in rows:
        runs = details[row["run"]]
        row.update(attention=runs[0]["attention"], padding_fraction=runs[0]["padding_fraction"],
                   epoch_steps=runs[0]["epoch_steps"],
                   computed_tokens_per_sec=statistics.median(r["computed_tokens_per_sec"] for r in runs),
                   seconds_per_step=statistics.median(r["seconds_per_step"] for r in runs))
    bound = 1 / (1 - rows[0]["padding_fraction"])
    machine = torch.cuda.get_device_name() if device.type == "cuda" else (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads")
    print(f"\n{args.model}, block {args.block_size}, batch {args.batch_size}, {args.precision}, {machine}, "
          f"median of {args.rounds} interleaved rounds")
    print(f"{'run':<20}{'attention':<15}{'example tok/s':>15}{'range':>17}{'computed tok/s':>16}{'padding':>9}"
          f"{'s/step':>8}{'vs unpacked':>13}")
    for r in rows:
        spread = f"{r['min']:,.0f}-{r['max']:,.0f}"
        print(f"{r['run']:<20}{r['attention']:<15}{r['median']:>15,.0f}{spread:>17}"
              f"{r['computed_tokens_per_sec']:>16,.0f}{r['padding_fraction']:>9.1%}{r['seconds_per_step']:>8.3f}"
              f"{r['ratio_to_unpacked']:>13.2f}")
    print(f"packing's bound at {rows[0]['padding_fraction']:.1%} padding: 1 / (1 - padding) = {bound:.2f}x")
    write_result(args.out, {"config": vars(args), "machine": machine, "packing_bound": bound, "results": rows})
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()

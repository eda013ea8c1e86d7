"""Tokens/s of the same pretraining run several ways, interleaved (benchmarks/interleave.py): PretrainModule
under Lightning's Trainer eager and compiled (`compile=True`), a plain PyTorch loop, the Hugging Face Trainer,
and litgpt's compiled pretraining step when a Python with litgpt is given. Same model shape, the same batches
in the same order, the same optimizer settings and schedule; the first `--warmup` steps of each run (compiling
included) are not timed. Each row also gives the loss at the last step.

`--clock cpu` times each step by the process's CPU time on one thread instead of the wall clock: on a machine
that other jobs share, a step's CPU time barely depends on their load (a wall-clock rate does), so rows taken
under load compare; it leaves out what a wall clock sees and CPU time does not (waiting, other threads).

    python benchmarks/pretrain_throughput.py --model llama-5m --steps 40 --rounds 3 \
        --litgpt_python /path/to/venv-with-litgpt/bin/python
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from interleave import interleaved, summary
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader, Dataset, SequentialSampler

from lightning_llm.checkpoint import atomic_file
from lightning_llm.data.pretrain import PretrainDataModule
from lightning_llm.modules.pretrain import PretrainModule, next_token_loss, parameter_groups, warmup_cosine
from lightning_llm.scaling import flops_per_token, peak_flops

Batches = list[dict[str, torch.Tensor]]
Run = Callable[[], tuple[list[float], float]]  # one training run: the time after each step, the last loss
ROOT = Path(__file__).resolve().parent.parent
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
now = CLOCKS["wall"]  # the clock every variant reads (main sets it from --clock)


def step_rate(times: list[float], warmup: int, tokens_per_step: int) -> float:
    timed = times[warmup:]
    return (len(timed) - 1) * tokens_per_step / (timed[-1] - timed[0])


def fixed_batches(dm: PretrainDataModule, steps: int) -> Batches:
    """The first `steps` training batches, drawn once: every variant trains on these, in this order."""
    torch.manual_seed(0)
    return [{"input_ids": b["input_ids"], "targets": b["targets"]} for _, b in zip(range(steps), dm.train_dataloader())]


def run_lightning(args, batches: Batches, vocab: int, compile: bool) -> tuple[list[float], float]:
    times, losses = [], []

    class Clock(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(now())
            losses.append(outputs["loss"])

    torch.manual_seed(0)
    module = PretrainModule(args.model, vocab_size=vocab, lr=args.lr, warmup_steps=args.warmup_steps,
                            max_steps=len(batches), compile=compile)
    trainer = Trainer(max_steps=len(batches), precision=args.precision, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                      callbacks=[Clock()], gradient_clip_val=1.0)
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return times, losses[-1].item()


def run_plain(args, batches: Batches, vocab: int) -> tuple[list[float], float]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    module = PretrainModule(args.model, vocab_size=vocab)
    module.configure_model()
    model = module.model.to(device).train()
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.1), lr=args.lr, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, args.warmup_steps, len(batches), 0.1))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed")
    times = []
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast:
            logits = model(input_ids=batch["input_ids"], use_cache=False).logits
        loss = next_token_loss(logits, batch["targets"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(now())
    return times, loss.item()


def run_hf_trainer(args, batches: Batches, vocab: int) -> tuple[list[float], float]:
    from transformers import Trainer as HFTrainer
    from transformers import TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    times, losses = [], []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(now())

        def on_log(self, args, state, control, logs=None, **k):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    rows = [(ids, targets) for b in batches for ids, targets in zip(b["input_ids"], b["targets"])]

    class Rows(Dataset):  # the same rows in the same order; `shift_labels`: the targets as given, no shift
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return {"input_ids": rows[i][0], "labels": rows[i][1], "shift_labels": rows[i][1]}

    class InOrder(HFTrainer):
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    torch.manual_seed(0)
    module = PretrainModule(args.model, vocab_size=vocab)
    module.configure_model()
    with tempfile.TemporaryDirectory() as out:
        training_args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=len(batches[0]["input_ids"]), max_steps=len(batches),
            learning_rate=args.lr, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, lr_scheduler_type="cosine",
            warmup_steps=args.warmup_steps, max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[],
            use_cpu=not torch.cuda.is_available(), bf16=args.precision == "bf16-mixed", dataloader_num_workers=0,
            disable_tqdm=True, seed=0, remove_unused_columns=False,
        )
        trainer = InOrder(model=module.model, args=training_args, train_dataset=Rows(), callbacks=[Clock()])
        trainer.remove_callback(PrinterCallback)  # (it prints every step's log with logging_steps=1)
        trainer.train()
    return times, losses[-1]


class LitGPTWorker:
    """benchmarks/litgpt_pretrain.py in the Python that has litgpt, kept running: one training run per call."""

    def __init__(self, python: str, args, batches: Batches, vocab: int, workdir: str, clock: str = "wall",
                 val_batches: Batches | None = None) -> None:
        files = {"batches": batches, "val_batches": val_batches}
        command = [python, str(ROOT / "benchmarks" / "litgpt_pretrain.py"), "--model", args.model, "--vocab_size", str(vocab),
                   "--block_size", str(args.block_size), "--lr", str(args.lr), "--warmup_steps", str(args.warmup_steps),
                   "--clock", clock, "--threads", str(torch.get_num_threads())]
        for name, value in files.items():
            if value is not None:
                torch.save(value, Path(workdir) / f"{name}.pt")
                command += [f"--{name}", str(Path(workdir) / f"{name}.pt")]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.parameters = None

    def run(self, seed: int = 0, steps: int | None = None) -> dict:
        """One run from `seed` on the first `steps` batches (all by default): its times, losses and parameters."""
        try:
            self.process.stdin.write("run\n" if steps is None else f"run {seed} {steps}\n")
            self.process.stdin.flush()
            line = self.process.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            raise RuntimeError(f"the litgpt worker exited with code {self.process.wait()}; its error is above")
        result = json.loads(line)
        self.parameters = result["parameters"]
        return result

    def __call__(self) -> tuple[list[float], float]:
        result = self.run()
        return result["times"], result["loss"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-5m")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved runs of every variant")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of each run")
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup_steps", type=int, default=10)
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--runs", nargs="+", default=["lightning", "lightning compiled", "plain loop", "hf trainer", "litgpt compiled"],
                        help="variants to run (litgpt compiled needs a Python with litgpt)")
    parser.add_argument("--litgpt_python", default=sys.executable if importlib.util.find_spec("litgpt") else None,
                        help="a Python with litgpt installed (default: this one, when it has litgpt)")
    parser.add_argument("--clock", default="wall", choices=sorted(CLOCKS),
                        help="wall: elapsed time; cpu: the process's CPU time on one thread (steady on a shared machine)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's; 1 under --clock cpu)")
    parser.add_argument("--out", default="benchmarks/results/pretrain_throughput.json")
    args = parser.parse_args()
    if args.clock == "cpu":
        if args.threads not in (None, 1):
            parser.error(f"--clock cpu --threads {args.threads}: CPU time sums every thread's (and counts their "
                         "spin-waits), so it measures one thread only; use --threads 1 or --clock wall")
        args.threads = 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    global now
    now = CLOCKS[args.clock]
    if "litgpt compiled" in args.runs and (args.litgpt_python is None or args.precision != "32-true"):
        print("litgpt compiled: skipped (needs --litgpt_python, and runs fp32 only)")
        args.runs.remove("litgpt compiled")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dm = PretrainDataModule("python-stdlib", vocab_size=4096, block_size=args.block_size, batch_size=args.batch_size)
    dm.setup("fit")
    vocab = len(dm.tokenizer)
    batches = fixed_batches(dm, args.steps)
    tokens_per_step = batches[0]["input_ids"].numel()

    with tempfile.TemporaryDirectory() as workdir:
        runs: dict[str, Run] = {
            "lightning": lambda: run_lightning(args, batches, vocab, compile=False),
            "lightning compiled": lambda: run_lightning(args, batches, vocab, compile=True),
            "plain loop": lambda: run_plain(args, batches, vocab),
            "hf trainer": lambda: run_hf_trainer(args, batches, vocab),
        }
        litgpt = None
        if "litgpt compiled" in args.runs:
            litgpt = runs["litgpt compiled"] = LitGPTWorker(args.litgpt_python, args, batches, vocab, workdir, args.clock)
        last_loss: dict[str, list[float]] = {name: [] for name in args.runs}

        def measure(name: str) -> Callable[[], float]:
            def once() -> float:
                times, loss = runs[name]()
                last_loss[name].append(loss)
                return step_rate(times, args.warmup, tokens_per_step)
            return once

        samples = interleaved({name: measure(name) for name in args.runs}, args.rounds)
        if litgpt is not None:
            litgpt.close()

    module = PretrainModule(args.model, vocab_size=vocab)
    module.configure_model()
    fpt = flops_per_token(module.model.config, args.block_size)
    peak = peak_flops(device, torch.bfloat16 if args.precision == "bf16-mixed" else torch.float32)
    machine = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    baseline = "lightning" if "lightning" in samples else None
    rows = summary(samples, baseline)
    plain = summary(samples, "plain loop") if "plain loop" in samples else None
    print(f"\n{args.model}, block {args.block_size}, batch {args.batch_size}, {args.precision}, {args.steps} steps, "
          f"median [min-max] of {args.rounds} interleaved rounds, {machine}, {torch.get_num_threads()} thread(s), "
          f"{args.clock} clock")
    print(f"{'run':<20}{'tokens/s':>10}{'range':>18}{'MFU':>7}{'vs lightning':>14}{'vs plain':>10}{'last loss':>11}")
    for i, row in enumerate(rows):
        name = row["run"]
        row["tflops"] = row["median"] * fpt / 1e12
        row["mfu"] = row["median"] * fpt / peak if peak else None
        row["last_loss"] = last_loss[name][-1]
        row["last_loss_rounds"] = last_loss[name]
        if plain is not None:
            row["ratio_to_plain loop"] = plain[i]["ratio_to_plain loop"]
        spread = f"[{row['min']:,.0f}-{row['max']:,.0f}]"
        mfu = f"{row['mfu']:.1%}" if row["mfu"] else "-"
        vs_lightning = f"{row['ratio_to_lightning']:.3f}" if baseline else "-"
        vs_plain = f"{row['ratio_to_plain loop']:.3f}" if plain is not None else "-"
        print(f"{name:<20}{row['median']:>10,.0f}{spread:>18}{mfu:>7}{vs_lightning:>14}{vs_plain:>10}{row['last_loss']:>11.4f}")
    if litgpt is not None:
        print(f"litgpt's model: {litgpt.parameters:,} parameters; the project's: {sum(p.numel() for p in module.model.parameters()):,}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    result = {"config": vars(args), "machine": machine, "flops_per_token": fpt, "results": rows}
    with atomic_file(args.out) as f:
        f.write(json.dumps(result, indent=2).encode())
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()

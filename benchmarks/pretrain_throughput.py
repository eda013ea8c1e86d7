"""Tokens/s of the same pretraining three ways: PretrainModule under Lightning's Trainer, a plain
PyTorch loop, and the Hugging Face Trainer. Same model, data, optimizer and steps; the first
`--warmup` steps of each are not timed.

    python benchmarks/pretrain_throughput.py --model llama-5m --steps 40
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer

from lightning_llm.data.pretrain import PretrainDataModule
from lightning_llm.modules.pretrain import PretrainModule, next_token_loss, parameter_groups, warmup_cosine
from lightning_llm.scaling import flops_per_token, peak_flops


def step_rate(times: list[float], warmup: int, tokens_per_step: int) -> float:
    timed = times[warmup:]
    return (len(timed) - 1) * tokens_per_step / (timed[-1] - timed[0])


def run_lightning(args, dm, device) -> list[float]:
    times: list[float] = []

    class Clock(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    torch.manual_seed(0)
    module = PretrainModule(args.model, lr=args.lr, warmup_steps=args.warmup_steps, max_steps=args.steps)
    trainer = Trainer(accelerator=device.type, devices=1, max_steps=args.steps, precision=args.precision, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, num_sanity_val_steps=0, callbacks=[Clock()], gradient_clip_val=1.0)
    trainer.fit(module, datamodule=dm)
    return times


def run_plain(args, dm, device) -> list[float]:
    torch.manual_seed(0)
    module = PretrainModule(args.model, lr=args.lr)
    module.tokenizer = dm.tokenizer
    module.configure_model()
    model = module.model.to(device).train()
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.1), lr=args.lr, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, args.warmup_steps, args.steps, 0.1))
    loader = dm.train_dataloader()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed")
    times = []
    for step, batch in zip(range(args.steps), loader):
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
        times.append(time.perf_counter())
    return times


def run_hf_trainer(args, dm, device) -> list[float]:
    from transformers import Trainer as HFTrainer
    from transformers import TrainerCallback, TrainingArguments

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    class Blocks(torch.utils.data.Dataset):  # HF shifts labels itself: give it inputs as labels
        def __len__(self):
            return len(dm.train_set)

        def __getitem__(self, i):
            ids = dm.train_set[i]["input_ids"]
            return {"input_ids": ids, "labels": ids}

    torch.manual_seed(0)
    module = PretrainModule(args.model)
    module.tokenizer = dm.tokenizer
    module.configure_model()
    training_args = TrainingArguments(
        output_dir=str(Path(args.out).parent / "hf_trainer_tmp"), per_device_train_batch_size=args.batch_size,
        max_steps=args.steps, learning_rate=args.lr, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95,
        lr_scheduler_type="cosine", warmup_steps=args.warmup_steps, max_grad_norm=1.0, logging_steps=10**9,
        save_strategy="no", report_to=[], use_cpu=device.type == "cpu", bf16=args.precision == "bf16-mixed",
        dataloader_num_workers=0, disable_tqdm=True, seed=0,
    )
    HFTrainer(model=module.model, args=training_args, train_dataset=Blocks(), callbacks=[Clock()]).train()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-5m")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of each run")
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup_steps", type=int, default=10)
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--out", default="benchmarks/results/pretrain_throughput.json")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dm = PretrainDataModule("python-stdlib", vocab_size=4096, block_size=args.block_size, batch_size=args.batch_size)
    dm.setup("fit")
    tokens_per_step = args.batch_size * args.block_size

    results = {}
    for name, run in (("lightning", run_lightning), ("plain loop", run_plain), ("hf trainer", run_hf_trainer)):
        results[name] = step_rate(run(args, dm, device), args.warmup, tokens_per_step)

    module = PretrainModule(args.model, vocab_size=dm.vocab_size)
    module.configure_model()
    fpt = flops_per_token(module.model.config, args.block_size)
    peak = peak_flops(device, torch.bfloat16 if args.precision == "bf16-mixed" else torch.float32)
    machine = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    print(f"\n{args.model}, block {args.block_size}, batch {args.batch_size}, {args.precision}, {machine}")
    print(f"{'run':<12}{'tokens/s':>12}{'TFLOP/s':>10}{'MFU':>8}{'vs plain':>10}")
    rows = []
    for name, rate in results.items():
        mfu = rate * fpt / peak if peak else None
        rows.append({"run": name, "tokens_per_sec": rate, "tflops": rate * fpt / 1e12, "mfu": mfu, "ratio_to_plain": rate / results["plain loop"]})
        print(f"{name:<12}{rate:>12,.0f}{rate * fpt / 1e12:>10.3f}{(f'{mfu:.1%}' if mfu else '-'):>8}{rate / results['plain loop']:>10.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"config": vars(args), "machine": machine, "flops_per_token": fpt, "results": rows}, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()

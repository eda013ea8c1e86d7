"""Loss at equal steps of a freshly initialised model under several initialisations, on the same batches.

Every variant trains the same shape on the same batches in the same order with the same optimizer and
schedule (the project's AdamW groups and warmup-cosine, clip 1.0); only the initial weights (or, for
litgpt, the model code and its own initialisation) differ. Each `--steps` value is a run of its own, its
schedule ending at its last step (as `pretrain_throughput.py --steps N` runs): the table gives the loss at
that last step, and the validation loss on held-out blocks after the longest run. Losses are deterministic
(one thread; the machine's load changes the speed, never the numbers); from one seed to the next they move
by a few hundredths, so `--seeds` gives the mean and range over several.

    python benchmarks/init_loss.py --model llama-5m --steps 10 20 30 40 --seeds 0 1 2 --threads 1 \
        --litgpt_python /path/to/venv-with-litgpt/bin/python

The "litgpt" row is litgpt's own model, `initialize_weights` and compiled step, run by
benchmarks/litgpt_pretrain.py in a Python that has litgpt (as in pretrain_throughput.py); without one the
row is left out.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import platform
import statistics
import sys
import tempfile
from typing import Callable

import torch
from transformers import AutoModelForCausalLM

from interleave import interleaved, write_result
from pretrain_throughput import LitGPTWorker
from lightning_llm.data.pretrain import PretrainDataModule
from lightning_llm.models import build_config, build_model, count_parameters
from lightning_llm.modules.pretrain import next_token_loss, parameter_groups, warmup_cosine


def hf_default(config) -> torch.nn.Module:
    """transformers' `_init_weights`: N(0, 0.02) everywhere."""
    return AutoModelForCausalLM.from_config(config)


def small_init(config) -> torch.nn.Module:
    """The small init (Nguyen & Salazar; GPT-NeoX's and litgpt's pretraining rule) on the HF Llama, the project's
    default before this one: N(0, sqrt(2 / 5d)) for embeddings and linears, N(0, 1 / (sqrt(d) L)) for the
    residual projections."""
    model = AutoModelForCausalLM.from_config(config)
    d, layers = config.hidden_size, config.num_hidden_layers
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                residual = name.endswith(("o_proj", "down_proj"))
                module.weight.normal_(0.0, 1 / math.sqrt(d) / layers if residual else math.sqrt(2 / (5 * d)))
    return model


def project(config) -> torch.nn.Module:
    return build_model(config)


VARIANTS: dict[str, Callable | None] = {"hf default": hf_default, "small init (before)": small_init,
                                        "project": project, "litgpt": None}  # (litgpt: its worker process)


def train(build: Callable, config, seed: int, batches: list, val_batches: list, args) -> dict:
    """One run from `seed` over `batches`, the schedule ending at the last: every step's loss, then validation."""
    torch.manual_seed(seed)
    model = build(config)
    model.train()
    optimizer = torch.optim.AdamW(parameter_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, args.warmup_steps, len(batches), 0.1))
    losses = []
    for batch in batches:
        loss = next_token_loss(model(input_ids=batch["input_ids"], use_cache=False).logits, batch["targets"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        val = statistics.fmean(next_token_loss(model(input_ids=b["input_ids"], use_cache=False).logits, b["targets"]).item()
                               for b in val_batches)
    return {"loss": losses[-1], "losses": losses, "val": val, "parameters": count_parameters(model)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-5m")
    parser.add_argument("--steps", type=int, nargs="+", default=[40], help="one run per value, each its own schedule")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--val_batches", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup_steps", type=int, default=10)
    parser.add_argument("--weight_decay", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--litgpt_python", default=sys.executable if importlib.util.find_spec("litgpt") else None,
                        help="a Python with litgpt installed, for the litgpt row (default: this one, when it has litgpt)")
    parser.add_argument("--out", default="benchmarks/results/init_loss.json")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if "litgpt" in args.variants and args.litgpt_python is None:
        print("litgpt: skipped (needs --litgpt_python)")
        args.variants.remove("litgpt")
    if args.weight_decay != 0.1 and "litgpt" in args.variants:
        parser.error("the litgpt worker uses weight decay 0.1; give --weight_decay 0.1 or leave out the litgpt variant")
    dm = PretrainDataModule("python-stdlib", vocab_size=4096, block_size=args.block_size, batch_size=args.batch_size)
    dm.setup("fit")
    config = build_config(args.model, vocab_size=dm.vocab_size)
    # The same batches, in the same order, for every variant and seed (the seed changes the weights only).
    batches = [{"input_ids": b["input_ids"], "targets": b["targets"]} for _, b in zip(range(max(args.steps)), dm.train_dataloader())]
    val_batches = [{"input_ids": b["input_ids"], "targets": b["targets"]} for _, b in zip(range(args.val_batches), dm.val_dataloader())]

    results: dict[str, list[dict]] = {name: [] for name in args.variants}  # per variant: one dict per seed
    with tempfile.TemporaryDirectory() as workdir:
        litgpt = (LitGPTWorker(args.litgpt_python, args, batches, dm.vocab_size, workdir, val_batches=val_batches)
                  if "litgpt" in args.variants else None)

        def variant(name: str) -> Callable[[], float]:
            def run() -> float:
                seed = args.seeds[len(results[name])]
                runs = {}
                for steps in args.steps:
                    if name == "litgpt":
                        result = litgpt.run(seed, steps)
                        runs[steps] = {key: result[key] for key in ("loss", "losses", "val", "parameters")}
                    else:
                        runs[steps] = train(VARIANTS[name], config, seed, batches[:steps], val_batches, args)
                results[name].append({"seed": seed, "runs": runs})
                print(f"  {name}, seed {seed}: loss at the last step of each run "
                      + ", ".join(f"{s}: {r['loss']:.4f}" for s, r in runs.items()), flush=True)
                return runs[max(args.steps)]["val"]
            return run

        # Interleaved by seed (A, B, C, A, B, C, ...), so a variant's runs are spread like the others'.
        interleaved({name: variant(name) for name in args.variants}, rounds=len(args.seeds))
        if litgpt is not None:
            litgpt.close()

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} thread(s)"
    longest = max(args.steps)
    print(f"\n{args.model}, block {args.block_size}, batch {args.batch_size}, lr {args.lr}, seeds {args.seeds}, {machine}")
    print("loss at the last step of a run of N steps (mean over the seeds, [min, max] with several):")
    print(f"{'init':<22}{'params':>11}" + "".join(f"{f'N={s}':>24}" for s in args.steps) + f"{f'val after {longest}':>24}")
    rows = []

    def cell(values: list[float]) -> str:
        return f"{statistics.fmean(values):.4f}" + (f" [{min(values):.3f}, {max(values):.3f}]" if len(values) > 1 else "")

    for name, per_seed in results.items():
        row = {"init": name, "parameters": per_seed[0]["runs"][longest]["parameters"], "seeds": per_seed, "loss_at": {}}
        for steps in args.steps:
            values = [r["runs"][steps]["loss"] for r in per_seed]
            row["loss_at"][steps] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}
        val = [r["runs"][longest]["val"] for r in per_seed]
        row["val"] = {"mean": statistics.fmean(val), "min": min(val), "max": max(val)}
        rows.append(row)
        print(f"{name:<22}{row['parameters']:>11,}"
              + "".join(f"{cell([r['runs'][s]['loss'] for r in per_seed]):>24}" for s in args.steps) + f"{cell(val):>24}")
    write_result(args.out, {"config": vars(args), "machine": machine, "results": rows})
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()

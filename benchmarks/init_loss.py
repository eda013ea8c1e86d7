"""Loss at equal steps of a freshly initialised model under several initialisations, on the same batches.

Every variant trains the same shape on the same batches in the same order with the same optimizer and
schedule (the project's AdamW groups and warmup-cosine, clip 1.0); only the initial weights (or, for
litgpt, the model code and its own initialisation) differ. Loss at equal steps is noisy from one seed to
the next, so each variant runs under several seeds and the table gives the mean and the range over them:
the training loss at the last step and the validation loss on held-out blocks after the last step.

    python benchmarks/init_loss.py --model llama-5m --steps 40 --seeds 0 1 2

The "litgpt" row needs litgpt importable (an optional extra); without it the row is left out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from interleave import interleaved
from lightning_llm.data.pretrain import PretrainDataModule
from lightning_llm.models import build_config, build_model, count_parameters
from lightning_llm.modules.pretrain import next_token_loss, parameter_groups, warmup_cosine


def hf_default(config) -> torch.nn.Module:
    """The project before its own initialisation: transformers' `_init_weights` (N(0, 0.02) everywhere)."""
    return AutoModelForCausalLM.from_config(config)


def project(config) -> torch.nn.Module:
    return build_model(config)


def litgpt_formula(config) -> torch.nn.Module:
    """litgpt's pretraining initialisation (GPT-NeoX's small init) applied to the same HF Llama:
    N(0, sqrt(2 / 5d)) for embeddings and linears, N(0, 1 / (sqrt(d) L)) for the residual projections."""
    model = AutoModelForCausalLM.from_config(config)
    d, layers = config.hidden_size, config.num_hidden_layers
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                residual = name.endswith(("o_proj", "down_proj"))
                module.weight.normal_(0.0, 1 / math.sqrt(d) / layers if residual else math.sqrt(2 / (5 * d)))
    return model


def litgpt_model(config) -> torch.nn.Module | None:
    """litgpt's own GPT of the same shape, initialised by its pretraining script's `initialize_weights`."""
    try:
        from lightning.fabric import Fabric
        from litgpt.config import Config
        from litgpt.model import GPT
        from litgpt.pretrain import initialize_weights
    except ImportError:
        return None
    lit_config = Config(
        block_size=config.max_position_embeddings, vocab_size=config.vocab_size, padded_vocab_size=config.vocab_size,
        n_layer=config.num_hidden_layers, n_head=config.num_attention_heads, n_query_groups=config.num_key_value_heads,
        n_embd=config.hidden_size, intermediate_size=config.intermediate_size, bias=False, rotary_percentage=1.0,
        parallel_residual=False, norm_class_name="RMSNorm", norm_eps=config.rms_norm_eps, mlp_class_name="LLaMAMLP",
        rope_base=int(config.rope_parameters["rope_theta"]) if getattr(config, "rope_parameters", None) else 10000,
    )
    model = GPT(lit_config)
    initialize_weights(Fabric(accelerator="cpu", devices=1), model, lit_config.n_layer, lit_config.n_embd)
    model.transformer.wte.weight = model.lm_head.weight  # litgpt pretrain's tie_embeddings=True: the same shape
    return model


VARIANTS: dict[str, Callable] = {"hf default (before)": hf_default, "project": project,
                                 "litgpt formula on HF llama": litgpt_formula, "litgpt": litgpt_model}


def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits if isinstance(model, PreTrainedModel) else model(ids)  # (litgpt: logits)


def train(build: Callable, config, seed: int, batches: list, val_batches: list, args) -> dict | None:
    torch.manual_seed(seed)
    model = build(config)
    if model is None:
        return None
    model.train()
    optimizer = torch.optim.AdamW(parameter_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, args.warmup_steps, args.steps, 0.1))
    losses = []
    for batch in batches:
        loss = next_token_loss(logits_of(model, batch["input_ids"]), batch["targets"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        val = statistics.fmean(next_token_loss(logits_of(model, b["input_ids"]), b["targets"]).item() for b in val_batches)
    return {"last": losses[-1], "val": val, "losses": losses, "parameters": count_parameters(model)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-5m")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--val_batches", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup_steps", type=int, default=10)
    parser.add_argument("--weight_decay", type=float, default=0.1)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", default="benchmarks/results/init_loss.json")
    args = parser.parse_args()
    dm = PretrainDataModule("python-stdlib", vocab_size=4096, block_size=args.block_size, batch_size=args.batch_size)
    dm.setup("fit")
    config = build_config(args.model, vocab_size=dm.vocab_size)
    # The same batches, in the same order, for every variant and seed (the seed changes the weights only).
    batches = [b for _, b in zip(range(args.steps), dm.train_dataloader())]
    val_batches = [b for _, b in zip(range(args.val_batches), dm.val_dataloader())]

    results: dict[str, list[dict]] = {name: [] for name in args.variants}
    def variant(name: str) -> Callable[[], float]:
        def run() -> float:
            result = train(VARIANTS[name], config, args.seeds[len(results[name])], batches, val_batches, args)
            if result is None:
                return float("nan")
            results[name].append(result)
            print(f"  {name}, seed {args.seeds[len(results[name]) - 1]}: loss at last step {result['last']:.3f}, "
                  f"validation {result['val']:.3f}", flush=True)
            return result["val"]
        return run

    # Interleaved by seed (A, B, C, A, B, C, ...), so a variant's runs are spread like the others'.
    interleaved({name: variant(name) for name in args.variants}, rounds=len(args.seeds))

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    print(f"\n{args.model}, block {args.block_size}, batch {args.batch_size}, {args.steps} steps, lr {args.lr}, "
          f"seeds {args.seeds}, {machine}")
    print(f"{'init':<28}{'params':>11}{'loss at last step':>26}{'validation loss':>26}")
    rows = []
    for name, runs in results.items():
        if not runs:
            print(f"{name:<28}{'(not installed)':>11}")
            continue
        last, val = [r["last"] for r in runs], [r["val"] for r in runs]
        rows.append({"init": name, "parameters": runs[0]["parameters"], "last_mean": statistics.fmean(last),
                     "last_min": min(last), "last_max": max(last), "val_mean": statistics.fmean(val),
                     "val_min": min(val), "val_max": max(val), "runs": runs})
        print(f"{name:<28}{runs[0]['parameters']:>11,}"
              f"{statistics.fmean(last):>10.3f} [{min(last):.3f}, {max(last):.3f}]"
              f"{statistics.fmean(val):>10.3f} [{min(val):.3f}, {max(val):.3f}]")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(args), "machine": machine, "results": rows}, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()

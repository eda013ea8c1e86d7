"""litgpt's compiled pretraining step, on batches given in a file, for benchmarks/pretrain_throughput.py.

Runs in an environment where litgpt is installed (an optional extra beside the project; the project is on
PYTHONPATH for `warmup_cosine` and `parameter_groups`, so the optimizer and schedule are the project's). What
is litgpt's is what `litgpt pretrain` does: its `GPT` model, `initialize_weights`, `torch.compile(model)`
on the whole model, `chunked_cross_entropy`, gradient clipping to norm 1.0 and AdamW fused only on CUDA.
The model has llama-5m's shape (tied embeddings, as the preset; litgpt's Llama configs untie them).

One training run per line "run" (or "run SEED STEPS": the model drawn from that seed, trained on the first
STEPS batches) on stdin; each prints one JSON line: the time after every step, the loss of every step and of
the last, and with `--val_batches` the validation loss after the run. The parent process interleaves these
runs with its own variants (benchmarks/pretrain_throughput.py, benchmarks/init_loss.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from types import SimpleNamespace

import torch
from litgpt.config import Config
from litgpt.model import GPT
from litgpt.pretrain import initialize_weights
from litgpt.utils import chunked_cross_entropy

from lightning_llm.models import PRESETS

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}  # as benchmarks/pretrain_throughput.py's --clock
from lightning_llm.modules.pretrain import parameter_groups, warmup_cosine


def litgpt_config(preset: str, vocab_size: int, block_size: int) -> Config:
    """litgpt's Llama block (RMSNorm, SwiGLU, rotary, no biases) with the preset's dimensions."""
    shape = PRESETS[preset]
    return Config(n_layer=shape["num_hidden_layers"], n_head=shape["num_attention_heads"],
                  n_query_groups=shape["num_key_value_heads"], n_embd=shape["hidden_size"],
                  intermediate_size=shape["intermediate_size"], vocab_size=vocab_size, padded_vocab_size=vocab_size,
                  block_size=block_size, bias=False, mlp_class_name="LLaMAMLP", norm_class_name="RMSNorm",
                  norm_eps=1e-5, rotary_percentage=1.0, parallel_residual=False, rope_base=10000)


def train(args: argparse.Namespace, batches: list[dict[str, torch.Tensor]], seed: int = 0,
          val_batches: list[dict[str, torch.Tensor]] | None = None) -> dict:
    torch.manual_seed(seed)
    config = litgpt_config(args.model, args.vocab_size, args.block_size)
    model = GPT(config)
    initialize_weights(SimpleNamespace(strategy=None), model, n_layer=config.n_layer, n_embd=config.n_embd)
    model.lm_head.weight = model.transformer.wte.weight  # tied, as the preset
    model.train()
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.1), lr=args.lr, betas=(0.9, 0.95),
                                  fused=torch.cuda.is_available())
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, args.warmup_steps, len(batches), 0.1))
    compiled = torch.compile(model)
    times, losses = [], []
    for batch in batches:
        logits = compiled(batch["input_ids"])
        loss = chunked_cross_entropy(logits, batch["targets"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        times.append(CLOCKS[args.clock]())
        losses.append(loss.detach())
    parameters = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    losses = [value.item() for value in losses]  # (read after the timed loop: a read each step would wait for the step)
    result = {"times": times, "loss": losses[-1], "losses": losses, "parameters": parameters}
    if val_batches:  # the validation loss after training, on the model itself (compiling for eval is no part of it)
        model.eval()
        with torch.no_grad():
            result["val"] = sum(chunked_cross_entropy(model(b["input_ids"]), b["targets"]).item()
                                for b in val_batches) / len(val_batches)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", required=True, help="a torch.save'd list of {'input_ids', 'targets'} batches")
    parser.add_argument("--val_batches", help="batches to give the validation loss on after each run (optional)")
    parser.add_argument("--model", default="llama-5m")
    parser.add_argument("--vocab_size", type=int, required=True)
    parser.add_argument("--block_size", type=int, required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--warmup_steps", type=int, required=True)
    parser.add_argument("--clock", default="wall", choices=sorted(CLOCKS))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = torch.load(args.batches)
    val_batches = torch.load(args.val_batches) if args.val_batches else None
    for line in sys.stdin:
        words = line.split()  # "run", or "run SEED STEPS": the first STEPS batches, the schedule over them
        if words[:1] == ["run"]:
            seed, steps = (int(words[1]), int(words[2])) if len(words) == 3 else (0, len(batches))
            print(json.dumps(train(args, batches[:steps], seed, val_batches)), flush=True)


if __name__ == "__main__":
    main()

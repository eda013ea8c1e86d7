"""Benchmark throughput: LightningLM (the callbacks' adapter, on the live model) vs lm-eval's HFLM.

Same model, tokenizer, tasks and batch size; HFLM loads the exported model from disk (what a user
does without the callbacks) and is also timed at its default batch size of 1. The data are
synthetic MMLU-style multiple-choice questions (4 choices, lm-eval's `mmlu_*` template) and
GSM8K-style word problems (lm-eval's `gsm8k` template, greedy generation), written in the hub
datasets' layouts to a temporary directory. After an untimed warm-up round the runs take turns for
`--rounds` rounds (benchmarks/interleave.py); each figure is the median items/s with its range, and a
timing covers the whole `simple_evaluate` call (lm-eval's own overhead included).

    python benchmarks/eval_throughput.py --model llama-5m --questions 128 --problems 16 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sysconfig
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM

from interleave import interleaved, summary, write_result

from lightning_llm.data.tokenizer import train_tokenizer
from lightning_llm.eval import tasks
from lightning_llm.eval.lm_adapter import LightningLM
from lightning_llm.models import build_model


def write_data(root: Path, questions: int, problems: int) -> None:
    rng = random.Random(0)
    mc = root / "mmlu" / "elementary_mathematics"
    mc.mkdir(parents=True)
    with open(mc / "test-00000-of-00001.jsonl", "w") as f:
        for _ in range(questions):
            a, b = rng.randrange(100), rng.randrange(100)
            choices = [a + b, a + b + rng.randint(1, 9), abs(a - b), a * b]
            order = rng.sample(range(4), 4)
            f.write(json.dumps({"question": f"What is {a} + {b}?", "subject": "elementary_mathematics",
                                "choices": [str(choices[i]) for i in order], "answer": order.index(0)}) + "\n")
    gsm = root / "gsm8k" / "main"
    gsm.mkdir(parents=True)
    for split, count in (("test", problems), ("train", 5)):
        with open(gsm / f"{split}-00000-of-00001.jsonl", "w") as f:
            for _ in range(count):
                n, k = rng.randint(2, 9), rng.randint(2, 20)
                f.write(json.dumps({"question": f"A box holds {k} pens. How many pens are in {n} boxes?",
                                    "answer": f"{n} boxes hold {n} * {k} = <<{n}*{k}={n * k}>>{n * k} pens.\n#### {n * k}"}) + "\n")


def timed(lm, spec, args, shots) -> tuple[float, dict]:
    start = time.perf_counter()
    results = simple_evaluate(lm, tasks=[spec()], num_fewshot=shots, bootstrap_iters=0, log_samples=False,
                              gen_kwargs={"max_gen_toks": args.max_gen_toks},
                              task_manager=tasks.task_manager(tasks.BENCHMARK_FOLDERS))
    return time.perf_counter() - start, results["results"]


def items_per_second(lm, spec, args, shots, units: int, scores: dict, key: tuple[str, str]) -> float:
    """One timed evaluation; its results are kept under `key` to compare the runs' scores."""
    seconds, scores[key] = timed(lm, spec, args, shots)
    return units / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-5m")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--questions", type=int, default=128)
    parser.add_argument("--problems", type=int, default=16)
    parser.add_argument("--max-gen-toks", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds after a warm-up; figures are medians")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default="benchmarks/results/eval_throughput.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    tokenizer = train_tokenizer((p.read_text() for p in sorted(stdlib.glob("*.py"))[:60]), args.vocab_size)
    torch.manual_seed(0)
    model = build_model(args.model, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id).to(device).eval()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_data(root, args.questions, args.problems)
        mmlu = tasks.mmlu_configs(root / "mmlu", ["elementary_mathematics"])
        workloads = {  # name: (task spec factory, few-shot, units)
            "multiple choice": (lambda: tasks.mmlu_group(mmlu), 0, args.questions),
            "generation": (lambda: tasks.benchmark_task("gsm8k", root / "gsm8k", 1), 1, args.problems),
        }
        start = time.perf_counter()
        model.save_pretrained(root / "exported")
        tokenizer.save_pretrained(root / "exported")
        hflm = HFLM(pretrained=str(root / "exported"), device=str(device), batch_size=args.batch_size, dtype="float32")
        export_and_load = time.perf_counter() - start
        runs = {
            "LightningLM": LightningLM(model, tokenizer, batch_size=args.batch_size, progress=False),
            "HFLM": hflm,
            "HFLM batch 1": HFLM(pretrained=hflm.model, tokenizer=tokenizer, device=str(device), batch_size=1),
        }
        rows, scores = [], {}
        for workload, (spec, shots, units) in workloads.items():
            variants = {name: partial(items_per_second, lm, spec, args, shots, units, scores, (workload, name))
                        for name, lm in runs.items()}
            print(f"{workload}: warm-up round")
            for measure in variants.values():
                measure()
            for row in summary(interleaved(variants, args.rounds), baseline="HFLM"):
                rows.append({"workload": workload, **row})
    for workload in workloads:
        same = scores[(workload, "LightningLM")] == scores[(workload, "HFLM")]
        print(f"{workload}: LightningLM and HFLM results {'identical' if same else 'DIFFER'}")

    machine = torch.cuda.get_device_name() if device.type == "cuda" else (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads")
    print(f"\n{args.model}, vocab {len(tokenizer)}, batch {args.batch_size}, {machine}")
    print(f"median of {args.rounds} interleaved rounds")
    print(f"{'workload':<17}{'run':<14}{'items/s':>10}{'range':>17}{'vs HFLM':>9}")
    for row in rows:
        spread = f"{row['min']:.2f}-{row['max']:.2f}"
        print(f"{row['workload']:<17}{row['run']:<14}{row['median']:>10.2f}{spread:>17}{row['ratio_to_HFLM']:>9.2f}")
    print(f"HFLM's export + load from disk, paid once per evaluation without the callbacks: {export_and_load:.2f} s")
    write_result(args.out, {"config": vars(args), "machine": machine, "export_and_load_seconds": export_and_load,
                            "unit": "items per second", "results": rows})
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()

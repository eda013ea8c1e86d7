"""Peak memory and time of the loss, forward + backward, for a large vocabulary: the plain loss on the full
logits against the fused chunked loss (`lightning_llm.chunked_loss`) at a few chunk sizes.

Each measurement runs in a fresh process, so its peak is its own: on CUDA the allocator's peak, on the CPU
the process's peak resident memory (ru_maxrss) above what it held once the inputs existed. Variants take
turns (benchmarks/interleave.py); the table gives medians and ranges.

    python benchmarks/chunked_loss.py --vocab 131072 --tokens 4096 --hidden 2048 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from interleave import interleaved, summary, write_result

MiB = 2**20


def measure(args: argparse.Namespace) -> dict:
    """One forward + backward of the loss (a single variant; run in its own process): peak MiB above the inputs, seconds."""
    from lightning_llm.chunked_loss import linear_cross_entropy_sum

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator(device).manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype, generator=generator).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, device=device, dtype=dtype, generator=generator).mul_(0.02)).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,), device=device, generator=generator)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # (kilobytes on Linux)
    start = time.perf_counter()
    if args.chunk:
        loss = linear_cross_entropy_sum(hidden, weight, targets, chunk_size=args.chunk)
    else:
        loss = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"seconds": time.perf_counter() - start, "peak_mib": peak / MiB, "loss": loss.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=131072)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 4096, 1024, 256], help="0: the plain loss")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk", type=int, help=argparse.SUPPRESS)  # (set in the child process)
    parser.add_argument("--out", default="benchmarks/results/chunked_loss.json")
    args = parser.parse_args()
    if args.chunk is not None:
        print(json.dumps(measure(args)))
        return

    runs: dict[str, list[dict]] = {}

    def variant(chunk: int):
        name = "plain" if chunk == 0 else f"chunked {chunk}"
        runs[name] = []

        def run() -> float:
            command = [sys.executable, __file__, f"--vocab={args.vocab}", f"--tokens={args.tokens}",
                       f"--hidden={args.hidden}", f"--dtype={args.dtype}", f"--chunk={chunk}"]
            result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            runs[name].append(result)
            return result["seconds"]
        return name, run

    seconds = interleaved(dict(variant(chunk) for chunk in args.chunks), args.rounds)
    rows = summary(seconds, baseline=next(iter(runs)))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    print(f"\nloss forward + backward: {args.tokens} tokens, vocabulary {args.vocab}, hidden {args.hidden}, "
          f"{args.dtype}, {device}; full logits would be {args.tokens * args.vocab * 4 / MiB:,.0f} MiB in fp32")
    print(f"{'loss':<16}{'peak MiB (median [range])':>30}{'seconds (median [range])':>30}{'vs plain':>10}")
    for row in rows:
        peaks = [r["peak_mib"] for r in runs[row["run"]]]
        row["peak_mib"] = {"median": statistics.median(peaks), "min": min(peaks), "max": max(peaks)}
        row["losses"] = [r["loss"] for r in runs[row["run"]]]
        ratio = next(v for k, v in row.items() if k.startswith("ratio_to_"))
        print(f"{row['run']:<16}{statistics.median(peaks):>12,.0f} [{min(peaks):,.0f}, {max(peaks):,.0f}]"
              f"{row['median']:>14.2f} [{row['min']:.2f}, {row['max']:.2f}]{ratio:>10.2f}")
    write_result(args.out, {"config": vars(args), "device": device, "results": rows})
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()

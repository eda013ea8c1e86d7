"""fp32 matrix products on the CPU: torch's `mm` (the BLAS torch was built with, MKL on x86 wheels) against
oneDNN's fp32 inner product, on the matmul shapes of a llama-5m training step (16 x 128 tokens).

Why: on a CPU the matmuls are three quarters of a small model's training step (`torch.profiler`, README), so
the BLAS sets the step's speed and the share that `torch.compile` can win at all. MKL picks its kernels by the
CPU's vendor; on a CPU where it does not take its AVX-512 path the same products run at about half of what
oneDNN reaches on the same core. This prints GFLOP/s per shape, interleaved, median of `--rounds`, one thread.

    python benchmarks/cpu_gemm.py --rounds 5
"""

from __future__ import annotations

import argparse
import time

import torch
from interleave import interleaved, summary
from record import environment, write_json

# (rows, inner, columns) of llama-5m's products at 2,048 tokens: projections, MLP, LM head; backward's weight
# gradient (inner = tokens).
SHAPES = [(2048, 256, 256), (2048, 256, 688), (2048, 688, 256), (2048, 256, 4096), (256, 2048, 256)]


def gflops(fn, flops: int, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return flops * repeats / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results/cpu_gemm.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    onednn = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
    rows = []
    for m, k, n in SHAPES:
        a, w = torch.randn(m, k), torch.randn(n, k)  # w: (out, in), as nn.Linear holds it
        flops = 2 * m * k * n
        variants = {"torch.mm": lambda: gflops(lambda: torch.mm(a, w.t()), flops, args.repeats)}
        if onednn is not None:
            variants["oneDNN"] = lambda: gflops(lambda: onednn(a, w, None, "none", [], ""), flops, args.repeats)
        for row in summary(interleaved(variants, args.rounds), baseline="torch.mm"):
            rows.append({"shape": [m, k, n], **row})
            print(f"{m:>5} x {k:>4} x {n:>4}  {row['run']:<9} {row['median']:7.1f} GFLOP/s "
                  f"[{row['min']:.1f}-{row['max']:.1f}]  {row.get('ratio_to_torch.mm', 1.0):.2f}x")
    write_json({"config": vars(args), "environment": environment(), "results": rows}, args.out)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()

"""Benchmark attention: this project's `flash_attention` vs torch SDPA vs naive (eager) attention.

For each sequence length, head dim and causal/full: forward and forward+backward time, TFLOP/s, tokens/s
and peak memory, with batch * heads held constant. The peer in the same run is SDPA (its flash backend on
CUDA, its fused CPU kernel on the CPU); naive attention (reference.py's `naive_attention`, the N x N
matrix in memory, as transformers' "eager") shows what the tiling saves. On CUDA it also reproduces the
spirit of the FlashAttention paper's GPT-2 medium table (seq 1024, head dim 64, 16 heads, batch 64).

On the CPU `flash_attention` dispatches to SDPA (the Triton kernels need CUDA), so there the run measures
the dispatch path and the naive-vs-tiled memory curves, not the kernels; the row says which path ran.

Peak memory: on CUDA the allocator's peak above the inputs; on the CPU, which keeps no allocator
statistics, the peak bytes held by tensors that torch operations return during the call (a dispatch mode
tracks them; scratch space inside one operation is not seen).

    python benchmarks/attention.py                            # CUDA: bf16, seq 512..16k, hd 64/128
    python benchmarks/attention.py --seqlens 128 256 512 1024 # CPU: a smaller sweep
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import weakref
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lightning_llm.attention import attention_backend, flash_attention
from lightning_llm.attention.reference import naive_attention

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def lightning_fa2(q, k, v, causal):
    return flash_attention(q, k, v, causal=causal)


def sdpa(q, k, v, causal):
    # On CUDA only the flash backend, the peer the issue names; on the CPU torch's default (its fused kernel).
    backends = [SDPBackend.FLASH_ATTENTION] if CUDA else [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(backends):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def naive(q, k, v, causal):
    return naive_attention(q, k, v, causal=causal)[0]


IMPLEMENTATIONS = {"lightning_fa2": lightning_fa2, "sdpa": sdpa, "naive": naive}


def attention_flops(batch: int, heads: int, seqlen: int, head_dim: int, causal: bool, backward: bool) -> float:
    # Two N x N x d matrix products forward (S = QK^T, O = PV), half of them under a causal mask; the
    # backward pass is counted as 2.5 forwards (five products, as FlashAttention's benchmarks count it).
    forward = 4 * batch * heads * seqlen**2 * head_dim / (2 if causal else 1)
    return forward * (3.5 if backward else 1.0)


def synchronize() -> None:
    if CUDA:
        torch.cuda.synchronize()


def best_seconds(step: Callable[[], None], repeats: int) -> float:
    step()  # warm-up: Triton compiles, caches fill
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        step()
        synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


class _PeakTensorBytes(TorchDispatchMode):
    """Peak bytes held by the storages that torch operations return inside the block (the CPU's stand-in
    for CUDA's allocator statistics)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._storages: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._storages.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            key, nbytes = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
            if key in self._storages or nbytes == 0:
                continue  # a view of a storage already counted
            self._storages.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._free, key, nbytes)
        return out


def peak_bytes(step: Callable[[], None]) -> int:
    if CUDA:
        synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        synchronize()
        return torch.cuda.max_memory_allocated() - before
    with _PeakTensorBytes() as tracker:
        step()
    return tracker.peak


def measure(impl: Callable, batch: int, heads: int, seqlen: int, head_dim: int, causal: bool,
            dtype: torch.dtype, backward: bool, repeats: int) -> dict[str, float] | None:
    """Seconds, TFLOP/s, tokens/s and peak MiB of one configuration; None where it ran out of memory."""
    generator = torch.Generator(DEVICE).manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seqlen, head_dim, generator=generator, device=DEVICE, dtype=dtype)
               .requires_grad_(backward) for _ in range(3))
    do = torch.randn_like(q)

    def step() -> None:
        o = impl(q, k, v, causal)
        if backward:
            torch.autograd.grad(o, (q, k, v), do)

    try:
        seconds = best_seconds(step, repeats)
        memory = peak_bytes(step)
    except torch.OutOfMemoryError:
        return None
    finally:
        if CUDA:
            torch.cuda.empty_cache()
    flops = attention_flops(batch, heads, seqlen, head_dim, causal, backward)
    return dict(ms=seconds * 1e3, tflops=flops / seconds / 1e12, tokens_per_s=batch * seqlen / seconds,
                peak_mib=memory / 2**20)


def sweep(args: argparse.Namespace, dtype: torch.dtype) -> list[dict]:
    rows = []
    for head_dim in args.head_dims:
        heads = args.batch_heads // args.batch
        for causal in (True, False):
            for seqlen in args.seqlens:
                for backward in (False, True):
                    for name in args.impls:
                        result = measure(IMPLEMENTATIONS[name], args.batch, heads, seqlen, head_dim, causal, dtype,
                                         backward, args.repeats)
                        rows.append(dict(impl=name, pass_="fwd+bwd" if backward else "fwd", seqlen=seqlen,
                                         head_dim=head_dim, causal=causal, batch=args.batch, heads=heads,
                                         oom=result is None, **(result or {})))
                        print(format_row(rows[-1]), flush=True)
    return rows


def gpt2_medium_table(args: argparse.Namespace, dtype: torch.dtype) -> list[dict]:
    """The FlashAttention paper's GPT-2 medium attention shape: fwd+bwd runtime and memory, standard vs flash."""
    rows = []
    for name in args.impls:
        result = measure(IMPLEMENTATIONS[name], 64, 16, 1024, 64, True, dtype, True, args.repeats)
        rows.append(dict(impl=name, pass_="fwd+bwd", seqlen=1024, head_dim=64, causal=True, batch=64, heads=16,
                         oom=result is None, **(result or {})))
    return rows


HEADER = f"{'impl':<14}{'pass':<9}{'seq':>6}{'hd':>5}{'causal':>8}{'ms':>10}{'TFLOP/s':>9}{'tokens/s':>12}" \
         f"{'peak MiB':>10}{'vs sdpa':>9}"


def format_row(row: dict, ratio: float | None = None) -> str:
    start = f"{row['impl']:<14}{row['pass_']:<9}{row['seqlen']:>6}{row['head_dim']:>5}{str(row['causal']):>8}"
    if row["oom"]:
        return start + f"{'out of memory':>31}"
    ratio_text = f"{ratio:>9.2f}" if ratio is not None else ""
    return start + (f"{row['ms']:>10.3f}{row['tflops']:>9.3f}{row['tokens_per_s']:>12.0f}{row['peak_mib']:>10.1f}"
                    + ratio_text)


def add_speed_ratios(rows: list[dict]) -> None:
    """Each row's speed over SDPA's on the same configuration (> 1: faster than SDPA)."""
    key = lambda r: (r["pass_"], r["seqlen"], r["head_dim"], r["causal"], r["batch"])  # noqa: E731
    sdpa_ms = {key(r): r["ms"] for r in rows if r["impl"] == "sdpa" and not r["oom"]}
    for row in rows:
        if not row["oom"] and key(row) in sdpa_ms:
            row["speed_vs_sdpa"] = sdpa_ms[key(row)] / row["ms"]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    head_dims = sorted({r["head_dim"] for r in rows})
    fig, axes = plt.subplots(2, len(head_dims), figsize=(6 * len(head_dims), 8), squeeze=False)
    for col, head_dim in enumerate(head_dims):
        for impl in sorted({r["impl"] for r in rows}):
            for causal, style in ((True, "-"), (False, "--")):
                mine = [r for r in rows if r["impl"] == impl and r["head_dim"] == head_dim and r["causal"] == causal
                        and r["pass_"] == "fwd+bwd" and not r["oom"]]
                if not mine:
                    continue
                label = f"{impl} {'causal' if causal else 'full'}"
                axes[0][col].plot([r["seqlen"] for r in mine], [r["tflops"] for r in mine], style, marker="o", label=label)
                axes[1][col].plot([r["seqlen"] for r in mine], [r["peak_mib"] for r in mine], style, marker="o", label=label)
        axes[0][col].set(title=f"forward+backward, head dim {head_dim}", ylabel="TFLOP/s")
        axes[1][col].set(xlabel="sequence length", ylabel="peak memory (MiB)", yscale="log")
        for ax in axes[:, col]:
            ax.set_xscale("log", base=2)
        axes[0][col].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlens", type=int, nargs="+",
                        default=[512, 1024, 2048, 4096, 8192, 16384] if CUDA else [128, 256, 512, 1024])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128] if CUDA else [64])
    parser.add_argument("--batch", type=int, default=2 if CUDA else 1)
    parser.add_argument("--batch-heads", type=int, default=32 if CUDA else 4, help="batch * heads, held constant")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                        default="bfloat16" if CUDA else "float32")
    parser.add_argument("--impls", nargs="+", choices=list(IMPLEMENTATIONS), default=list(IMPLEMENTATIONS))
    parser.add_argument("--repeats", type=int, default=10 if CUDA else 3)
    parser.add_argument("--gpt2-medium", action=argparse.BooleanOptionalAction, default=CUDA,
                        help="also the FlashAttention paper's GPT-2 medium shape (default: on CUDA only)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default="benchmarks/results/attention.json")
    args = parser.parse_args()
    if args.batch_heads % args.batch:
        parser.error(f"--batch-heads {args.batch_heads} is not a multiple of --batch {args.batch}")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    machine = torch.cuda.get_device_name() if CUDA else (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads")
    path = attention_backend(DEVICE)
    print(f"{machine}; {args.dtype}; batch * heads = {args.batch_heads}; lightning_fa2 runs on the {path} path")
    print(HEADER)

    rows = sweep(args, dtype)
    paper = gpt2_medium_table(args, dtype) if args.gpt2_medium else []
    add_speed_ratios(rows)
    add_speed_ratios(paper)
    print(f"\n{machine}; {args.dtype}; lightning_fa2 on the {path} path")
    print(HEADER)
    for row in rows:
        print(format_row(row, row.get("speed_vs_sdpa")))
    if paper:
        print("\nGPT-2 medium attention (FlashAttention paper, Table 3's shape): seq 1024, hd 64, 16 heads, batch 64")
        print(HEADER)
        for row in paper:
            print(format_row(row, row.get("speed_vs_sdpa")))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(args), "machine": machine, "lightning_fa2_path": path,
                               "results": rows, "gpt2_medium": paper}, indent=2))
    plot(rows, out.with_suffix(".png"))
    print(f"written to {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()

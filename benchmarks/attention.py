"""Benchmark attention: this project's `flash_attention` vs torch SDPA vs naive (eager) attention.

For each sequence length, head dim and causal/full: forward and forward+backward time, TFLOP/s, tokens/s
and peak memory, with batch * heads held constant (or, with --total-tokens, batch * seq and heads * head
dim, as the FlashAttention-2 paper's benchmark does). The peers in the same run are SDPA's backends: "sdpa"
is its flash backend on CUDA (its fused kernel on the CPU), "sdpa_cudnn" its cuDNN backend (CUDA only; the
row says why where it cannot run); naive attention (reference.py's `naive_attention`, the N x N matrix in
memory, as transformers' "eager") shows what the tiling saves. The implementations of one configuration
take turns (benchmarks/interleave.py) for --rounds rounds of --repeats calls each; a row is the median
round, with the fastest and slowest beside it. On the Triton path the JSON also records the tile
configuration the autotuner chose for each kernel and key. On CUDA it also reproduces the spirit of the
FlashAttention paper's GPT-2 medium table (seq 1024, head dim 64, 16 heads, batch 64).

On the CPU `flash_attention` dispatches to SDPA (the Triton kernels need CUDA), so there the run measures
the dispatch path and the naive-vs-tiled memory curves, not the kernels; the row says which path ran.

Peak memory: on CUDA the allocator's peak above the inputs; on the CPU, which keeps no allocator
statistics, the peak bytes held by tensors that torch operations return during the call (a dispatch mode
tracks them; scratch space inside one operation is not seen).

    python benchmarks/attention.py                            # CUDA: bf16, seq 512..16k, hd 64/128
    python benchmarks/attention.py --seqlens 1024 2048 4096 8192 16384 --total-tokens 16384   # as gpu.sh
    python benchmarks/attention.py --seqlens 128 256 512 1024 # CPU: a smaller sweep
"""

from __future__ import annotations

import argparse
import sys
import time
import weakref
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from interleave import interleaved, summary
from record import environment, machine, save_figure, write_json

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


def sdpa_cudnn(q, k, v, causal):
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def naive(q, k, v, causal):
    return naive_attention(q, k, v, causal=causal)[0]


IMPLEMENTATIONS = {"lightning_fa2": lightning_fa2, "sdpa": sdpa, "sdpa_cudnn": sdpa_cudnn, "naive": naive}


def attention_flops(batch: int, heads: int, seqlen: int, head_dim: int, causal: bool, backward: bool) -> float:
    # Two N x N x d matrix products forward (S = QK^T, O = PV), half of them under a causal mask; the
    # backward pass is counted as 2.5 forwards (five products, as FlashAttention's benchmarks count it).
    forward = 4 * batch * heads * seqlen**2 * head_dim / (2 if causal else 1)
    return forward * (3.5 if backward else 1.0)


def synchronize() -> None:
    if CUDA:
        torch.cuda.synchronize()


def seconds_per_call(step: Callable[[], None], repeats: int) -> float:
    """Mean seconds of `repeats` back-to-back calls (one round of one implementation)."""
    synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    synchronize()
    return (time.perf_counter() - start) / repeats


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


def attention_step(impl: Callable, batch: int, heads: int, seqlen: int, head_dim: int, causal: bool,
                   dtype: torch.dtype, backward: bool) -> Callable[[], None]:
    """One call of `impl` (and its backward) on fresh random inputs of the configuration."""
    generator = torch.Generator(DEVICE).manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seqlen, head_dim, generator=generator, device=DEVICE, dtype=dtype)
               .requires_grad_(backward) for _ in range(3))
    do = torch.randn_like(q)

    def step() -> None:
        o = impl(q, k, v, causal)
        if backward:
            torch.autograd.grad(o, (q, k, v), do)

    return step


def failure(err: Exception) -> str:
    """Why an implementation has no row for a configuration: out of memory, or its backend cannot run it."""
    if isinstance(err, torch.OutOfMemoryError):
        return "out of memory"
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"[:200]


def measure_configuration(impls: list[str], batch: int, heads: int, seqlen: int, head_dim: int, causal: bool,
                          dtype: torch.dtype, backward: bool, repeats: int, rounds: int) -> list[dict]:
    """One row per implementation: median, fastest and slowest round in ms, TFLOP/s and tokens/s of the
    median, peak MiB; or the reason it did not run. The implementations take turns, round after round."""
    steps, errors = {}, {}
    for name in impls:
        try:
            steps[name] = attention_step(IMPLEMENTATIONS[name], batch, heads, seqlen, head_dim, causal, dtype, backward)
            steps[name]()  # warm-up: Triton compiles and tunes, caches fill
            synchronize()
        except Exception as err:  # recorded: one implementation failing must not hide the others' figures
            steps.pop(name, None)
            errors[name] = failure(err)
    samples = interleaved({name: lambda step=step: seconds_per_call(step, repeats) for name, step in steps.items()},
                          rounds) if steps else {}
    by_name = {row["run"]: row for row in summary(samples)}
    flops = attention_flops(batch, heads, seqlen, head_dim, causal, backward)
    rows = []
    for name in impls:
        row = dict(impl=name, pass_="fwd+bwd" if backward else "fwd", seqlen=seqlen, head_dim=head_dim,
                   causal=causal, batch=batch, heads=heads, oom=errors.get(name) == "out of memory")
        if name in by_name:
            seconds = by_name[name]["median"]
            row.update(ms=seconds * 1e3, ms_min=by_name[name]["min"] * 1e3, ms_max=by_name[name]["max"] * 1e3,
                       tflops=flops / seconds / 1e12, tokens_per_s=batch * seqlen / seconds,
                       peak_mib=peak_bytes(steps[name]) / 2**20)
        else:
            row["error"] = errors[name]
        rows.append(row)
    steps.clear()
    if CUDA:
        torch.cuda.empty_cache()
    return rows


def shape(args: argparse.Namespace, seqlen: int, head_dim: int) -> tuple[int, int]:
    """(batch, heads) of a configuration: batch * heads fixed, or tokens and model width fixed."""
    if args.total_tokens:
        return max(1, args.total_tokens // seqlen), max(1, args.model_dim // head_dim)
    return args.batch, args.batch_heads // args.batch


def sweep(args: argparse.Namespace, dtype: torch.dtype) -> list[dict]:
    rows = []
    for head_dim in args.head_dims:
        for causal in (True, False):
            for seqlen in args.seqlens:
                for backward in (False, True):
                    batch, heads = shape(args, seqlen, head_dim)
                    rows += measure_configuration(args.impls, batch, heads, seqlen, head_dim, causal, dtype,
                                                  backward, args.repeats, args.rounds)
                    for row in rows[-len(args.impls):]:
                        print(format_row(row), flush=True)
    return rows


def gpt2_medium_table(args: argparse.Namespace, dtype: torch.dtype) -> list[dict]:
    """The FlashAttention paper's GPT-2 medium attention shape: fwd+bwd runtime and memory, standard vs flash."""
    return measure_configuration(args.impls, 64, 16, 1024, 64, True, dtype, True, args.repeats, args.rounds)


def tuned_tiles() -> list[dict]:
    """The tile configuration the autotuner chose for each Triton kernel and tuning key in this process."""
    if attention_backend(DEVICE) == "sdpa":
        return []
    from lightning_llm.attention import triton_kernels

    rows = []
    for name in ("_forward_kernel", "_backward_dkdv_kernel", "_backward_dq_kernel"):
        kernel = getattr(triton_kernels, name)
        for key, config in kernel.cache.items():
            # The key: the named arguments, then the dtype of every tensor argument (Q's first).
            named = {name: part for name, part in zip(kernel.keys, key)}
            rows.append(dict(kernel=name.strip("_"), **named, dtype=key[len(kernel.keys)], **config.kwargs,
                             num_warps=config.num_warps, num_stages=config.num_stages))
    return rows


HEADER = f"{'impl':<14}{'pass':<9}{'seq':>6}{'hd':>5}{'causal':>8}{'ms':>10}{'TFLOP/s':>9}{'tokens/s':>12}" \
         f"{'peak MiB':>10}{'vs sdpa':>9}"


def format_row(row: dict, ratio: float | None = None) -> str:
    start = f"{row['impl']:<14}{row['pass_']:<9}{row['seqlen']:>6}{row['head_dim']:>5}{str(row['causal']):>8}"
    if "error" in row:
        return start + f"  {row['error'][:60]}"
    ratio_text = f"{ratio:>9.2f}" if ratio is not None else ""
    return start + (f"{row['ms']:>10.3f}{row['tflops']:>9.3f}{row['tokens_per_s']:>12.0f}{row['peak_mib']:>10.1f}"
                    + ratio_text)


def add_speed_ratios(rows: list[dict]) -> None:
    """Each row's speed over SDPA's on the same configuration (> 1: faster than SDPA)."""
    key = lambda r: (r["pass_"], r["seqlen"], r["head_dim"], r["causal"], r["batch"])  # noqa: E731
    sdpa_ms = {key(r): r["ms"] for r in rows if r["impl"] == "sdpa" and "ms" in r}
    for row in rows:
        if "ms" in row and key(row) in sdpa_ms:
            row["speed_vs_sdpa"] = sdpa_ms[key(row)] / row["ms"]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    head_dims = sorted({r["head_dim"] for r in rows})
    fig, axes = plt.subplots(3, len(head_dims), figsize=(6 * len(head_dims), 12), squeeze=False)
    for col, head_dim in enumerate(head_dims):
        for impl in sorted({r["impl"] for r in rows}):
            for causal, style in ((True, "-"), (False, "--")):
                label = f"{impl} {'causal' if causal else 'full'}"
                for row, pass_, value in ((0, "fwd", "tflops"), (1, "fwd+bwd", "tflops"), (2, "fwd+bwd", "peak_mib")):
                    mine = [r for r in rows if r["impl"] == impl and r["head_dim"] == head_dim
                            and r["causal"] == causal and r["pass_"] == pass_ and "ms" in r]
                    if mine:
                        axes[row][col].plot([r["seqlen"] for r in mine], [r[value] for r in mine], style, marker="o",
                                            label=label)
        axes[0][col].set(title=f"forward, head dim {head_dim}", ylabel="TFLOP/s")
        axes[1][col].set(title=f"forward+backward, head dim {head_dim}", ylabel="TFLOP/s")
        axes[2][col].set(xlabel="sequence length", ylabel="peak memory, forward+backward (MiB)", yscale="log")
        for ax in axes[:, col]:
            ax.set_xscale("log", base=2)
        axes[0][col].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlens", type=int, nargs="+",
                        default=[512, 1024, 2048, 4096, 8192, 16384] if CUDA else [128, 256, 512, 1024])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128] if CUDA else [64])
    parser.add_argument("--batch", type=int, default=2 if CUDA else 1)
    parser.add_argument("--batch-heads", type=int, default=32 if CUDA else 4, help="batch * heads, held constant")
    parser.add_argument("--total-tokens", type=int, default=None,
                        help="instead: batch = this // seq and heads = --model-dim // head dim (FlashAttention-2's sweep)")
    parser.add_argument("--model-dim", type=int, default=2048, help="heads * head dim with --total-tokens")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                        default="bfloat16" if CUDA else "float32")
    parser.add_argument("--impls", nargs="+", choices=list(IMPLEMENTATIONS), default=list(IMPLEMENTATIONS))
    parser.add_argument("--repeats", type=int, default=10 if CUDA else 3, help="calls per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds in which the implementations take turns")
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
    device = machine()
    path = attention_backend(DEVICE)
    sizes = (f"batch * seq = {args.total_tokens}, heads * head dim = {args.model_dim}" if args.total_tokens
             else f"batch * heads = {args.batch_heads}")
    print(f"{device}; {args.dtype}; {sizes}; lightning_fa2 runs on the {path} path")
    print(HEADER)

    rows = sweep(args, dtype)
    paper = gpt2_medium_table(args, dtype) if args.gpt2_medium else []
    add_speed_ratios(rows)
    add_speed_ratios(paper)
    tiles = tuned_tiles()
    if tiles:
        print("\ntile configurations the autotuner chose (key: head dim, sequence bucket, causal, packed, ...):")
        for tile in tiles:
            print(f"  {tile}")
    print(f"\n{device}; {args.dtype}; lightning_fa2 on the {path} path")
    print(HEADER)
    for row in rows:
        print(format_row(row, row.get("speed_vs_sdpa")))
    if paper:
        print("\nGPT-2 medium attention (FlashAttention paper, Table 3's shape): seq 1024, hd 64, 16 heads, batch 64")
        print(HEADER)
        for row in paper:
            print(format_row(row, row.get("speed_vs_sdpa")))

    out = Path(args.out)
    write_json({"config": vars(args), "machine": device, "environment": environment(), "lightning_fa2_path": path,
                "results": rows, "gpt2_medium": paper, "tuned_tiles": tiles}, out)
    plot(rows, out.with_suffix(".png"))
    print(f"written to {out} and {out.with_suffix('.png')}")
    # SDPA's backends may be unavailable on a machine; this project's kernels failing is a failure of the run.
    failed = [r for r in rows + paper if r["impl"] == "lightning_fa2" and "error" in r and not r["oom"]]
    if failed:
        print(f"lightning_fa2 failed in {len(failed)} configurations, first: {failed[0]['error']}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

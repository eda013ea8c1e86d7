"""Attention over packed blocks: per sequence (`flash_attention` with `cu_seqlens`) against a dense
block-diagonal mask over the whole block (what transformers' sdpa attention runs for packed examples).

Forward and backward of one attention layer on a batch of blocks, each filled with sequences of random
lengths (uniform from 1 to 2 x `--mean_length` - 1, as many as fit, the rest of the block a padding
sequence of its own, as the instruction-data packer leaves it). The variants take turns for
`--rounds` rounds (benchmarks/interleave.py); each figure is the median with its range. Beside the
times, the query-key pairs each variant computes: the mask pays for block^2 per block, the
per-sequence path for sum(length^2) (half of each under causal attention where the kernel skips).

    python benchmarks/packed_attention.py --threads 1 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import time

import torch
import torch.nn.functional as F

from interleave import interleaved, summary, write_result

from lightning_llm.attention import flash_attention


def block_lengths(block: int, mean_length: int, rng: random.Random) -> list[int]:
    """Sequence lengths filling one block; what does not fit is a padding sequence at the end."""
    lengths = []
    while True:
        length = rng.randint(1, 2 * mean_length - 1)
        if sum(lengths) + length > block:
            break
        lengths.append(length)
    return lengths + ([block - sum(lengths)] if sum(lengths) < block else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--block", type=int, default=512)
    parser.add_argument("--mean_length", type=int, default=110, help="sft_packing's dialogs average ~110 tokens")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv_heads", type=int, default=4)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="forward+backward passes per timing")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default="benchmarks/results/packed_attention.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rng = random.Random(0)
    lengths = [block_lengths(args.block, args.mean_length, rng) for _ in range(args.batch)]
    flat = [length for row in lengths for length in row]
    tokens = args.batch * args.block
    torch.manual_seed(0)
    q = torch.randn(tokens, args.heads, args.head_dim, requires_grad=True)
    k, v = (torch.randn(tokens, args.kv_heads, args.head_dim, requires_grad=True) for _ in range(2))
    do = torch.randn(q.shape)
    segment = torch.repeat_interleave(torch.arange(len(flat)), torch.tensor(flat)).view(args.batch, args.block)
    mask = (segment[:, :, None] == segment[:, None, :]) & torch.ones(args.block, args.block, dtype=torch.bool).tril()
    cu_seqlens = torch.tensor([0, *flat]).cumsum(0)

    def dense_mask() -> torch.Tensor:
        q4, k4, v4 = (x.view(args.batch, args.block, -1, args.head_dim).transpose(1, 2) for x in (q, k, v))
        out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask[:, None], enable_gqa=args.heads != args.kv_heads)
        return out.transpose(1, 2).reshape(q.shape)

    def per_sequence() -> torch.Tensor:
        return flash_attention(q, k, v, causal=True, cu_seqlens=cu_seqlens)

    def milliseconds(attention) -> float:
        start = time.perf_counter()
        for _ in range(args.repeats):
            torch.autograd.grad(attention(), (q, k, v), do)
        return (time.perf_counter() - start) / args.repeats * 1e3

    variants = {"dense block-diagonal mask": lambda: milliseconds(dense_mask),
                "per sequence": lambda: milliseconds(per_sequence)}
    rows = summary(interleaved(variants, args.rounds), baseline="dense block-diagonal mask")
    pairs = {"dense block-diagonal mask": args.batch * args.block**2, "per sequence": sum(n * n for n in flat)}
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"
    print(f"\n{args.batch} blocks of {args.block}, {len(flat)} sequences (mean {tokens / len(flat):.0f} tokens), "
          f"{args.heads} heads ({args.kv_heads} K/V), head_dim {args.head_dim}, float32, causal, {machine}; "
          f"forward+backward, median of {args.rounds} interleaved rounds")
    print(f"{'variant':<26}{'ms':>9}{'range':>17}{'time vs mask':>14}{'query-key pairs':>17}")
    for row in rows:
        row["query_key_pairs"] = pairs[row["run"]]
        spread = f"{row['min']:.1f}-{row['max']:.1f}"
        print(f"{row['run']:<26}{row['median']:>9.1f}{spread:>17}{row['ratio_to_dense block-diagonal mask']:>14.2f}"
              f"{row['query_key_pairs']:>17,}")
    write_result(args.out, {"config": vars(args), "machine": machine, "lengths": lengths, "unit": "ms", "results": rows})
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()

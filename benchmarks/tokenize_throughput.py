"""Benchmark tokenization into a token file: one process against N worker processes, in MB/s of text.

The peer in the same run is today's single process (`tokenize_workers=1`, the Rust tokenizer free to use
its own threads inside a batch); the variants run interleaved round by round (benchmarks/interleave.py),
and every run's token file is checked to be byte-identical to the single process's. The corpus is the
Python standard library (`python-stdlib`), the tokenizer the default BPE trained on it (cached).

    python benchmarks/tokenize_throughput.py --rounds 3 --workers 2

(Not `benchmarks/tokenize.py`: run as a script, that name would shadow the standard library's `tokenize`,
which the sources import.)
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

from interleave import interleaved, summary, write_result

from lightning_llm.data.pretrain import default_cache_dir
from lightning_llm.data.sources import PYTHON_STDLIB, Source
from lightning_llm.data.tokenizer import trained_tokenizer
from lightning_llm.data.tokens import available_cpus, tokenize_to_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=None,
                        help="worker counts to compare with one process (default: the available CPUs)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--out", default="benchmarks/results/tokenize_throughput.json")
    args = parser.parse_args()
    workers = args.workers or [available_cpus()]
    source = Source(PYTHON_STDLIB)
    tokenizer = trained_tokenizer(source.documents(), args.vocab_size, source.fingerprint(), default_cache_dir())
    counts = [1] + [w for w in workers if w != 1]
    scratch = Path(tempfile.mkdtemp(prefix="tokenize-bench-"))
    reference: dict[str, bytes] = {}

    def run(count: int):
        def measure() -> float:
            path = scratch / f"w{count}.bin"
            result = tokenize_to_file(source, tokenizer, path, workers=count)
            data = path.read_bytes()
            if reference.setdefault("tokens", data) != data:
                raise AssertionError(f"{count} processes wrote another token file than one process")
            path.unlink()
            path.with_suffix(".json").unlink()
            return result.mb_per_s
        return measure

    names = {count: f"{count} process" + ("es" if count > 1 else "") for count in counts}
    samples = interleaved({names[c]: run(c) for c in counts}, args.rounds)
    rows = summary(samples, baseline=names[1])
    text_mb = sum(f.stat().st_size for f in source.files()) / 1e6
    machine = f"{platform.machine()}, {available_cpus()} available CPUs, Linux {platform.release()}"
    print(f"\n{PYTHON_STDLIB}: {text_mb:.1f} MB of text, BPE of {len(tokenizer)} tokens, {args.rounds} rounds; {machine}")
    print(f"{'run':<16}{'median MB/s':>12}{'min':>8}{'max':>8}{'ratio':>8}")
    for row in rows:
        print(f"{row['run']:<16}{row['median']:>12.2f}{row['min']:>8.2f}{row['max']:>8.2f}{row['ratio_to_' + names[1]]:>8.2f}")
    print("token files: byte-identical across the runs")
    write_result(args.out, {"config": vars(args), "machine": machine, "corpus_mb": text_mb, "vocab": len(tokenizer),
                            "unit": "MB/s of UTF-8 text", "results": rows})
    print(f"written to {args.out}")


if __name__ == "__main__":
    sys.exit(main())

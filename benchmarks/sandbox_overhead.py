"""Benchmark the sandbox's cost per run: wall time of a trivial program, confined vs unconfined.

The peer in the same run is the same interpreter started without any confinement (`python -I -c`),
so that the ratio holds on a noisy machine. Rows: the full sandbox (bubblewrap's namespaces, the
memory cgroup, the fresh uid) and its fallback without bubblewrap, interleaved round by round.

    python benchmarks/sandbox_overhead.py --runs 30
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
import warnings
from unittest import mock

from lightning_llm.eval import sandbox
from record import write_json

PROGRAM = "print(sum(range(10)))"


def unconfined(python: str) -> None:
    subprocess.run([python, "-I", "-c", PROGRAM], check=True, capture_output=True)


def confined() -> None:
    result = sandbox.run_python(PROGRAM)
    assert result.passed, result


def confined_without_bubblewrap() -> None:
    with mock.patch.object(sandbox, "_bubblewrap", return_value=(None, "disabled by the benchmark")):
        confined()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--out", default="benchmarks/results/sandbox_overhead.json")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # the fallback warns about the guarantees it lacks, once per run
    python = sandbox.sandbox_python()
    rows = {"unconfined": lambda: unconfined(python), "sandbox": confined,
            "sandbox without bubblewrap": confined_without_bubblewrap}
    times: dict[str, list[float]] = {name: [] for name in rows}
    for run in range(args.runs + 1):  # the first round warms caches and is not counted
        for name, call in rows.items():
            start = time.perf_counter()
            call()
            if run:
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["unconfined"])
    results = [{"run": name, "median_s": statistics.median(t), "min_s": min(t), "ratio_to_unconfined":
                statistics.median(t) / base} for name, t in times.items()]
    isolation = sandbox.run_python(PROGRAM).isolation
    machine = f"{platform.machine()}, {platform.processor() or 'cpu'}, Linux {platform.release()}"
    print(f"\n{args.runs} runs each, interpreter {python}, {machine}")
    print(f"{'run':<28}{'median ms':>10}{'min ms':>9}{'ratio':>7}")
    for row in results:
        print(f"{row['run']:<28}{row['median_s'] * 1e3:>10.1f}{row['min_s'] * 1e3:>9.1f}{row['ratio_to_unconfined']:>7.2f}")
    for name, how in isolation.items():
        print(f"  {name}: {how}")
    write_json({"config": vars(args), "machine": machine, "python": python, "isolation": isolation,
                "results": results}, args.out)
    print(f"written to {args.out}")


if __name__ == "__main__":
    sys.exit(main())

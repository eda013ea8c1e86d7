"""Run benchmark variants interleaved (A, B, C, A, B, C, ...) and summarise each by its median and range.

A variant timed once, in a fixed order, takes whatever load spike lands on it; taking turns spreads a spike over
every variant, and the median of several rounds is what an idle machine reproduces. Each benchmark script calls
`interleaved` with its variants and prints `summary` rows beside the ratio to its baseline.
"""

from __future__ import annotations

import os
import statistics
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any, Callable, Mapping

from record import write_json


def interleaved(variants: Mapping[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Call every variant once per round, in turn, for `rounds` rounds; return each variant's measurements.

    A variant returns one number (tokens/s, seconds, bytes); the order inside a round is the mapping's order.
    """
    if rounds < 1:
        raise ValueError(f"rounds={rounds}: give at least 1 (3 or more for a median that resists one spike)")
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(rounds):
        for name, measure in variants.items():
            samples[name].append(float(measure()))
        print(f"round {round_index + 1}/{rounds}: " + ", ".join(f"{n}={v[-1]:,.4g}" for n, v in samples.items()),
              flush=True)
    return samples


def summary(samples: Mapping[str, list[float]], baseline: str | None = None) -> list[dict]:
    """One row per variant: median, min, max, the rounds, and the median's ratio to the baseline's median."""
    if baseline is not None and baseline not in samples:
        raise ValueError(f"baseline {baseline!r} is not a variant; variants: {sorted(samples)}")
    rows = []
    for name, values in samples.items():
        row = {"run": name, "median": statistics.median(values), "min": min(values), "max": max(values),
               "rounds": list(values)}
        if baseline is not None:
            row["ratio_to_" + baseline] = row["median"] / statistics.median(samples[baseline])
        rows.append(row)
    return rows


def in_fresh_process(results: list[dict], metric: str, function: Callable[..., dict], *args: Any) -> float:
    """Run `function(*args)` in a fresh spawned process, so that its peak memory is its own; append the
    result (a picklable dict) to `results` and return its `metric`: a variant for `interleaved` via partial."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        results.append(pool.submit(function, *args).result())
    return results[-1][metric]


def write_result(path: str | os.PathLike, result: Mapping) -> None:
    """Write a benchmark's JSON result through a temporary sibling (never a half-written file): `record.write_json`."""
    write_json(result, path)

"""`lightning-llm report RUN_DIR`: plots and a short summary of a run, from the CSV logger's metrics.csv.

The run's metrics file is found under RUN_DIR (the newest `metrics.csv`, or the file itself), and the report
goes to `RUN_DIR/report/`: PNG plots (training and validation loss against steps and against tokens, the
learning rate, tokens/s, MFU, benchmark metrics) and `report.md`, a table of steps, tokens, wall time (from
the TensorBoard events beside metrics.csv, when there are some), the best validation loss and its step, the
last throughput and MFU, and the benchmark results. Every file is written through `checkpoint.atomic_file`.
A metric the run did not log has no plot, and the summary says so.

Steps are metrics.csv's own (also TensorBoard's): Lightning counts from 0, so a value logged during or right
after optimizer step k has step k - 1 there. The summary gives both where a person compares with checkpoint
names (`step=6.ckpt`) and the run summary, which count optimizer steps done.
"""

from __future__ import annotations

import csv
import io
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_llm.checkpoint import atomic_file

METRICS_FILE = "metrics.csv"
# Columns of metrics.csv (the names the module and ThroughputCallback log).
TRAIN_LOSS, VAL_LOSS, TOKENS, LR = "train/loss", "val/loss", "train/tokens", "train/lr"
TOKENS_PER_SEC, MFU, BENCH_PREFIX = "perf/tokens_per_sec", "perf/mfu", "bench/"

Series = list[tuple[int, float]]  # (step, value), in the order logged


@dataclass
class Run:
    """The metrics of one run: each column of metrics.csv as its (step, value) points."""

    path: Path
    series: dict[str, Series] = field(default_factory=dict)

    def points(self, name: str) -> Series:
        return self.series.get(name, [])

    def benchmarks(self) -> list[str]:
        """The benchmark metrics logged (`bench/<task>/<metric>`, without their stderr)."""
        return sorted(n for n in self.series if n.startswith(BENCH_PREFIX) and not n.endswith("_stderr"))


def find_metrics(run_dir: str | os.PathLike) -> tuple[Path, list[Path]]:
    """The metrics.csv to report on: `run_dir` itself if it is that file, else the newest one under it
    (a second run in the same folder writes a new `version_N`); also the others found, newest first."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        return run_dir, []
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} does not exist; give a run's folder (its trainer.default_root_dir) "
                                f"or its {METRICS_FILE}")
    found = sorted(run_dir.rglob(METRICS_FILE), key=lambda p: p.stat().st_mtime, reverse=True)
    if not found:
        raise FileNotFoundError(
            f"no {METRICS_FILE} under {run_dir}: the report reads the CSV logger's file, written by a run whose config "
            "names no logger (TensorBoard and CSV then) or a lightning.pytorch.loggers.CSVLogger"
        )
    return found[0], found[1:]


def read_metrics(path: str | os.PathLike) -> Run:
    """Each column of a Lightning CSV logger's metrics.csv as (step, value) points (empty cells skipped).

    The logger writes whole lines: a file that does not end in a newline was cut by a kill while it logged,
    and its last row (its values possibly cut short) is left out, with a warning. Any other row that is not
    one number or nothing per column is an error naming its line."""
    run = Run(Path(path))
    with open(path, newline="") as f:
        text = f.read()
    reader = csv.DictReader(io.StringIO(text))
    rows = [(reader.line_num, row) for row in reader]
    if rows and not text.endswith(("\n", "\r")):
        warnings.warn(f"{path}:{rows[-1][0]}: the last row is incomplete (the run was stopped while logging it) and "
                      f"is left out: {rows[-1][1]}", stacklevel=2)
        rows.pop()
    for line, row in rows:
        try:
            if None in row or None in row.values():  # (more cells than columns, or fewer)
                raise ValueError
            step = int(float(row["step"]))
            points = [(name, float(text)) for name, text in row.items() if name not in ("step", "epoch") and text != ""]
        except ValueError:
            raise ValueError(f"{path}:{line}: a row that is not one number or nothing per column ({row}); "
                             "is the file a Lightning CSVLogger's metrics.csv?") from None
        for name, value in points:
            run.series.setdefault(name, []).append((step, value))
    return run


def best(points: Series) -> tuple[int, float] | None:
    """The (step, value) of the lowest finite value."""
    finite = [(step, value) for step, value in points if math.isfinite(value)]
    return min(finite, key=lambda point: point[1]) if finite else None


def tokens_at(run: Run, steps: Sequence[int]) -> list[float] | None:
    """Tokens trained on by each step, interpolated between the steps where `train/tokens` was logged
    (None without that column)."""
    import numpy as np

    known = run.points(TOKENS)
    if not known:
        return None
    x, y = zip(*sorted(known))
    return list(np.interp(steps, x, y))


def wall_time(folder: Path) -> float | None:
    """Seconds from the first to the last TensorBoard event in `folder` (the logger starts with the fit and
    writes at each log), or None without event files there."""
    files = sorted(folder.glob("events.out.tfevents.*"))
    if not files:
        return None
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    times = [event.wall_time for path in files for event in EventFileLoader(str(path)).Load()]
    return max(times) - min(times) if times else None


def save_png(figure: Any, path: Path) -> None:
    """Write a matplotlib figure as a PNG through `atomic_file` (never in place)."""
    with atomic_file(path) as f:
        figure.savefig(f, format="png", dpi=110)


def plot(path: Path, title: str, xlabel: str, curves: dict[str, tuple[Sequence[float], Sequence[float]]],
         log_y: bool = False) -> None:
    """One PNG: each curve (label -> (x, y)) on shared axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(6.4, 4))
    for label, (x, y) in curves.items():
        ax.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3, label=label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    if log_y:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    if len(curves) > 1:
        ax.legend()
    figure.tight_layout()
    try:
        save_png(figure, path)
    finally:
        plt.close(figure)


def write_plots(run: Run, out: Path) -> list[Path]:
    """The run's plots in `out`, one per metric group that was logged; returns the files written."""
    written = []

    def draw(name: str, title: str, xlabel: str, curves: dict[str, tuple[Sequence[float], Sequence[float]]]) -> None:
        curves = {label: xy for label, xy in curves.items() if len(xy[0])}
        if curves:
            plot(out / name, title, xlabel, curves)
            written.append(out / name)

    losses = {label: run.points(name) for label, name in (("train", TRAIN_LOSS), ("validation", VAL_LOSS))}
    draw("loss_vs_step.png", "loss", "step", {label: _xy(points) for label, points in losses.items()})
    if run.points(TOKENS):
        draw("loss_vs_tokens.png", "loss", "tokens", {
            label: (tokens_at(run, [s for s, _ in points]), [v for _, v in points]) for label, points in losses.items()})
    draw("learning_rate.png", "learning rate", "step", {"lr": _xy(run.points(LR))})
    draw("tokens_per_sec.png", "throughput (tokens/s)", "step", {"tokens/s": _xy(run.points(TOKENS_PER_SEC))})
    draw("mfu.png", "model FLOPs utilization", "step", {"MFU": _xy(run.points(MFU))})
    draw("benchmarks.png", "benchmarks", "step",
         {name.removeprefix(BENCH_PREFIX): _xy(run.points(name)) for name in run.benchmarks()})
    return written


def _xy(points: Series) -> tuple[list[int], list[float]]:
    return [s for s, _ in points], [v for _, v in points]


def summary(run: Run, plots: Sequence[Path]) -> str:
    """The markdown summary of a run."""

    def at(step: int) -> str:
        return f"step {step}: optimizer step {step + 1}"

    def last(name: str, fmt: str) -> str:
        points = run.points(name)
        return f"{points[-1][1]:{fmt}} ({at(points[-1][0])})" if points else "not logged"

    steps = [s for points in run.series.values() for s, _ in points]
    lowest = best(run.points(VAL_LOSS))
    seconds = wall_time(run.path.parent)
    rows = [
        ("metrics file", str(run.path)),
        ("steps", f"{max(steps) + 1:,} (the last step logged: {max(steps):,})" if steps else "none logged"),
        ("tokens", f"{run.points(TOKENS)[-1][1]:,.0f}" if run.points(TOKENS) else "not logged"),
        ("wall time", f"{seconds:,.1f} s (first to last TensorBoard event)" if seconds is not None
         else "not known (no TensorBoard events beside metrics.csv)"),
        ("last training loss", last(TRAIN_LOSS, ".6g")),
        ("best validation loss", f"{lowest[1]:.6g} ({at(lowest[0])})" if lowest else "not logged"),
        ("last validation loss", last(VAL_LOSS, ".6g")),
        ("last tokens/s", last(TOKENS_PER_SEC, ",.0f")),
        ("last MFU", last(MFU, ".4g") if run.points(MFU)
         else "not logged (ThroughputCallback logs it where the device's peak FLOP/s is known: GPUs, not CPUs)"),
    ]
    rows += [(name.removeprefix(BENCH_PREFIX), last(name, ".4g")) for name in run.benchmarks()]
    lines = ["# Run report", "", "| | |", "| --- | --- |", *(f"| {label} | {value} |" for label, value in rows), ""]
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] if plots else ["No metric to plot."]
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> tuple[Path, list[Path], list[Path]]:
    """Plots and `report.md` of the run in `run_dir`, in `out` (default `<run_dir>/report`).

    Returns the metrics file read, the other metrics files found (older runs), and the files written."""
    path, others = find_metrics(run_dir)
    run = read_metrics(path)
    out = Path(out) if out is not None else (Path(run_dir) if Path(run_dir).is_dir() else path.parent) / "report"
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(run, out)
    markdown = out / "report.md"
    with atomic_file(markdown) as f:
        f.write(summary(run, plots).encode())
    return path, others, [*plots, markdown]

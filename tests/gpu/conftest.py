"""tests/gpu/: the checks that need CUDA. Without CUDA they skip.

`benchmarks/gpu.sh` runs this folder first. Its dry run (`gpu.sh --dry-run`, which CI runs) sets
LIGHTNING_LLM_GPU_DRY_RUN=1: then the same tests run on the CPU with tiny shapes (the kernels under
Triton's interpreter, TRITON_INTERPRET=1), so the script and the tests are known to work before a GPU is
at hand. With LIGHTNING_LLM_GPU_REPORT=path, each test's outcome and duration are written there as JSON.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from gpu_support import CUDA, DRY_RUN

from lightning_llm.checkpoint import atomic_file

HERE = Path(__file__).resolve().parent
_outcomes: list[dict] = []


@pytest.fixture(autouse=True)
def _needs_cuda() -> None:
    if not CUDA and not DRY_RUN:
        pytest.skip("needs CUDA (on the CPU, `benchmarks/gpu.sh --dry-run` runs these with tiny shapes)")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # One row per test of this folder (pytest calls this hook for every test of the session): its call's
    # outcome, or the setup's when setup failed or skipped it.
    if (HERE.parents[1] / report.nodeid.split("::")[0]).resolve().parent != HERE:
        return
    if report.when == "call" or report.outcome != "passed":
        row = {"test": report.nodeid, "outcome": report.outcome, "seconds": round(report.duration, 3)}
        if report.outcome == "skipped" and isinstance(report.longrepr, tuple):
            row["reason"] = report.longrepr[2]
        elif report.failed:
            row["error"] = report.longreprtext[-2000:]
        _outcomes.append(row)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = os.environ.get("LIGHTNING_LLM_GPU_REPORT")
    if not path:
        return
    # (the device and versions are in environment.json beside it, written by gpu.sh)
    report = {"device": torch.cuda.get_device_name() if CUDA else "cpu", "dry_run": DRY_RUN,
              "exit_status": int(exitstatus), "tests": _outcomes}
    with atomic_file(path) as f:
        f.write(json.dumps(report, indent=2).encode())

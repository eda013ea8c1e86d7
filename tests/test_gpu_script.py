"""benchmarks/gpu.sh, the one-command GPU run, known to work before a GPU is at hand: its dry run (the same
steps on the CPU with tiny shapes, the kernels under Triton's interpreter) passes every step and writes
JSON files that parse and hold the rows expected, and PNG plots; a step that fails is reported, the next
ones still run, and the exit status says so."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_llm.modules.pretrain import PretrainModule

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["environment", "tests", "attention", "mfu"]


def run_script(*args: str, python: str = sys.executable, timeout: float = 1800) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": python}
    env.pop("TRITON_INTERPRET", None)  # the dry run sets it itself
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_dry_run_passes_every_step_and_writes_its_results(tmp_path):
    out = tmp_path / "gpu"
    result = run_script("--dry-run", "--out", str(out))
    report = result.stdout[-8000:] + result.stderr[-3000:]
    assert result.returncode == 0, report

    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True
    assert [s["step"] for s in summary["steps"]] == STEPS
    assert all(s["status"] == "ok" and 0 < s["seconds"] <= s["budget_seconds"] for s in summary["steps"]), summary
    for name in STEPS:
        assert f"=== {name}: ok in " in result.stdout  # the elapsed time per step is printed

    environment = json.loads((out / "environment.json").read_text())
    assert environment["device"] == "cpu" and environment["torch"] and environment["triton"]
    assert "cuda" in environment  # None on a CPU-only torch, the CUDA version on a GPU

    tests = json.loads((out / "tests.json").read_text())
    assert tests["dry_run"] is True and tests["exit_status"] == 0
    outcomes = {row["test"].split("::")[0].split("/")[-1] for row in tests["tests"] if row["outcome"] == "passed"}
    assert outcomes == {"test_cuda_attention_kernel.py", "test_cuda_attention_hf.py", "test_cuda_qlora.py",
                        "test_cuda_precision.py"}
    assert all(row["outcome"] == "passed" for row in tests["tests"]), tests["tests"]

    attention = json.loads((out / "attention.json").read_text())
    assert attention["lightning_fa2_path"] == "triton-interpreter"
    rows = attention["results"]
    configurations = {(r["seqlen"], r["head_dim"], r["causal"], r["pass_"]) for r in rows}
    assert configurations == {(s, 64, c, p) for s in (33, 64) for c in (True, False) for p in ("fwd", "fwd+bwd")}
    for impl in ("lightning_fa2", "sdpa"):
        mine = [r for r in rows if r["impl"] == impl]
        assert len(mine) == len(configurations)
        assert all(r["ms_min"] <= r["ms"] <= r["ms_max"] and r["tflops"] > 0 for r in mine)
    # cuDNN has no CPU kernel: its rows say why instead of giving a figure
    assert all("error" in r for r in rows if r["impl"] == "sdpa_cudnn")
    assert {(t["kernel"], t["HEAD_DIM"]) for t in attention["tuned_tiles"]} >= {("forward_kernel", 64),
                                                                                  ("backward_dkdv_kernel", 64)}
    assert attention["environment"]["device"] == "cpu"

    mfu = json.loads((out / "mfu.json").read_text())["results"]
    assert [(r["attention"], r["compiled"]) for r in mfu] == [
        ("sdpa", False), ("lightning_fa2", False), ("sdpa", True), ("lightning_fa2", True)]
    compile_available = "compile" in inspect.signature(PretrainModule).parameters
    for row in mfu:
        if row["compiled"] and not compile_available:
            assert row["status"].startswith("not available")
        else:
            assert row["status"] == "ok" and row["tokens_per_s"] > 0 and row["mfu"] is None  # no CPU peak known

    for plot in ("attention.png", "mfu.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not any(path.name.startswith(("summary.json.", "environment.json.")) for path in out.iterdir())


def test_a_failing_step_is_reported_and_the_others_still_run(tmp_path):
    # `false` as the Python: every step fails at once; each is reported, the run goes on and exits 1.
    out = tmp_path / "gpu"
    result = run_script("--dry-run", "--out", str(out), python="false", timeout=120)
    assert result.returncode == 1
    summary = json.loads((out / "summary.json").read_text())
    assert [s["step"] for s in summary["steps"]] == STEPS
    assert all(s["status"] == "failed" and s["error"].startswith("exit status 1") for s in summary["steps"])
    for name in STEPS:
        assert f"!!! step {name} failed: exit status 1" in result.stdout
    assert result.stdout.rstrip().splitlines()[-2].split()[:2] == ["total", "failed"]
    assert sorted(path.name for path in out.iterdir()) == sorted([f"{name}.log" for name in STEPS] + ["summary.json"])


def test_unknown_arguments_are_refused():
    result = run_script("--dryrun", timeout=30)
    assert result.returncode == 2 and "unknown argument '--dryrun'" in result.stderr

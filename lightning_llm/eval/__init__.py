"""Evaluation: the lm-eval model adapter and the code-execution sandbox.

The modules that import lm-eval (`lm_adapter`, `harness`, `run`, `tasks`) need the `eval` extra; `sandbox`
and `code_eval` do not. This package's own import needs neither.
"""

# lm-eval's folders of the four benchmarks: indexing only these takes a fraction of a second,
# indexing all of lm-eval's tasks takes seconds.
BENCHMARK_FOLDERS = ("mmlu/default", "arc", "gsm8k", "humaneval")


def check_limit(limit: float) -> int | float:
    """`limit` as lm-eval takes it: a count of documents (a whole number >= 1, returned as an int) or a
    fraction of them (0 < f < 1); anything else raises ValueError naming it.

    lm-eval reads a limit >= 1 as `int(limit)`: 2.5 would evaluate 2 documents, and 1.0 one, silently.
    """
    if isinstance(limit, bool) or not isinstance(limit, (int, float)):
        raise ValueError(f"limit must be a count (an int >= 1) or a fraction in (0, 1), got {limit!r}")
    if 0 < limit < 1:
        return limit
    if limit >= 1 and (isinstance(limit, int) or limit.is_integer()):  # (inf is not)
        return int(limit)
    raise ValueError(f"limit must be a count (an int >= 1) or a fraction in (0, 1), got {limit!r}")

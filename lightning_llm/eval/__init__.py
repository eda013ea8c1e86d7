"""Evaluation: the lm-eval model adapter and the code-execution sandbox.

The modules that import lm-eval (`lm_adapter`, `harness`, `run`, `tasks`) need the `eval` extra; `sandbox`
and `code_eval` do not. This package's own import needs neither.
"""

# lm-eval's folders of the four benchmarks: indexing only these takes a fraction of a second,
# indexing all of lm-eval's tasks takes seconds.
BENCHMARK_FOLDERS = ("mmlu/default", "arc", "gsm8k", "humaneval")

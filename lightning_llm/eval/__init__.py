"""Evaluation: the lm-eval model adapter and the code-execution sandbox."""

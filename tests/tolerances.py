"""Tolerances derived from the arithmetic, for tests that compare two computations of one result.

Two computations of the same value in floating point (one process against several, one kernel against
another, a batch against its micro-batches) differ only in the order of their roundings. Different CPUs
(SSE/AVX2/AVX-512 on x86-64, NEON/SVE on aarch64) and thread counts change that order too, so a tolerance
must bound the effect of ANY order, not the one seen here:

- a sum of n terms, reordered: |difference| <= 2 (n - 1) u sum|x_i| (each partial sum is rounded once,
  with unit roundoff u = 2^-p for a p-bit significand), so the bound is relative to the terms' magnitudes,
  not to the (possibly cancelling) result;
- Adam divides each gradient element by its own running magnitude: rounding noise d on an element whose
  gradient g is small moves that element's step by about lr * d / |g|, up to 2 lr when the sign flips.
  No elementwise bound holds for all elements; what holds is a bound for all but a small fraction of
  them (those whose gradient cancels to below the noise), and a hard bound of 2 lr per step for those.
"""

from __future__ import annotations

import math

import torch

# Unit roundoff u = 2^-p, p the significand's bits including the implicit one (torch.finfo(dtype).eps / 2).
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def reordered_sum_rtol(dtype: torch.dtype, terms: int) -> float:
    """Bound on |sum in one order - sum in another| / sum|x_i| for `terms` terms of `dtype` (worst case)."""
    return 2 * max(terms - 1, 1) * UNIT_ROUNDOFF[dtype]


def loss_atol(dtype: torch.dtype, logit_bound: float = 8.0) -> float:
    """Cross-entropy of two runs whose logits agree to their `dtype` rounding: each logit within u |z| of
    the exact one, so two runs' logits within 2 u |z|; cross-entropy (log-sum-exp minus the target logit)
    moves by at most twice the largest logit change: 4 u max|z|. `logit_bound`: max|z|, below 8 for the
    tests' tiny presets over a few steps: a fresh model's residual branches start at zero (models.init_stds),
    so its logits are the final norm of a token's embedding against the tied embeddings, largest for the token
    itself, |e| sqrt(d) ~ std d = 5.1 for the tiny preset (measured up to 6.5 at initialisation). Under
    transformers' init at std 0.02 (the precision helpers' TinyLM) max|z| stays below 2: pass 2.0."""
    return 4 * UNIT_ROUNDOFF[dtype] * logit_bound


def adam_update_rtol(dtype: torch.dtype, terms: int) -> float:
    """Bound on |w_a - w_b| / |w_b - w_0| over all weights, after Adam steps whose gradients (sums of ~`terms`
    terms) carry `dtype` rounding noise of ~sqrt(terms) u: a fraction f = 2 sqrt(terms) u of the elements
    lies within the noise of zero and may step the other way (2 lr apart), the rest agree closely: 2 sqrt(f)."""
    return 2 * math.sqrt(2 * math.sqrt(terms) * UNIT_ROUNDOFF[dtype])


def assert_adam_steps_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], *, lr_sum: float,
                            step_rtol: float = 1e-3, outlier_fraction: float = 0.01) -> None:
    """Weights after AdamW steps taken from gradients that differ only by fp32 rounding (summation order).

    Elements whose gradient is at least ~1/step_rtol times the rounding noise (most of them: fp32 noise
    on a sum of n terms is ~sqrt(n) u = 2e-6 of the terms for n = 1000) step within step_rtol * lr of each
    other, so all but `outlier_fraction` of the elements (counted over all tensors together) must be within
    step_rtol * lr_sum. The rest have gradients near zero, where rounding decides the step (a fraction
    ~2 sqrt(n) u / step_rtol ~ 0.4% of Gaussian-like gradients); they may differ by up to Adam's step
    bound, 2 lr per step. `lr_sum`: the sum of the learning rates of the steps taken (warm-up included).
    """
    assert actual.keys() == expected.keys() and actual
    far, total = 0, 0
    for name, value in actual.items():
        diff = (value.double() - expected[name].double()).abs()
        assert diff.max() <= 2 * lr_sum, f"{name}: a weight differs by {diff.max():.3g} > 2 x lr_sum = {2 * lr_sum:.3g}"
        far += int((diff > step_rtol * lr_sum).sum())
        total += diff.numel()
    assert far <= outlier_fraction * total, (
        f"{far} of {total} elements differ by more than {step_rtol} x lr_sum = {step_rtol * lr_sum:.3g}; at most "
        f"{outlier_fraction:.0%} may (gradients near zero, whose Adam step rounding decides)")

"""The warmup + cosine schedule against transformers' `get_cosine_with_min_lr_schedule_with_warmup`: the same
values from the end of warmup to max_steps; the two differences that keep the project's own (warmup that
starts above 0, a floor after max_steps) are the ones its comment names."""

from __future__ import annotations

import pytest
import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from lightning_llm.modules.pretrain import warmup_cosine


@pytest.mark.parametrize("warmup, total, ratio", [(10, 100, 0.1), (3, 7, 0.0), (0, 50, 0.25), (25, 1000, 0.1)])
def test_the_schedule_is_transformers_cosine_with_a_warmup_one_step_ahead(warmup, total, ratio):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    (theirs,) = get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, total, min_lr_rate=ratio).lr_lambdas
    ours = [warmup_cosine(step, warmup, total, ratio) for step in range(total + 20)]
    assert ours[warmup:total + 1] == [theirs(step) for step in range(warmup, total + 1)]  # bit for bit
    assert ours[:warmup] == [theirs(step + 1) for step in range(warmup)]  # theirs trains its first step at rate 0
    assert warmup == 0 or theirs(0) == 0 < ours[0]
    assert ours[total:] == [ratio] * 20 and theirs(total + 10) > ratio  # theirs rises again past the end

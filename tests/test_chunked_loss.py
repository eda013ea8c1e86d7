"""The fused chunked output projection + cross-entropy against the plain loss on the full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_llm.chunked_loss import linear_cross_entropy_sum, output_head
from lightning_llm.models import build_model
from lightning_llm.modules.pretrain import PretrainModule
from tolerances import reordered_sum_rtol


def plain_and_bounds(hidden, weight, bias, targets):
    """The plain loss and gradients in fp32, and how far any fp32 computation of them may stray.

    Every rounding on the way is a sum taken in some order: a logit sums `hidden` products, the
    log-sum-exp sums `vocab` exponentials, the loss sums the tokens, d/dhidden sums over the vocabulary
    and d/dweight over the tokens. A reordered sum of n fp32 terms errs by at most r = 2 (n - 1) u times
    the sum of the terms' magnitudes; with n the deepest of these reductions, each result is bounded by
    r times the magnitudes along its path (computed exactly, in fp64). A logit's error (r times
    m = sum_k |h_k w_k|) moves the softmax p by up to 2 r max(m) p, hence the `2 m p` terms.
    """
    h, w = hidden.detach().double(), weight.detach().double()
    logits = F.linear(h, w, None if bias is None else bias.detach().double())
    keep = (targets != -100).double()[:, None]
    p = logits.softmax(-1) * keep
    grad = (p - F.one_hot(targets.clamp(min=0), w.shape[0]).double() * keep)
    m = (h.abs() @ w.abs().T).amax(-1, keepdim=True)  # max over the vocabulary of a logit's magnitudes
    lse = logits.logsumexp(-1, keepdim=True)
    r = reordered_sum_rtol(torch.float32, max(h.shape[1], w.shape[0], h.shape[0]))
    spread = grad.abs() + 2 * m * p
    bounds = {"loss": r * float(((2 * m + lse.abs() + (lse - logits).abs().amax(-1, keepdim=True)) * keep).sum()),
              "hidden": r * (spread @ w.abs()), "weight": r * (spread.T @ h.abs())}
    args = [hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()]
    loss = F.cross_entropy(F.linear(*args, bias), targets, reduction="sum")
    loss.backward()
    return loss.detach(), args[0].grad, args[1].grad, bounds


@pytest.mark.parametrize("tokens, vocab, chunk", [(37, 101, 8), (64, 96, 64), (5, 33, 100)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_loss_and_gradients_equal_the_plain_cross_entropy(tokens, vocab, chunk, with_bias):
    # Odd sizes: chunks that do not divide the tokens, a chunk larger than the batch, a vocabulary
    # that is no multiple of anything; every third target ignored.
    generator = torch.Generator().manual_seed(tokens + vocab)
    hidden = torch.randn(tokens, 24, generator=generator)
    weight = torch.randn(vocab, 24, generator=generator) * 0.5
    bias = torch.randn(vocab, generator=generator) if with_bias else None
    targets = torch.randint(0, vocab, (tokens,), generator=generator)
    targets[::3] = -100
    want_loss, want_hidden, want_weight, bound = plain_and_bounds(hidden, weight, bias, targets)

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = linear_cross_entropy_sum(h, w, targets, bias, chunk_size=chunk)
    (loss * 2.5).backward()  # backward scales the gradients by the incoming gradient

    assert abs(loss.item() - want_loss.item()) <= bound["loss"]
    assert ((h.grad - 2.5 * want_hidden).abs() <= 2.5 * bound["hidden"]).all()
    assert ((w.grad - 2.5 * want_weight).abs() <= 2.5 * bound["weight"]).all()
    assert h.grad[::3].abs().max() == 0  # ignored tokens get no gradient


def test_all_targets_ignored_is_zero_loss_and_zero_gradients():
    h, w = torch.randn(6, 8, requires_grad=True), torch.randn(10, 8, requires_grad=True)
    loss = linear_cross_entropy_sum(h, w, torch.full((6,), -100), chunk_size=4)
    loss.backward()
    assert loss.item() == 0 and h.grad.abs().max() == 0 and w.grad.abs().max() == 0


def module_loss_and_grads(module, batch):
    module.zero_grad(set_to_none=True)
    loss = module.loss(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["tied", "untied", "lora"])
def test_the_module_loss_is_the_same_chunked_or_plain(kind):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    plain = PretrainModule("tiny", loss_chunk_size=0)
    chunked = PretrainModule("tiny", loss_chunk_size=29)  # 29 divides neither the 2 x 23 tokens nor the vocabulary
    tied = kind != "untied"
    plain.model = build_model("tiny", vocab_size=301, tie_word_embeddings=tied)
    if kind == "lora":  # the decoder's output reached through PEFT's wrapper
        plain.model = get_peft_model(plain.model, LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    chunked.model = plain.model
    ids = torch.randint(0, 301, (2, 24))
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:].clone()}
    batch["targets"][0, :5] = -100
    want_loss, want_grads = module_loss_and_grads(plain, batch)
    loss, grads = module_loss_and_grads(chunked, batch)
    assert grads.keys() == want_grads.keys() and any(name.endswith("lm_head.weight") for name in grads) == (kind == "untied")
    # Both differ from the exact values only by reordered fp32 sums (see plain_and_bounds), whose
    # deepest reduction here is the weight gradient's sum over 2 x 23 tokens times 64 hidden units
    # carried back through the 2 layers: bounded norm-wise, relative to the gradient's own norm.
    rtol = reordered_sum_rtol(torch.float32, 46 * 64 * 2)
    torch.testing.assert_close(loss, want_loss, rtol=rtol, atol=0)
    for name, grad in grads.items():
        assert (grad - want_grads[name]).norm() <= rtol * want_grads[name].norm(), name


def test_a_head_the_fused_loss_cannot_compute_is_refused():
    from peft import LoraConfig, get_peft_model

    model = build_model("tiny")
    adapted = get_peft_model(build_model("tiny"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert output_head(adapted) is adapted.get_output_embeddings()  # adapters elsewhere: fine
    on_head = get_peft_model(build_model("tiny", tie_word_embeddings=False), LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="plain torch.nn.Linear.*loss_chunk_size=0"):
        output_head(on_head)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        output_head(model)
    with pytest.raises(ValueError, match="loss_chunk_size must be"):
        PretrainModule("tiny", loss_chunk_size=-1)


def test_a_chunked_loss_is_refused_where_the_loss_does_not_come_from_the_head():
    """A mixture-of-experts model's router terms come with the whole logits: `loss_chunk_size` there is an
    error naming the value and the fix, never silently the plain loss."""
    module = PretrainModule("tiny-moe", loss_chunk_size=8)
    with pytest.raises(ValueError, match=r"loss_chunk_size=8 is not supported under a mixture-of-experts model.*loss_chunk_size=0"):
        module.configure_model()

"""A tiny Llama with attn_implementation="lightning_fa2" against the same model with "sdpa".

These tests run on whatever path `flash_attention` takes in this process, which each test records: in a
plain CPU run that is the SDPA dispatch path (the registration, padding, packing and KV-cache handling of
`registry.py`), and `test_attention.py::test_kernels_under_triton_interpreter` runs this file again in a
child process with TRITON_INTERPRET=1, where every attention call goes through the Triton kernels. On
CUDA they run the compiled kernels. float32 throughout, so the two implementations agree to rounding.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from lightning_llm.attention import ATTN_IMPLEMENTATION, attention_backend, lightning_attention_forward
from lightning_llm.models import build_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VOCAB = 256


def twin_models():
    """The same random weights, once with transformers' sdpa attention and once with this project's."""
    torch.manual_seed(0)
    reference = build_model("tiny", vocab_size=VOCAB, attn_implementation="sdpa").to(DEVICE)
    flash = build_model("tiny", vocab_size=VOCAB, attn_implementation=ATTN_IMPLEMENTATION).to(DEVICE)
    flash.load_state_dict(reference.state_dict())
    return reference, flash


def tokens(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def assert_backend_ran(model) -> None:
    attention = model.model.layers[0].self_attn
    assert attention.attention_backend == attention_backend(DEVICE)


def test_logits_and_gradients_match_sdpa():
    reference, flash = twin_models()
    ids = tokens(2, 37)
    logits_ref, logits = reference(ids).logits, flash(ids).logits
    assert_backend_ran(flash)
    torch.testing.assert_close(logits, logits_ref, atol=1e-5, rtol=1e-5)
    targets = tokens(2, 37, seed=1)
    F.cross_entropy(logits_ref.flatten(0, 1), targets.flatten()).backward()
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    for (name, p_ref), p in zip(reference.named_parameters(), flash.parameters()):
        scale = p_ref.grad.abs().max().item()
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-5 * max(scale, 1e-3), rtol=1e-4, msg=name)


def test_training_steps_match_sdpa():
    reference, flash = twin_models()
    ids = tokens(2, 33)
    losses = {}
    for name, model in (("sdpa", reference), (ATTN_IMPLEMENTATION, flash)):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses[name] = []
        for _ in range(3):
            loss = F.cross_entropy(model(ids[:, :-1]).logits.flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[name].append(loss.item())
    assert losses["sdpa"][-1] < losses["sdpa"][0]  # the steps do train (on one batch)
    assert losses[ATTN_IMPLEMENTATION] == pytest.approx(losses["sdpa"], rel=1e-5)


def test_padding_mask_is_honoured():
    # Left padding: the padded batch's real tokens must equal the unpadded runs of the same examples.
    reference, flash = twin_models()
    ids = tokens(2, 29)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    logits = flash(ids, attention_mask=mask).logits
    assert_backend_ran(flash)
    torch.testing.assert_close(logits[0], reference(ids[:1]).logits[0], atol=1e-5, rtol=1e-5)
    # Positions restart after the padding, as generation with left padding does.
    positions = torch.arange(23, device=DEVICE).unsqueeze(0)
    alone = reference(ids[1:, 6:], position_ids=positions).logits[0]
    padded = flash(ids, attention_mask=mask, position_ids=torch.cat(
        [torch.zeros(1, 6, dtype=torch.long, device=DEVICE), positions], 1).expand(2, -1)).logits[1, 6:]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


def test_registered_in_both_registries_so_the_padding_mask_arrives(monkeypatch):
    # Without an AttentionMaskInterface entry transformers would hand the attention function mask=None.
    assert AttentionInterface()[ATTN_IMPLEMENTATION] is lightning_attention_forward
    assert ATTN_IMPLEMENTATION in AttentionMaskInterface()
    received = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        received.append(attention_mask)
        return lightning_attention_forward(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, ATTN_IMPLEMENTATION, spy)
    _, flash = twin_models()
    ids = tokens(2, 11)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    flash(ids, attention_mask=mask)
    assert len(received) == flash.config.num_hidden_layers
    assert all(m is not None and torch.equal(m.bool(), mask.bool()) for m in received)
    received.clear()
    flash(ids)  # no padding: transformers passes no mask and the kernel runs dense
    assert received == [None] * flash.config.num_hidden_layers


def test_packed_examples_do_not_attend_to_each_other():
    # One row holding three examples, told apart by position_ids that restart: equal to three separate runs.
    reference, flash = twin_models()
    lengths = [20, 1, 16]
    ids = tokens(1, sum(lengths))
    position_ids = torch.cat([torch.arange(n, device=DEVICE) for n in lengths]).unsqueeze(0)
    packed = flash(ids, position_ids=position_ids).logits[0]
    assert_backend_ran(flash)
    separate = torch.cat([reference(part).logits[0] for part in ids.split(lengths, dim=1)])
    torch.testing.assert_close(packed, separate, atol=1e-5, rtol=1e-5)


def test_greedy_generation_with_kv_cache_matches_sdpa():
    # Decoding feeds one query against a growing cache: the causal mask must align the last query with
    # the last key.
    reference, flash = twin_models()
    prompt = tokens(2, 7)
    expected = reference.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    generated = flash.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, expected)


def test_attention_dropout_is_refused():
    model = build_model("tiny", vocab_size=VOCAB, attn_implementation=ATTN_IMPLEMENTATION, attention_dropout=0.1)
    model.to(DEVICE).train()
    with pytest.raises(ValueError, match="attention_dropout"):
        model(tokens(1, 8))

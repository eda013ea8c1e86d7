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

from transformers import AttentionInterface, StaticCache
from transformers.masking_utils import AttentionMaskInterface

from lightning_llm.attention import ATTN_IMPLEMENTATION, attention_backend, lightning_attention_forward
from lightning_llm.attention.reference import naive_attention
from lightning_llm.attention.registry import valid_keys_mask
from _precision_helpers import draw_residual_branches
from lightning_llm.models import build_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VOCAB = 256


def twin_models():
    """The same random weights, once with transformers' sdpa attention and once with this project's."""
    torch.manual_seed(0)
    reference = draw_residual_branches(build_model("tiny", vocab_size=VOCAB, attn_implementation="sdpa")).to(DEVICE)
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


def test_attention_sinks_are_refused_not_ignored():
    # GPT-OSS adds a learned sink logit per head to every softmax (`s_aux`); the kernel has none, and ignoring
    # it changed the logits by as much as their own scale (measured: 2.67 against max |logit| 3.10).
    from transformers import GptOssConfig

    config = GptOssConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_local_experts=2,
                          num_experts_per_tok=1, max_position_embeddings=64, sliding_window=64,
                          layer_types=["full_attention"], rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    model = build_model(config, attn_implementation=ATTN_IMPLEMENTATION).to(DEVICE)
    with pytest.raises(ValueError, match=r"s_aux.*attn_implementation='eager'"):
        model(tokens(1, 8))


WINDOW = 8


def sliding_window_twins():
    """A Mistral with a sliding window of 8 (head dim 24, 2 query heads on 1 KV head), with sdpa and with ours."""
    from transformers import MistralConfig

    config = MistralConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=24, max_position_embeddings=64,
                           sliding_window=WINDOW)
    torch.manual_seed(0)
    reference = draw_residual_branches(build_model(config, attn_implementation="sdpa")).to(DEVICE)
    flash = build_model(config, attn_implementation=ATTN_IMPLEMENTATION).to(DEVICE)
    flash.load_state_dict(reference.state_dict())
    return reference, flash


def test_a_sliding_window_that_no_sequence_reaches_is_plain_causal_attention():
    # transformers' window lets position i see j when i - j < sliding_window: sequences of at most 8 tokens
    # never reach past it, and such calls must equal sdpa's windowed attention (dense, padded, packed, decoding).
    reference, flash = sliding_window_twins()
    ids = tokens(2, WINDOW)
    assert_logits_close(flash(ids).logits, reference(ids).logits, flash.config)
    assert_backend_ran(flash)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    real = mask.bool()
    assert_logits_close(flash(ids, attention_mask=mask).logits[real], reference(ids, attention_mask=mask).logits[real],
                        flash.config)
    packed = tokens(1, 2 * WINDOW)  # two documents of 8 tokens in one 16-token row
    positions = torch.arange(WINDOW, device=DEVICE).repeat(2).unsqueeze(0)
    separate = torch.cat([reference(part).logits[0] for part in packed.split(WINDOW, dim=1)])
    assert_logits_close(flash(packed, position_ids=positions).logits[0], separate, flash.config)
    # Generating past the window: transformers' sliding-window caches (dynamic and static) keep the last 8 keys,
    # so each decoding step attends over at most 8 and runs; the tokens are sdpa's.
    prompt = tokens(2, 4)
    for cache in (None, "static"):
        options = dict(max_new_tokens=3 * WINDOW, do_sample=False, pad_token_id=0, cache_implementation=cache)
        assert torch.equal(flash.generate(prompt, **options), reference.generate(prompt, **options)), cache


def test_a_sliding_window_a_sequence_would_reach_is_refused():
    _, flash = sliding_window_twins()
    fix = r"sliding_window=8 only on causal sequences of at most 8 tokens.*has a sequence of 9 keys.*'sdpa'"
    with pytest.raises(ValueError, match=fix):
        flash(tokens(1, WINDOW + 1))
    positions = torch.cat([torch.arange(7), torch.arange(WINDOW + 1)]).unsqueeze(0).to(DEVICE)  # documents 7 and 9
    with pytest.raises(ValueError, match=fix):
        flash(tokens(1, 16), position_ids=positions)
    mask = torch.ones(2, WINDOW + 1, dtype=torch.long, device=DEVICE)
    mask[1, :2] = 0  # (the mask's length is what counts: conservative where padding shortens a row)
    with pytest.raises(ValueError, match=fix):
        flash(tokens(2, WINDOW + 1), attention_mask=mask)


def test_logit_soft_capping_is_refused_naming_eager():
    from transformers import Gemma2Config

    config = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, attn_logit_softcapping=50.0,
                          layer_types=["full_attention"])
    model = build_model(config, attn_implementation=ATTN_IMPLEMENTATION).to(DEVICE)
    with pytest.raises(ValueError, match=r"soft-capping \(got softcap=50.0\).*attn_implementation='eager'"):
        model(tokens(1, 8))


@pytest.mark.parametrize("name", ["s_aux", "sinks", "position_bias", "indices", "block_indices"])
def test_score_modifiers_are_refused_in_a_direct_call(name):
    module = torch.nn.Module()
    module.is_causal = True
    q, k, v = (torch.randn(1, 2, 5, 8, device=DEVICE) for _ in range(3))
    lightning_attention_forward(module, q, k, v, None, **{name: None})  # absent (None) is no modifier
    with pytest.raises(ValueError, match=name):
        lightning_attention_forward(module, q, k, v, None, **{name: torch.zeros(2, device=DEVICE)})


# A StaticCache preallocates max_cache_len slots and hands attention the whole buffer; only the first
# q_offset + q_len slots hold tokens. Two shapes: the tiny preset (head_dim 16, 4 query heads on 2 KV heads,
# batch 3) and an odd one (head_dim 15, 3 query heads on 1 KV head, batch 2).
STATIC_SHAPES = {"tiny": dict(), "odd": dict(hidden_size=45, num_attention_heads=3, num_key_value_heads=1,
                                              intermediate_size=91)}
STATIC_BATCH = {"tiny": 3, "odd": 2}


def eager_twins(shape: str):
    torch.manual_seed(0)
    overrides = dict(vocab_size=VOCAB, **STATIC_SHAPES[shape])
    reference = draw_residual_branches(build_model("tiny", attn_implementation="eager", **overrides)).to(DEVICE)
    flash = build_model("tiny", attn_implementation=ATTN_IMPLEMENTATION, **overrides).to(DEVICE)
    flash.load_state_dict(reference.state_dict())
    return reference, flash


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, config) -> None:
    # Both sides are float32 and differ only in summation order. A float32 dot product of n terms is off by at
    # most n * eps times the sum of its terms' magnitudes; the longest reduction in a layer is the MLP's
    # intermediate_size and each layer adds its own, so eps * intermediate_size * layers, relative to the
    # logits' scale, bounds the difference (~4.6e-5 of it for the tiny preset; measured: under 1e-6).
    bound = torch.finfo(torch.float32).eps * config.intermediate_size * config.num_hidden_layers
    torch.testing.assert_close(actual, expected, rtol=0, atol=bound * expected.abs().max().item())


def left_padded(batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = tokens(batch, seq, seed=3)
    mask = torch.ones_like(ids)
    for row in range(1, batch):
        mask[row, :2 * row + 1] = 0  # row 1 has 3 pads, row 2 has 5
    return ids.masked_fill(mask == 0, 0), mask


def static_cache_run(model, ids, mask, steps: int, slots: int) -> list[torch.Tensor]:
    """Prefill `ids` into a StaticCache of `slots` slots, then decode `steps` greedy tokens; every step's logits."""
    cache = StaticCache(config=model.config, max_cache_len=slots)
    positions = None if mask is None else (mask.cumsum(1) - 1).clamp(min=0)
    logits = [model(ids, attention_mask=mask, position_ids=positions, cache=cache).logits]
    for _ in range(steps):
        next_ids = logits[-1][:, -1:].argmax(-1)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(next_ids)], 1)
            positions = positions[:, -1:] + 1
        logits.append(model(next_ids, attention_mask=mask, position_ids=positions, cache=cache).logits)
    return logits


@pytest.mark.parametrize("shape", list(STATIC_SHAPES))
@pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "left-padding"])
def test_static_cache_prefill_and_decode_match_eager(shape, padded):
    # A 9-token prefill into an 11-slot buffer, then two decode steps that fill it; without a mask the
    # attention function gets the whole buffer, so it must learn the valid length from the cache.
    reference, flash = eager_twins(shape)
    batch = STATIC_BATCH[shape]
    ids, mask = left_padded(batch, 9) if padded else (tokens(batch, 9), None)
    expected = static_cache_run(reference, ids, mask, steps=2, slots=11)
    actual = static_cache_run(flash, ids, mask, steps=2, slots=11)
    assert_backend_ran(flash)
    real = slice(None) if mask is None else mask.bool()  # padded queries are 0 in flash attention, any in eager
    assert_logits_close(actual[0][real], expected[0][real], flash.config)
    for got, want in zip(actual[1:], expected[1:]):
        assert_logits_close(got, want, flash.config)


def test_valid_keys_mask_cuts_an_unfilled_buffer_in_a_direct_call():
    # The attention function alone, as transformers calls it: queries of a 9-token prefill, keys of an
    # 11-slot buffer whose last 2 slots hold garbage; against naive causal attention over the 9 real keys.
    torch.manual_seed(0)
    module = torch.nn.Module()
    module.is_causal = True
    q = torch.randn(2, 4, 9, 16, device=DEVICE)
    k, v = (torch.randn(2, 2, 11, 16, device=DEVICE) * 10 for _ in range(2))
    for q_len, q_offset in ((9, 0), (1, 9), (1, 10)):  # prefill, then two decode steps that fill the buffer
        valid = q_offset + q_len
        mask = valid_keys_mask(2, q_len, 11, q_offset=torch.tensor(q_offset), device=DEVICE)
        # A full buffer needs no mask: dense attention over all 11 keys.
        assert (mask is None) if valid == 11 else (mask.shape == (2, valid) and mask.all())
        out, _ = lightning_attention_forward(module, q[:, :, :q_len], k, v, mask)
        expected, _ = naive_attention(q[:, :, :q_len].double(), k[:, :, :valid].double(), v[:, :, :valid].double())
        torch.testing.assert_close(out.double(), expected.transpose(1, 2), atol=1e-5, rtol=1e-5)
    assert valid_keys_mask(2, 9, 9) is None  # a dynamic cache's keys are all real: dense attention


@pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "left-padding"])
def test_static_cache_generation_matches_eager(padded):
    # transformers' own loop (the odd shape is covered by the direct prefill and decode test above, which costs
    # less under the Triton interpreter)
    reference, flash = eager_twins("tiny")
    batch = STATIC_BATCH["tiny"]
    ids, mask = left_padded(batch, 9) if padded else (tokens(batch, 9), torch.ones(batch, 9, dtype=torch.long))
    options = dict(attention_mask=mask.to(DEVICE), max_new_tokens=3, do_sample=False, pad_token_id=0,
                   cache_implementation="static", output_logits=True, return_dict_in_generate=True)
    expected, actual = reference.generate(ids, **options), flash.generate(ids, **options)
    assert torch.equal(actual.sequences, expected.sequences)
    for got, want in zip(actual.logits, expected.logits):
        assert_logits_close(got, want, flash.config)

"""scaling.py: FLOPs per token against torch's FLOP counter, and the Chinchilla planner against the paper."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lightning_llm.models import build_model
from lightning_llm.scaling import chinchilla_plan, flops_per_token

# Hoffmann et al. 2022, Table 3: parameters, FLOPs, tokens.
CHINCHILLA_TABLE_3 = [
    (400e6, 1.92e19, 8.0e9), (1e9, 1.21e20, 20.2e9), (10e9, 1.23e22, 205.1e9),
    (67e9, 5.76e23, 1.5e12), (175e9, 3.85e24, 3.7e12), (280e9, 9.90e24, 5.9e12),
    (520e9, 3.43e25, 11.0e12), (1e12, 1.27e26, 21.2e12), (10e12, 1.30e28, 216.2e12),
]


@pytest.mark.parametrize("params, flops, tokens", CHINCHILLA_TABLE_3)
def test_chinchilla_table_3(params, flops, tokens):
    by_size = chinchilla_plan(params=params)
    assert by_size.compute == pytest.approx(flops, rel=0.05)
    assert by_size.tokens == pytest.approx(tokens, rel=0.05)
    by_budget = chinchilla_plan(compute=flops)
    assert by_budget.params == pytest.approx(params, rel=0.05)
    assert by_budget.tokens == pytest.approx(tokens, rel=0.05)
    assert by_budget.compute == pytest.approx(6 * by_budget.params * by_budget.tokens)


def test_plan_rejects_bad_input():
    with pytest.raises(ValueError, match="exactly one"):
        chinchilla_plan(compute=1e20, params=1e9)
    with pytest.raises(ValueError, match="must be a finite number > 0"):
        chinchilla_plan(compute=-1.0)


@pytest.mark.parametrize("kind, value", [("compute", float("inf")), ("params", float("inf")), ("compute", float("nan")),
                                         ("params", 1e200), ("compute", 1e-320)])
def test_plan_refuses_values_it_cannot_compute_rather_than_print_inf_or_nan(kind, value):
    # inf printed N = inf, D = nan; 1e200 parameters overflowed the budget, 1e-320 FLOPs gave a zero N (an
    # OverflowError and a ZeroDivisionError with no word of which value)
    with pytest.raises(ValueError, match=f"{kind}"):
        chinchilla_plan(**{kind: value})
    near = chinchilla_plan(**{kind: 1e20})  # an ordinary value still plans, every figure finite
    assert all(0 < x < float("inf") for x in (near.params, near.tokens, near.compute))


@pytest.mark.parametrize("seq_len", [16, 128])
def test_flops_per_token_matches_counted_flops(seq_len):
    """6N + attention term against torch's count of a forward+backward pass (eager attention: its matmuls are counted)."""
    model = build_model("tiny", vocab_size=512, attn_implementation="eager")
    x = torch.randint(0, 512, (2, seq_len))
    with FlopCounterMode(display=False) as counter:
        model(x).logits.float().sum().backward()
    counted = counter.get_total_flops() / x.numel()
    # The counter credits the embedding's backward nothing and the LM head's input-grad matmul fully,
    # like the formula; the remaining gap is elementwise work neither counts.
    assert flops_per_token(model.config, seq_len) == pytest.approx(counted, rel=0.02)


@pytest.mark.parametrize("spec, overrides, targets", [
    ("tiny", dict(tie_word_embeddings=False), ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    ("tiny", {}, ["q_proj", "v_proj"]),
    ("tiny", dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=1, intermediate_size=100), ["o_proj", "down_proj"]),
])
def test_lora_flops_per_token_leave_out_the_frozen_weights_gradients(spec, overrides, targets):
    """Frozen weights get no weight gradient: 4 FLOPs per parameter, not 6 (6N counted LoRA's work 1.45x on llama-5m)."""
    from peft import LoraConfig, get_peft_model

    from lightning_llm.scaling import training_flops_per_token

    model = build_model(spec, vocab_size=512, attn_implementation="eager", **overrides)
    assert training_flops_per_token(model, 32) == flops_per_token(model.config, 32)  # all trainable: 6N + attention
    model = get_peft_model(model, LoraConfig(r=4, target_modules=targets))
    seq_len = 32
    x = torch.randint(0, 512, (2, seq_len))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=x).logits.float().sum().backward()
    counted = counter.get_total_flops() / x.numel()
    # The count keeps the input gradients autograd skips below the lowest trainable weight: at most those of its
    # layer, 2 per matmul parameter of the layer (each adapter's too) and its attention's backward (QK^T and PV:
    # 8 * heads * head_dim * seq_len).
    config = model.config
    layer = next(m for name, m in model.named_modules() if name.endswith("layers.0"))
    layer_matmuls = sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
    head_dim = config.hidden_size // config.num_attention_heads
    skipped_at_most = 2 * layer_matmuls + 8 * config.num_attention_heads * head_dim * seq_len
    assert 0 <= training_flops_per_token(model, seq_len) - counted <= skipped_at_most
    assert flops_per_token(config, seq_len) - counted > skipped_at_most  # what 6N gave: outside the bound


def test_frozen_mixture_of_experts_has_no_flops_count_rather_than_a_wrong_one():
    from lightning_llm.scaling import training_flops_per_token

    model = build_model("tiny-moe", vocab_size=512)
    assert training_flops_per_token(model, 16) == flops_per_token(model.config, 16)
    model.get_input_embeddings().weight.requires_grad_(False)
    assert training_flops_per_token(model, 16) is None


# Names as torch.cuda.get_device_name reports them, and the data sheets' dense peaks (half the "with sparsity"
# figures); fp32 matmuls are TF32 only when torch's float32 matmul precision allows it ("highest" is torch's default).
DATA_SHEET = [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, "highest", 989.4e12), ("NVIDIA H100 PCIe", torch.float16, "highest", 756.5e12),
    ("NVIDIA H100 NVL", torch.bfloat16, "highest", 835.5e12), ("NVIDIA H200 NVL", torch.bfloat16, "highest", 835.5e12),
    ("NVIDIA H200", torch.bfloat16, "highest", 989.4e12),
    ("NVIDIA A100-SXM4-80GB", torch.float32, "high", 156e12), ("NVIDIA A100-SXM4-80GB", torch.float32, "highest", 19.5e12),
    ("NVIDIA H100 80GB HBM3", torch.float32, "highest", 66.9e12),
    # "L4" is a prefix of L40S and L40, which have 3x and 1.5x its peak
    ("NVIDIA L4", torch.bfloat16, "highest", 121e12), ("NVIDIA L40S", torch.bfloat16, "highest", 362.05e12),
    ("NVIDIA L40", torch.float16, "highest", 181e12),
    ("Tesla V100-SXM2-16GB", torch.float16, "highest", 125e12), ("Tesla V100-PCIE-32GB", torch.float16, "highest", 112e12),
    ("Tesla V100-SXM2-16GB", torch.float32, "high", 15.7e12),  # no TF32 before Ampere
    ("Tesla V100-SXM2-16GB", torch.bfloat16, "highest", None), ("NVIDIA GeForce RTX 3090", torch.bfloat16, "highest", None),
    ("NVIDIA GH200 480GB", torch.bfloat16, "highest", None),  # not an H200: not in the table, no guess
]


@pytest.mark.parametrize("name, dtype, matmul_precision, peak", DATA_SHEET)
def test_peak_flops_by_device_name_and_dtype(monkeypatch, name, dtype, matmul_precision, peak):
    from lightning_llm.scaling import peak_flops

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: matmul_precision)
    assert peak_flops("cuda:0", dtype) == peak
    assert peak_flops("cpu", dtype) is None


def test_a_plot_killed_mid_write_leaves_the_old_one(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from lightning_llm.scaling import chinchilla_plan, plot_plan

    out = tmp_path / "plan.png"
    plot_plan(chinchilla_plan(compute=1e21), str(out))
    old = out.read_bytes()
    assert old.startswith(b"\x89PNG")

    def crash(self, target, *args, **kwargs):
        (open(target, "wb") if isinstance(target, (str, Path)) else target).write(b"half a PNG")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(Figure, "savefig", crash)
    with pytest.raises(KeyboardInterrupt):
        plot_plan(chinchilla_plan(compute=1e23), str(out))
    assert out.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["plan.png"]  # no temporary left beside it

"""Initialisation of fresh models (models.use_scaled_init): the residual projections drawn with GPT-2's
scaled std, the rest as transformers draws them, the same rule when a strategy materialises from the meta
device, and pretrained weights never touched."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_llm.models import build_model
from lightning_llm.modules.pretrain import PretrainModule


def assert_drawn_with_std(weight: torch.Tensor, std: float, name: str) -> None:
    # The sample std of n independent N(0, s^2) draws has a relative standard error of 1/sqrt(2n); six of
    # those bound it with a chance below 1e-8 per check of a wrong failure, on any machine and seed, and
    # still tell a 0.02 draw from a 0.01 one (a factor two) for any layer of more than ~50 elements.
    n = weight.numel()
    assert weight.mean().abs() <= 6 * std / math.sqrt(n), f"{name}: mean {weight.mean():.3g}"
    assert abs(weight.std().item() / std - 1) <= 6 / math.sqrt(2 * n), f"{name}: std {weight.std():.4g}, expected {std:.4g}"


def assert_follows_the_rule(model) -> None:
    config = model.config
    layers, std = config.num_hidden_layers, config.initializer_range
    checked = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            residual = name.endswith((".o_proj", ".down_proj"))  # what adds to the residual stream in a Llama block
            assert_drawn_with_std(module.weight.detach(), std / math.sqrt(2 * layers) if residual else std, name)
            checked += residual
        elif "RMSNorm" in type(module).__name__:
            assert torch.equal(module.weight, torch.ones_like(module.weight)), name
    assert checked == 2 * layers
    assert_drawn_with_std(model.get_input_embeddings().weight.detach(), std, "embeddings")


@pytest.mark.parametrize("overrides", [{}, {"num_hidden_layers": 5, "hidden_size": 48, "intermediate_size": 100}])
def test_fresh_models_draw_the_residual_projections_with_the_scaled_std(overrides):
    torch.manual_seed(0)
    assert_follows_the_rule(build_model("tiny", **overrides))


def test_a_model_materialised_from_the_meta_device_follows_the_same_rule():
    from lightning_llm.strategies.zero import _materialize

    with torch.device("meta"):
        model = build_model("tiny", num_hidden_layers=3)
    torch.manual_seed(0)
    _materialize(model, list(model.modules()), torch.device("cpu"))  # ZeROStrategy's per-unit initialisation
    assert_follows_the_rule(model)


def test_pretrained_weights_are_loaded_bit_identical(tmp_path):
    trained = build_model("tiny", vocab_size=128)
    with torch.no_grad():  # weights no initialisation draws: any re-draw after the load shows
        for p in trained.parameters():
            p.copy_(torch.linspace(-3, 3, p.numel()).reshape(p.shape))
    trained.save_pretrained(tmp_path / "export")
    saved = {k: v.clone() for k, v in trained.state_dict().items()}

    module = PretrainModule(str(tmp_path / "export"))
    module.configure_model()
    for loaded in (build_model(str(tmp_path / "export")), module.model):
        state = loaded.state_dict()
        assert state.keys() == saved.keys()
        for key, value in saved.items():
            assert torch.equal(state[key], value), key

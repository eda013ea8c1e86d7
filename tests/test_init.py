"""Initialisation of fresh models (models.use_fresh_init): each projection kind drawn with the small-init std
of its width, the residual projections zero, norms one, the same rule when a strategy materialises from the
meta device, a seed fixing the weights, and pretrained weights never touched."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_llm.models import build_config, build_model
from lightning_llm.modules.pretrain import PretrainModule

KINDS = ("embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def assert_drawn_with_std(values: torch.Tensor, std: float, name: str) -> None:
    # The independent oracle is the formula itself (sqrt(2/5d)), not the code's helper. The
    # sample std of n independent N(0, s^2) draws has a relative standard error of 1/sqrt(2n) (and the mean
    # one of s/sqrt(n)); six of those bound it with a chance below 1e-8 per check of a wrong failure, whatever
    # the machine or seed, and still tell transformers' 0.02 from these stds (off by a factor 1.3 or more) for
    # any kind of more than ~200 elements; the smallest kind here (k_proj of the 48-wide model) has 3 x 48 x 24 = 3,456.
    n = values.numel()
    assert values.mean().abs() <= 6 * std / math.sqrt(n), f"{name}: mean {values.mean():.3g} of {n} draws"
    assert abs(values.std().item() / std - 1) <= 6 / math.sqrt(2 * n), f"{name}: std {values.std():.4g}, expected {std:.4g}"


def assert_follows_the_rule(model) -> None:
    d, layers = model.config.hidden_size, model.config.num_hidden_layers
    drawn: dict[str, list[torch.Tensor]] = {kind: [] for kind in KINDS}
    for name, param in model.named_parameters():
        kind = name.split(".")[-2]
        if kind in drawn:
            drawn[kind].append(param.detach().flatten())
        elif "norm" in kind:
            assert torch.equal(param, torch.ones_like(param)), name
    for kind, tensors in drawn.items():
        assert len(tensors) == (1 if kind == "embed_tokens" else layers), kind
        if kind in ("o_proj", "down_proj"):  # the residual projections start at zero: each block is the identity
            assert all(torch.count_nonzero(t) == 0 for t in tensors), kind
        else:
            assert_drawn_with_std(torch.cat(tensors), math.sqrt(2 / (5 * d)), kind)


@pytest.mark.parametrize("spec,overrides", [("tiny", {}), ("llama-5m", {}),
                                            ("tiny", {"num_hidden_layers": 3, "hidden_size": 48, "intermediate_size": 100})])
def test_fresh_models_draw_each_projection_kind_with_its_std(spec, overrides):
    torch.manual_seed(0)
    assert_follows_the_rule(build_model(spec, **overrides))


def test_a_fresh_model_starts_as_its_embeddings_alone():
    # The oracle: with every residual branch zero, the logits are the final norm of a token's embedding times
    # the (tied) embedding matrix, whatever the attention and MLP weights hold. (fp32: one matmul's rounding.)
    torch.manual_seed(0)
    model = build_model("tiny", num_hidden_layers=3)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    embedding = model.model.embed_tokens.weight
    expected = model.model.norm(embedding[ids]) @ embedding.T
    torch.testing.assert_close(model(input_ids=ids).logits, expected)


def test_a_seed_gives_the_same_weights_every_time():
    # Two builds live side by side at different addresses: an order that followed addresses would differ.
    models = []
    for _ in range(2):
        torch.manual_seed(3)
        models.append(build_model("tiny", num_hidden_layers=3))
    for (key, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        assert torch.equal(a, b), key


def test_a_model_materialised_from_the_meta_device_follows_the_same_rule():
    from lightning_llm.strategies.zero import _materialize

    with torch.device("meta"):
        model = build_model("tiny", num_hidden_layers=3)
    torch.manual_seed(0)
    _materialize(model, list(model.modules()), torch.device("cpu"))  # ZeROStrategy's per-unit initialisation
    assert_follows_the_rule(model)


def test_an_export_loads_bit_identical(tmp_path):
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


def test_a_mixture_of_experts_keeps_transformers_initialisation():
    # Its experts are fused tensors, not the linear layers the rule scales: it is drawn as on main, untouched.
    torch.manual_seed(0)
    ours = build_model("tiny-moe")
    torch.manual_seed(0)
    theirs = AutoModelForCausalLM.from_config(build_config("tiny-moe"))
    for (key, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), key


def test_a_typed_initializer_range_is_kept():
    # The user's std wins over the small init: transformers' own init draws with it (the oracle: the same
    # seed through transformers directly), the same for the meta-device path of a sharding strategy.
    torch.manual_seed(0)
    ours = build_model("tiny", initializer_range=0.5)
    torch.manual_seed(0)
    theirs = AutoModelForCausalLM.from_config(build_config("tiny", initializer_range=0.5))
    for (key, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), key
    assert_drawn_with_std(ours.model.layers[0].mlp.down_proj.weight.detach().flatten(), 0.5, "down_proj")

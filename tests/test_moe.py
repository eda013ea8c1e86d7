"""Mixture of experts: presets, router losses, expert counts, active-parameter FLOPs, training and export."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

from _precision_helpers import MetricsRecorder
from lightning_llm.data.pretrain import PretrainDataModule
from lightning_llm.export import export_checkpoint
from lightning_llm.models import build_config, build_model, count_parameters
from lightning_llm.modules.pretrain import PretrainModule
from lightning_llm.modules.router import expert_token_counts, load_balancing_loss, router_z_loss
from lightning_llm.scaling import flops_per_token, matmul_params, moe_shape


# -- naive oracles: one token at a time, Python loops ------------------------------------------------

def naive_router_terms(router_logits, top_k, mask=None):
    """(load-balancing loss, z-loss, counts) from the definitions, token by token and layer by layer."""
    aux, z, counts = [], [], []
    for layer in router_logits:
        rows = [row.double() for i, row in enumerate(layer) if mask is None or mask.reshape(-1)[i]]
        experts = layer.shape[-1]
        count = [0] * experts
        prob_sum = [0.0] * experts
        z_sum = 0.0
        for row in rows:
            probs = [math.exp(v) for v in row.tolist()]
            total = sum(probs)
            for e in sorted(range(experts), key=lambda e: -probs[e])[:top_k]:
                count[e] += 1
            for e in range(experts):
                prob_sum[e] += probs[e] / total
            z_sum += math.log(total) ** 2
        aux.append(experts * sum(count[e] / (len(rows) * top_k) * prob_sum[e] / len(rows) for e in range(experts)))
        z.append(z_sum / len(rows))
        counts.append(count)
    return sum(aux) / len(aux), sum(z) / len(z), counts


def random_router_logits(layers=3, tokens=24, experts=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(tokens, experts, generator=g) * 2 for _ in range(layers))


# -- presets and export ------------------------------------------------------------------------------

@pytest.mark.parametrize("name, total, active", [("tiny-moe", (0.3e6, 0.6e6), (0.2e6, 0.4e6)),
                                                 ("moe-100m", (95e6, 105e6), (40e6, 48e6))])
def test_moe_preset_sizes(name, total, active):
    with torch.device("meta"):
        model = build_model(name)
    experts, top_k, width = moe_shape(model.config)
    assert (experts, top_k) == ((4, 2) if name == "tiny-moe" else (8, 2))
    n = count_parameters(model)
    # active: all parameters but the experts a token does not meet (each expert is 3 x d x width)
    n_active = n - model.config.num_hidden_layers * (experts - top_k) * 3 * model.config.hidden_size * width
    assert total[0] <= n <= total[1] and active[0] <= n_active <= active[1]


@pytest.fixture
def datamodule(corpus_dir, tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    return PretrainDataModule(str(corpus_dir), tokenizer=str(tmp_path / "tok"), block_size=32, batch_size=4,
                              cache_dir=str(tmp_path / "cache"))


def fit_tiny_moe(datamodule, tmp_path, steps, **trainer_kwargs):
    metrics = MetricsRecorder()
    module = PretrainModule("tiny-moe", lr=5e-3, warmup_steps=2)
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=metrics, log_every_n_steps=1,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path, **trainer_kwargs)
    trainer.fit(module, datamodule=datamodule)
    return module, trainer, metrics


def test_tiny_moe_trains_logs_router_terms_and_exports(datamodule, tmp_path):
    steps = 12
    module, trainer, metrics = fit_tiny_moe(datamodule, tmp_path, steps)
    assert module.model.config.vocab_size == len(datamodule.tokenizer)  # the tokenizer's vocabulary, not the preset's
    losses = metrics.series("train/loss")
    assert len(losses) == steps and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5
    aux, z = metrics.series("train/router_aux_loss"), metrics.series("train/router_z_loss")
    assert len(aux) == steps and all(1.0 <= v <= 2.0 for v in aux)  # 1 = even; experts / top_k = 2 the worst
    assert all(math.isfinite(v) and v > 0 for v in z)
    # every token is counted once in each of its top-k experts, in every layer, at every step
    config = module.model.config
    for layer in range(config.num_hidden_layers):
        per_step = [metrics.series(f"train/expert_tokens/layer{layer}/expert{e}") for e in range(config.num_experts)]
        for step_counts in zip(*per_step, strict=True):
            assert sum(step_counts) == 4 * 32 * config.num_experts_per_tok

    trainer.save_checkpoint(tmp_path / "run.ckpt")
    out = export_checkpoint(tmp_path / "run.ckpt", tmp_path / "hf")
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(loaded).__name__ == "Qwen3MoeForCausalLM"
    ids = torch.randint(0, config.vocab_size, (2, 17))
    module.model.eval()
    torch.testing.assert_close(loaded(ids).logits, module.model(ids).logits, rtol=0, atol=1e-5)


def test_tiny_moe_trains_under_bf16_mixed(datamodule, tmp_path):
    steps = 12
    _, _, metrics = fit_tiny_moe(datamodule, tmp_path, steps, precision="bf16-mixed")
    losses = metrics.series("train/loss")
    assert len(losses) == steps and all(math.isfinite(v) for v in losses + metrics.series("train/router_z_loss"))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5


# -- router terms against naive oracles and the library -------------------------------------------

@pytest.mark.parametrize("top_k", [1, 2])
def test_router_terms_match_the_definitions(top_k):
    logits = random_router_logits()
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[1, 4:] = 0  # padding is left out of every term
    for m in (None, mask):
        aux, z, counts = naive_router_terms(logits, top_k, m)
        # float32 sums of a few dozen terms of size ~1..10 (z: logsumexp^2): a few eps32 relative
        assert load_balancing_loss(logits, top_k, m).item() == pytest.approx(aux, rel=1e-5)
        assert router_z_loss(logits, m).item() == pytest.approx(z, rel=1e-5)
        assert expert_token_counts(logits, top_k, m).tolist() == counts
        assert expert_token_counts(logits, top_k, m).sum(dim=1).tolist() == [top_k * (24 if m is None else 22)] * 3


def test_one_layer_balance_loss_is_the_librarys_over_top_k():
    # transformers' Mixtral-form loss divides the assignment fractions by tokens, not tokens x top_k,
    # and pools layers; on one layer the two differ by exactly that factor.
    logits = random_router_logits(layers=1, tokens=40, experts=6, seed=1)
    ours = load_balancing_loss(logits, 2)
    library = load_balancing_loss_func(logits, num_experts=6, top_k=2)
    torch.testing.assert_close(ours * 2, library, rtol=1e-6, atol=0)


def test_balance_loss_is_per_layer():
    # Layer 0 sends every token to expert 0, layer 1 to expert 1: pooled over layers (the library) this
    # looks half balanced; per layer each layer is as unbalanced as it can be (experts / top_k).
    one_hot = torch.full((8, 4), -30.0)
    layer0, layer1 = one_hot.clone(), one_hot.clone()
    layer0[:, 0] = layer1[:, 1] = 30.0
    assert load_balancing_loss((layer0, layer1), top_k=1).item() == pytest.approx(4.0, rel=1e-6)
    assert load_balancing_loss_func((layer0, layer1), num_experts=4, top_k=1).item() == pytest.approx(2.0, rel=1e-6)


def test_module_adds_the_weighted_router_terms(tmp_path):
    torch.manual_seed(0)
    module = PretrainModule("tiny-moe", vocab_size=256, router_aux_loss_coef=0.3, router_z_loss_coef=0.07)
    module.configure_model()
    module.log = lambda *args, **kwargs: None  # no trainer to log to
    module._data_parallel_size = lambda: 1
    batch = {"input_ids": torch.randint(0, 256, (2, 9))}
    batch["targets"] = torch.roll(batch["input_ids"], -1, dims=1)
    loss, token_loss = module.training_loss(batch)
    outputs = module.model(batch["input_ids"], output_router_logits=True)
    aux, z, _ = naive_router_terms(outputs.router_logits, 2)
    assert loss.item() == pytest.approx(token_loss.item() + 0.3 * aux + 0.07 * z, rel=1e-5)
    with pytest.raises(ValueError, match="router_aux_loss_coef.*got -1"):
        PretrainModule("tiny-moe", router_aux_loss_coef=-1)


def test_router_loss_gradient_matches_a_central_difference():
    # The routers of tiny-moe in float64, on float64 hidden states. (Not the whole model: its RMSNorm and
    # router softmax round through float32 even in a float64 model, noise that a difference quotient
    # divides by h.)
    torch.manual_seed(0)
    model = build_model("tiny-moe", vocab_size=64, dtype=torch.float64)
    routers = [layer.mlp.gate for layer in model.model.layers]
    params = [router.weight for router in routers]
    hidden = [torch.randn(16, model.config.hidden_size, dtype=torch.float64) for _ in routers]

    def router_terms():
        logits = tuple(router(x)[0] for router, x in zip(routers, hidden, strict=True))
        routes = [layer.topk(2, dim=-1).indices for layer in logits]
        return load_balancing_loss(logits, 2) + 0.5 * router_z_loss(logits), routes

    loss, routes = router_terms()
    grads = torch.autograd.grad(loss, params)
    g = torch.Generator().manual_seed(1)
    direction = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
    norm = math.sqrt(sum(d.square().sum().item() for d in direction))
    direction = [d / norm for d in direction]  # a unit step in parameter space
    analytic = sum((gr * d).sum().item() for gr, d in zip(grads, direction, strict=True))
    h = 1e-5
    values = []
    with torch.no_grad():
        for sign in (1, -1):
            for p, d in zip(params, direction, strict=True):
                p.add_(sign * h * d)
            value, moved = router_terms()
            for p, d in zip(params, direction, strict=True):
                p.sub_(sign * h * d)
            # the top-k choice is piecewise constant: the difference is only meaningful where it stays put
            assert all(torch.equal(a, b) for a, b in zip(routes, moved, strict=True))
            values.append(value.item())
    numeric = (values[0] - values[1]) / (2 * h)
    # Central difference: truncation h^2/6 |f'''|, with f''' along a unit direction of the order of the
    # loss (a few units: the hidden states are unit normal), plus rounding: each evaluation is exact to
    # ~1e3 float64 eps relative (sums of some thousand terms), and the difference divides it by h.
    eps = torch.finfo(torch.float64).eps
    tol = h**2 / 6 * 10 * max(1.0, abs(loss.item())) + 1e3 * eps * abs(loss.item()) / h
    assert abs(analytic) > 1e3 * tol  # the check is not vacuous
    assert numeric == pytest.approx(analytic, abs=tol)


# -- FLOPs count active parameters -----------------------------------------------------------------

def hand_active_params(model):
    """Matmul parameters a token meets, from the model's modules: every Linear (LM head included),
    each router, and top_k copies of one expert's weights; the embedding lookup is no matmul."""
    total = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    for layer in model.model.layers:
        mlp = layer.mlp
        if hasattr(mlp, "experts"):
            total += mlp.gate.weight.numel()
            total += model.config.num_experts_per_tok * (mlp.experts.gate_up_proj[0].numel() + mlp.experts.down_proj[0].numel())
    return total


@pytest.mark.parametrize("overrides", [{}, dict(decoder_sparse_step=2, num_hidden_layers=3, hidden_size=48,
                                                moe_intermediate_size=40, num_experts=5, num_experts_per_tok=3)])
def test_flops_count_active_parameters(overrides):
    # eager attention and the per-expert loop: FlopCounterMode counts their matmuls (not torch._grouped_mm)
    model = AutoModelForCausalLM.from_config(build_config("tiny-moe", vocab_size=200, **overrides),
                                             attn_implementation="eager", experts_implementation="eager")
    assert matmul_params(model.config) == hand_active_params(model)
    # and torch's own count of a forward+backward pass agrees (dropless: each token meets exactly top_k experts)
    x = torch.randint(0, 200, (2, 16))
    with FlopCounterMode(display=False) as counter:
        model(x).logits.float().sum().backward()
    assert flops_per_token(model.config, 16) == pytest.approx(counter.get_total_flops() / x.numel(), rel=0.02)


def test_flops_of_a_shared_expert_config():
    config = AutoConfig.for_model("qwen2_moe", hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
                                  shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
                                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, vocab_size=100)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", experts_implementation="eager")
    x = torch.randint(0, 100, (2, 16))
    with FlopCounterMode(display=False) as counter:
        model(x).logits.float().sum().backward()
    assert flops_per_token(config, 16) == pytest.approx(counter.get_total_flops() / x.numel(), rel=0.02)


# -- LoRA ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("experts", [False, True])
def test_lora_on_tiny_moe_attention_only_or_experts_too(datamodule, tmp_path, experts):
    from lightning_llm.callbacks.lora import LoRACallback, merge_adapter

    # experts=True adapts the fused 3-D expert tensors too (peft's ParamWrapper, which takes no dropout);
    # attention-only adapters name the projections
    lora = LoRACallback(r=4, dropout=0.0, experts=True, adapter_dir=str(tmp_path / "adapter")) if experts else \
        LoRACallback(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], adapter_dir=str(tmp_path / "adapter"))
    metrics = MetricsRecorder()
    torch.manual_seed(0)
    module = PretrainModule("tiny-moe", lr=5e-3, warmup_steps=2)
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=8, logger=metrics, log_every_n_steps=1,
                      callbacks=[lora],
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=datamodule)
    losses = metrics.series("train/loss")
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses + metrics.series("train/router_aux_loss"))
    trainable = [n for n, p in module.model.named_parameters() if p.requires_grad]
    assert all(".lora_" in n for n in trainable)
    assert any(".experts." in n for n in trainable) == experts  # the router is never adapted
    # the library's merge computes what the adapted model computes
    ids = torch.randint(0, module.model.config.vocab_size, (2, 11))
    module.model.eval()
    with torch.no_grad():
        adapted = module.model(input_ids=ids).logits
        merged = merge_adapter(module.model)(input_ids=ids).logits
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-5)

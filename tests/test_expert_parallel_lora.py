"""LoRA on a mixture-of-experts model: under expert parallelism against one process, and adapters on the experts.

`LoRACallback(experts=False)` (the default) adapts the linear layers (attention) and leaves the experts frozen;
`LoRACallback(experts=True)` also puts one low-rank update per expert on the fused expert weights (peft's
`target_parameters`). Under dp2 x ep2 the frozen experts stay sharded over the ranks either way, the expert
adapters stay whole (ZeRO shards them) and each rank adds its own experts' updates (strategies/expert.py); the
losses and the adapters after 3 steps are compared with one process on the same global batches, from the same saved
base and the same initial adapters, and the run's checkpoint exports and merges as one process merges it. A second
job trains another shape (6 experts, top-1, hidden 40, width 24) on batches so short that experts go without a
token, and one step leaves a rank's experts without any.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp

from _precision_helpers import free_port
from lightning_llm.callbacks.lora import LoRACallback, export_lora_checkpoint, gathered_adapter_state
from lightning_llm.strategies.parallel import ParallelStrategy
from test_expert_parallel import RANKS, VOCAB, global_batches
from tolerances import UNIT_ROUNDOFF, assert_adam_steps_close, reordered_sum_rtol

STEPS = 3
HP = dict(lr=1e-2, weight_decay=0.0, warmup_steps=1, max_steps=STEPS, router_aux_loss_coef=0.0,
          router_z_loss_coef=0.05)  # a token mean only: see test_expert_parallel.HP
LORA = dict(r=4, alpha=32, dropout=0.0)
LR_SUM = STEPS * HP["lr"]  # the warm-up and cosine steps are at most HP["lr"] each
# The second shape: 6 experts (3 per rank), hidden 40, width 24, top-1 routing, rank 2. One row per rank, of 2, 6
# and 2 tokens: a 2-token step routes 2 pairs per rank, 4 in all, so at least 2 of the 6 experts get no token on any
# rank (pigeonhole), and with these tokens (seed 0) the first step sends all of layer 1's pairs to rank 0's experts:
# rank 1 runs its experts on no row (the dispatch's empty path). Rows of one token would not do: attention over
# one position gives q and k a gradient that is zero but for rounding, which Adam's first step turns into a step of
# lr in the direction of that noise, different in every summation order.
SHAPE = dict(num_experts=6, num_experts_per_tok=1, hidden_size=40, moe_intermediate_size=24, num_attention_heads=4,
             num_key_value_heads=2)
SHAPE_VOCAB, SHAPE_LENGTHS = 96, (2, 6, 2)
LORA_SHAPE = dict(r=2, alpha=4, dropout=0.0)
# fp32, the same arithmetic reordered: the losses as test_expert_parallel.LOSS_TOL argues (the log-sum-exp over
# the vocabulary, on both sides); the adapters through assert_adam_steps_close (their gradients carry that noise).
LOSS_TOL = dict(rtol=2 * reordered_sum_rtol(torch.float32, VOCAB), atol=0)
SHAPE_LOSS_TOL = dict(rtol=2 * reordered_sum_rtol(torch.float32, SHAPE_VOCAB), atol=0)


def shape_batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randint(0, SHAPE_VOCAB, (RANKS, n + 1), generator=g) for n in SHAPE_LENGTHS]
    return [{"input_ids": t[:, :-1], "targets": t[:, 1:]} for t in tokens]


class Record(L.Callback):
    def __init__(self) -> None:
        self.out: dict = {"losses": [], "dispatched": []}

    def on_train_start(self, trainer, pl_module):
        from torch.distributed.tensor import DTensor

        experts = [p for n, p in pl_module.model.named_parameters() if ".experts." in n and "lora_" not in n]
        self.out["experts"] = [(type(p).__name__, p.requires_grad,
                                tuple((p.to_local() if isinstance(p, DTensor) else p).shape)) for p in experts]
        self.out["expert_adapters"] = [(type(p).__name__, tuple((p.to_local() if isinstance(p, DTensor) else p).shape))
                                       for n, p in pl_module.model.named_parameters() if ".experts." in n and "lora_" in n]
        self.out["init"] = {k: v.detach().clone() for k, v in gathered_adapter_state(pl_module.model).items()}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        from torch.distributed.tensor import DTensor

        self.out.setdefault("grad_norms", []).append({
            n: float((p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).double().norm())
            for n, p in pl_module.named_parameters() if p.grad is not None})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        from lightning_llm.moe import dispatches

        self.out["losses"].append(outputs["loss"].item())
        # the pairs of this rank's tokens sent to each global expert, per layer (expert parallelism only)
        self.out["dispatched"].append([d.tokens_per_expert.clone() for d in dispatches(pl_module.model)])

    def on_train_end(self, trainer, pl_module):
        self.out["adapter"] = {k: v.detach().clone() for k, v in gathered_adapter_state(pl_module.model).items()}


def _save_base(path: Path, **shape) -> Path:
    """A 'pretrained' base on disk: the export rebuilds an adapter checkpoint on it."""
    from lightning_llm.models import build_model

    torch.manual_seed(1)
    build_model("tiny-moe", **{"vocab_size": VOCAB, **shape}).save_pretrained(path)
    return path


def _fit(world: int, rank: int, base: Path, root: Path, lora: dict, batches: list[dict], experts: bool) -> dict:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_llm.modules.pretrain import PretrainModule

    torch.manual_seed(0)  # the same initial adapters on every rank and in the one-process run
    record = Record()
    batches = batches if world == 1 else [{k: v.chunk(world)[rank] for k, v in b.items()} for b in batches]
    # LoRA needs the base's weights: the whole model is built on every rank (empty_init=False), then split.
    strategy = ParallelStrategy(expert_parallel=world, empty_init=False) if world > 1 else "auto"
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_steps=STEPS, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        default_root_dir=root, num_sanity_val_steps=0,
                        callbacks=[record, LoRACallback(**lora, experts=experts, adapter_dir=str(root / "adapter")),
                                   ModelCheckpoint(dirpath=root / "ckpt", save_last=True)])
    trainer.fit(PretrainModule(str(base), **HP), torch.utils.data.DataLoader(batches, batch_size=None))
    return record.out


def _worker(rank: int, world: int, port: int, out: str, base: str, job: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    out, base = Path(out), Path(base)
    if job == "tiny":
        batches = global_batches()
        results = {"frozen": _fit(world, rank, base, out / "frozen", LORA, batches, experts=False),
                   "experts": _fit(world, rank, base, out / "experts", LORA, batches, experts=True)}
    else:  # "shape"
        results = {"experts": _fit(world, rank, base, out / "shape", LORA_SHAPE, shape_batches(), experts=True)}
    torch.save(results, out / f"{job}-rank{rank}.pt")


def _spawn(out: Path, base: Path, job: str) -> list[dict]:
    mp.spawn(_worker, args=(RANKS, free_port(), str(out), str(base), job), nprocs=RANKS, join=True)
    return [torch.load(out / f"{job}-rank{r}.pt", weights_only=False) for r in range(RANKS)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep_lora")
    base = _save_base(out / "base")
    ranks = _spawn(out, base, "tiny")
    torch.set_num_threads(1)
    batches = global_batches()
    one = {"frozen": _fit(1, 0, base, out / "one-frozen", LORA, batches, experts=False),
           "experts": _fit(1, 0, base, out / "one-experts", LORA, batches, experts=True)}
    return {"ranks": ranks, "one": one, "out": out, "base": base}


def _assert_trains_as_one_process(ranks: list[dict], one: dict, loss_tol: dict) -> None:
    """The losses (the mean of the ranks') and the whole adapters at the start and after the steps equal one
    process's; every adapter stepped, and the ranks hold the same adapters.

    Adam's step barely depends on a gradient's scale, so a gradient off by a factor (an expert's adapter rows
    averaged over the ranks once too often) would hardly show in the adapters: the first step's gradient norms are
    compared tensor by tensor, to the losses' bound (each gradient a sum over the same reordered reductions; the
    norm, a sum of squares, set by the largest elements, which carry no cancellation: test_parallel_lora's
    argument). Later steps start from weights that Adam's rounding-decided elements have moved apart (see
    tolerances.py), so only the first step's are exact to rounding. A's gradients are exactly zero there (B = 0)."""
    for rank in ranks:
        assert rank["init"].keys() == one["init"].keys()
        assert all(torch.equal(v, one["init"][k]) for k, v in rank["init"].items())  # sharding kept them
        norms = rank["grad_norms"][0]
        assert norms.keys() == one["grad_norms"][0].keys()  # every trainable tensor (experts=True: the experts' adapters too)
        torch.testing.assert_close(norms, one["grad_norms"][0], **loss_tol)
    losses = [sum(values) / RANKS for values in zip(*(r["losses"] for r in ranks))]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(one["losses"]), **loss_tol)
    adapter = ranks[0]["adapter"]
    assert adapter.keys() == one["adapter"].keys() and any(".lora_B." in k for k in adapter)
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if ".lora_B." in k)  # every adapter stepped
    for rank in ranks[1:]:
        assert all(torch.equal(rank["adapter"][k], v) for k, v in adapter.items())
    assert_adam_steps_close(adapter, one["adapter"], lr_sum=LR_SUM)


@pytest.mark.slow  # the fixture: two fits in two processes and two in one, about 3 minutes on 2 cores
def test_lora_under_ep2_trains_the_adapters_as_one_process(runs):
    """The frozen experts stay sharded (each rank holds 2 of the 4, no gradient); no adapter on the experts."""
    ranks, one = [r["frozen"] for r in runs["ranks"]], runs["one"]["frozen"]
    for rank in ranks:
        assert rank["experts"] == [("DTensor", False, (2, 192, 64)), ("DTensor", False, (2, 64, 96))] * 2
    assert {e[0] for e in one["experts"]} == {"Parameter"}
    assert not any(".experts." in k for k in ranks[0]["adapter"])
    _assert_trains_as_one_process(ranks, one, LOSS_TOL)


@pytest.mark.slow
def test_adapters_on_the_experts_under_ep2_train_as_one_process(runs):
    """experts=True: the frozen experts are sharded as before and every expert of both matrices has its adapter
    (all experts' factors whole on every rank), which trains as one process trains it."""
    ranks, one = [r["experts"] for r in runs["ranks"]], runs["one"]["experts"]
    for rank in ranks:
        assert rank["experts"] == [("DTensor", False, (2, 192, 64)), ("DTensor", False, (2, 64, 96))] * 2
        # the factors of all 4 experts, ZeRO-3 shards: half of each matrix's rows on each rank
        assert sorted(rank["expert_adapters"]) == sorted([("DTensor", (8, 64)), ("DTensor", (96, 16)),
                                                          ("DTensor", (8, 96)), ("DTensor", (32, 16))] * 2)
    on_experts = {k: v.shape for k, v in ranks[0]["adapter"].items() if ".experts." in k}
    assert len(on_experts) == 2 * 2 * 2  # 2 layers x (gate_up_proj, down_proj) x (A, B)
    # A [experts x r, in], B [out, r x experts]: gate_up_proj's in 64, out 192; down_proj's in 96, out 64
    assert sorted(on_experts.values()) == sorted([(16, 64), (192, 16), (16, 96), (64, 16)] * 2)
    _assert_trains_as_one_process(ranks, one, LOSS_TOL)
    # each expert's own factor rows moved: every expert got tokens (from some rank) in every layer
    for layer in range(2):
        assert all(sum(r["dispatched"][0][layer] for r in ranks) > 0)


@pytest.mark.slow
def test_ep2_expert_adapters_export_and_merge_as_one_process(runs, tmp_path):
    """The ep2 checkpoint (adapters only, ZeRO shards) exports the adapter the run ended with; merged, it loads with
    `from_pretrained` and is, weight for weight, what peft's own merge of that adapter on one process gives; the
    one-process run's checkpoint merges to the base plus its own adapters' products the same way."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out, base, final = runs["out"], runs["base"], runs["ranks"][0]["experts"]["adapter"]
    exported, _ = export_lora_checkpoint(out / "experts" / "ckpt" / "last.ckpt", tmp_path / "adapter")
    for written in (load_file(exported / "adapter_model.safetensors"),
                    load_file(out / "experts" / "adapter" / "adapter_model.safetensors")):
        assert {k.replace(".weight", ".default.weight") for k in written} == final.keys()
        assert all(torch.equal(v, final[k.replace(".weight", ".default.weight")]) for k, v in written.items())
    path, error = export_lora_checkpoint(out / "experts" / "ckpt" / "last.ckpt", tmp_path / "merged", merge=True)
    assert error < 1e-4
    merged = AutoModelForCausalLM.from_pretrained(path).state_dict()
    oracle = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), exported).merge_and_unload().state_dict()
    assert merged.keys() == oracle.keys() and all(torch.equal(merged[k], v) for k, v in oracle.items())
    # the merged experts: W0[e] + (alpha / r) B_e A_e for each expert e, A_e its r rows of A, B_e its columns
    # e, E + e, ... of B (peft's layout), computed here one expert at a time. fp32: the r-term product and the
    # addition reordered, each within (r + 2) u of the terms' magnitudes.
    base_weights, scale, r = AutoModelForCausalLM.from_pretrained(base).state_dict(), LORA["alpha"] / LORA["r"], LORA["r"]
    for layer in range(2):
        for weight, wrapped in (("gate_up_proj", "base_layer."), ("down_proj", "")):
            prefix = f"base_model.model.model.layers.{layer}.mlp.experts.{wrapped}"
            a, b = final[f"{prefix}lora_A.default.weight"], final[f"{prefix}lora_B.default.weight"]
            w0 = base_weights[f"model.layers.{layer}.mlp.experts.{weight}"]
            got = merged[f"model.layers.{layer}.mlp.experts.{weight}"]
            for e in range(w0.shape[0]):
                a_e, b_e = a[e * r:(e + 1) * r], b[:, e::w0.shape[0]]
                bound = (r + 2) * UNIT_ROUNDOFF[torch.float32] * (w0[e].abs() + scale * b_e.abs() @ a_e.abs())
                assert ((got[e] - (w0[e] + scale * b_e @ a_e)).abs() <= bound).all(), (layer, weight, e)
                assert not torch.equal(got[e], w0[e]), (layer, weight, e)
    one, _ = export_lora_checkpoint(out / "one-experts" / "ckpt" / "last.ckpt", tmp_path / "adapter-one")
    assert_adam_steps_close(load_file(exported / "adapter_model.safetensors"),
                            load_file(one / "adapter_model.safetensors"), lr_sum=LR_SUM)


@pytest.mark.slow  # two processes and one, about a minute on 2 cores
def test_adapters_on_the_experts_under_ep2_on_another_shape_with_idle_experts(tmp_path):
    """6 experts, 3 per rank, top-1, rank 2: the 2-token steps leave experts without a token (their adapter rows get
    no gradient on any rank, as on one process) and once a rank's experts without any, and the losses and adapters
    are still one process's."""
    base = _save_base(tmp_path / "base", vocab_size=SHAPE_VOCAB, **SHAPE)
    ranks = [r["experts"] for r in _spawn(tmp_path, base, "shape")]
    torch.set_num_threads(1)
    one = _fit(1, 0, base, tmp_path / "one", LORA_SHAPE, shape_batches(), experts=True)
    for rank in ranks:
        assert rank["experts"] == [("DTensor", False, (3, 48, 40)), ("DTensor", False, (3, 40, 24))] * 2
    received = [[sum(r["dispatched"][step][layer] for r in ranks) for layer in range(2)] for step in range(STEPS)]
    idle = {step for step in range(STEPS) for layer in range(2) if (received[step][layer] == 0).sum() >= 2}
    assert idle >= {0, 2}, received  # the 2-token steps (pigeonhole)
    assert received[0][1][3:].sum() == 0 and received[0][1][:3].sum() == 4, received  # rank 1 idle in layer 1
    _assert_trains_as_one_process(ranks, one, SHAPE_LOSS_TOL)
    assert len([k for k in ranks[0]["adapter"] if ".experts." in k]) == 2 * 2 * 2


def test_adapters_on_the_experts_train_and_merge(tmp_path):
    """One process, experts=True on another shape (6 experts, odd widths): every expert's two matrices get an
    adapter that trains, the checkpoint rebuilds it, and the merged export computes what the adapted model does
    (to fp32 rounding, measured by the export itself) with changed expert weights."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from transformers import AutoModelForCausalLM

    from lightning_llm.models import build_model
    from lightning_llm.modules.pretrain import PretrainModule

    torch.manual_seed(0)
    base = build_model("tiny-moe", vocab_size=96, num_experts=6, hidden_size=40, moe_intermediate_size=24,
                       num_attention_heads=4, num_key_value_heads=2)
    base.save_pretrained(tmp_path / "base")
    data = [{"input_ids": t[:, :-1], "targets": t[:, 1:]}
            for t in torch.randint(0, 96, (3, 2, 13), generator=torch.Generator().manual_seed(1))]
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[LoRACallback(r=2, dropout=0.0, experts=True),
                                   ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])
    module = PretrainModule(str(tmp_path / "base"), lr=1e-2, warmup_steps=1, max_steps=3)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=None))
    trained = {n: p for n, p in module.model.named_parameters() if p.requires_grad}
    on_experts = [n for n in trained if ".experts." in n]
    assert len(on_experts) == 2 * 2 * 2  # 2 layers x (gate_up_proj, down_proj) x (A, B)
    assert all(p.abs().sum() > 0 for n, p in trained.items() if ".lora_B." in n)
    out, error = export_lora_checkpoint(tmp_path / "ckpt" / "last.ckpt", tmp_path / "merged", merge=True)
    assert error is not None and error < 1e-4
    merged = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"):
        assert merged[name].shape == base.state_dict()[name].shape
        assert not torch.equal(merged[name], base.state_dict()[name]), name


@pytest.mark.parametrize("kwargs, match", [
    (dict(experts=True, dropout=0.05), r"experts=True with dropout=0.05: .* set dropout=0.0"),
    (dict(experts="yes"), r"experts must be True or False, got 'yes'"),
])
def test_the_experts_option_is_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRACallback(**kwargs)


def test_experts_on_a_dense_model_is_refused():
    from lightning_llm.models import build_model

    callback = LoRACallback(dropout=0.0, experts=True)
    with pytest.raises(ValueError, match=r"experts=True adapts the experts .* LlamaForCausalLM has none"):
        callback.transform_model(build_model("tiny", vocab_size=64), L.LightningModule())


@pytest.mark.parametrize("transposed", [False, True])
def test_a_rank_adds_its_own_experts_updates_as_peft_forms_them(transposed):
    """`LocalExpertAdapter` against peft's own update of every expert (`get_delta_weight`), sliced to each of 3
    ranks' 2 experts: the same products, so equal to fp32 rounding of the r-term sums (r + 2) u. Both storage
    orders: [experts, out, in] (Qwen3-MoE) and [experts, in, out] (transformers' `is_transposed` experts)."""
    from peft import LoraConfig, get_peft_model

    from lightning_llm.models import build_model
    from lightning_llm.moe import is_experts
    from lightning_llm.strategies.expert import LocalExpertAdapter

    torch.manual_seed(0)
    model = build_model("tiny-moe", vocab_size=64, num_experts=6, hidden_size=40, moe_intermediate_size=24,
                        num_attention_heads=4, num_key_value_heads=2)
    experts = next(m for m in model.modules() if is_experts(m))
    experts.is_transposed = transposed  # read by peft when it shapes the factors
    model = get_peft_model(model, LoraConfig(r=3, lora_alpha=6, target_modules=[], target_parameters=[
        "model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"]))
    for p in model.parameters():  # B starts at zero: give both factors values
        if p.requires_grad:
            torch.nn.init.normal_(p)
    outer = model.base_model.model.model.layers[0].mlp.experts
    wrappers = {outer.parameter_name: outer, outer.base_layer.parameter_name: outer.base_layer}
    r, u = 3, UNIT_ROUNDOFF[torch.float32]
    for name, wrapper in wrappers.items():
        weight = getattr(experts, name).detach()
        delta = wrapper.get_delta_weight("default").detach()
        assert delta.shape == weight.shape
        adapter = LocalExpertAdapter(wrapper, experts)
        for rank in range(3):
            local = slice(2 * rank, 2 * rank + 2)
            got = adapter(weight[local], 2 * rank).detach()
            bound = (r + 2) * u * (weight[local].abs() + delta[local].abs())
            assert ((got - (weight[local] + delta[local])).abs() <= bound).all(), (name, rank)
            assert not torch.equal(got, weight[local])
    outer.merge()
    with pytest.raises(RuntimeError, match=r"merged into expert-parallel expert weights .* merge on one process"):
        LocalExpertAdapter(outer, experts)(weight[:2], 0)


def test_qlora_on_the_experts_is_refused():
    from lightning_llm.callbacks.lora import QLoRACallback

    pytest.importorskip("bitsandbytes")
    with pytest.raises(NotImplementedError, match=r"QLoRACallback\(experts=True\): .* LoRACallback\(experts=True\)"):
        QLoRACallback(dropout=0.0, experts=True)


"""Expert parallelism against single-process training, and the capacity factor against a naive router.

One 2-rank gloo job trains tiny-moe at dp2 x ep2 (ParallelStrategy(expert_parallel=2), ZeRO-3 on the
rest), checkpointing half way; one 1-rank job resumes that checkpoint. The oracle is a plain PyTorch
loop on one process over the same global batches, from the weights the distributed run recorded, with
the module's objective: the token mean over the global batch plus the mean over the two data-parallel
halves of each half's router terms (each rank balances its own tokens).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp

from _precision_helpers import free_port
from lightning_llm.moe import ExpertDispatch, dispatches, use_capacity
from lightning_llm.strategies.parallel import ParallelStrategy
from tolerances import assert_adam_steps_close, reordered_sum_rtol

VOCAB, ROWS, SEQ, RANKS = 512, 4, 16, 2  # the global batch is ROWS x SEQ tokens, RANKS data-parallel halves
STEPS, SAVE_AT = 6, 3
# The load-balancing loss is off: it is not a token mean (each rank balances its own tokens), so the one
# process that resumes the checkpoint on the whole global batch would optimise another objective. The
# z-loss is a token mean: the mean of the two halves' is the global batch's.
HP = dict(lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), warmup_steps=2, min_lr_ratio=0.1, max_steps=STEPS,
          router_aux_loss_coef=0.0, router_z_loss_coef=0.05)
CLIP = 0.2  # below every step's gradient norm: clipping always acts, so a wrong global norm would show


def global_batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(4321)
    batches = []
    for _ in range(SAVE_AT):
        tokens = torch.randint(0, VOCAB, (ROWS, SEQ + 1), generator=g)
        batches.append({"input_ids": tokens[:, :-1], "targets": tokens[:, 1:]})
    return batches


def halves(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    rows = ROWS // RANKS
    return [{k: v[r * rows:(r + 1) * rows] for k, v in batch.items()} for r in range(RANKS)]


# -- what runs in the spawned processes ----------------------------------------------------------


def _recorder(record: dict):
    from test_zero import full_weights

    class Recorder(L.Callback):
        def on_train_start(self, trainer, pl_module):
            from lightning_llm.strategies.zero import state_bytes

            record["init"] = full_weights(pl_module.model)
            record["param_bytes"] = state_bytes(pl_module)["params"]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            record.setdefault("losses", []).append(outputs["loss"].item())
            # what each rank's dispatch sent to every global expert (one process runs the model's own experts),
            # and the counts the module logged
            if dispatches(pl_module.model):
                record.setdefault("dispatched", []).append(torch.stack([d.tokens_per_expert for d in dispatches(pl_module.model)]))
            logged = {k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("train/expert_tokens/")}
            record.setdefault("logged", []).append(logged)

        def on_train_end(self, trainer, pl_module):
            record["final"] = full_weights(pl_module.model)

    return Recorder()


def _fit(world: int, rank: int, out: Path, ckpt: str | None = None) -> dict:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_llm.modules.pretrain import PretrainModule

    record: dict = {}
    torch.manual_seed(10 * rank)  # ranks draw different numbers: the model must not depend on it
    callbacks = [_recorder(record)]
    if ckpt is None:
        callbacks.append(ModelCheckpoint(dirpath=out, filename="{step}", every_n_train_steps=SAVE_AT, save_top_k=-1))
    batches = global_batches() if world == 1 else [halves(b)[rank] for b in global_batches()]
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy=ParallelStrategy(expert_parallel=world),
                        max_steps=STEPS, logger=False, enable_checkpointing=ckpt is None, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, gradient_clip_val=CLIP,
                        callbacks=callbacks)
    trainer.fit(PretrainModule("tiny-moe", vocab_size=VOCAB, **HP), torch.utils.data.DataLoader(batches, batch_size=None),
                ckpt_path=ckpt)
    return record


def _worker(rank: int, world: int, port: int, out: str, job: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    out = Path(out)
    record = _fit(world, rank, out, ckpt=str(out / f"step={SAVE_AT}.ckpt") if job == "resume" else None)
    torch.save(record, out / f"{job}-rank{rank}.pt")
    if job == "train":
        _dispatch_grads(rank, world, out)


def _spawn(world: int, out: Path, job: str) -> list[dict]:
    mp.spawn(_worker, args=(world, free_port(), str(out), job), nprocs=world, join=True)
    return [torch.load(out / f"{job}-rank{r}.pt", weights_only=False) for r in range(world)]


# -- the single-process oracle ---------------------------------------------------------------------


def single_process_run(init: dict[str, torch.Tensor]) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The module's objective in a plain loop on one process, the model's own (dropless) experts."""
    from torch.optim.lr_scheduler import LambdaLR

    from lightning_llm.models import build_model
    from lightning_llm.modules.pretrain import next_token_loss, parameter_groups, warmup_cosine
    from lightning_llm.modules.router import load_balancing_loss, router_z_loss

    model = build_model("tiny-moe", vocab_size=VOCAB)
    model.load_state_dict(init)
    optimizer = torch.optim.AdamW(parameter_groups(model, HP["weight_decay"]), lr=HP["lr"], betas=HP["betas"])
    schedule = LambdaLR(optimizer, lambda s: warmup_cosine(s, HP["warmup_steps"], STEPS, HP["min_lr_ratio"]))
    top_k, losses = model.config.num_experts_per_tok, []
    for step in range(STEPS):
        batch = global_batches()[step % SAVE_AT]
        outputs = model(input_ids=batch["input_ids"], use_cache=False, output_router_logits=True)
        loss = next_token_loss(outputs.logits, batch["targets"])
        per_half = ROWS // RANKS * SEQ  # router logits are [tokens, experts], the tokens row by row
        for r in range(RANKS):
            logits = tuple(layer[r * per_half:(r + 1) * per_half] for layer in outputs.router_logits)
            loss = loss + (HP["router_aux_loss_coef"] * load_balancing_loss(logits, top_k)
                           + HP["router_z_loss_coef"] * router_z_loss(logits)) / RANKS
        loss.backward()
        losses.append(loss.item())
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        assert norm > CLIP, f"step {step}: gradient norm {norm:.3f} does not exceed the clip value {CLIP}"
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    return losses, {k: v.detach() for k, v in model.state_dict().items()}


# fp32. Expert parallelism changes no routing and no per-row arithmetic; it reorders sums: the token mean
# (split over the two ranks), each expert's weight gradient (its rows arrive from two ranks in another
# order), and ZeRO's reduction. Every loss is a sum of quantities of its own magnitude whose longest
# reordered sum is the log-sum-exp over the vocabulary, so the relative change is bounded by
# reordered_sum_rtol of VOCAB terms, doubled for the two sides. Weights: assert_adam_steps_close (the
# gradients carry that rounding noise). Routing is discrete: a top-k choice between two experts whose
# probabilities agree to within that noise could flip; at these sizes none does (the losses would show it).
LOSS_TOL = dict(rtol=2 * reordered_sum_rtol(torch.float32, VOCAB), atol=0)
LR_SUM = STEPS * HP["lr"]  # the warm-up and cosine steps are at most HP["lr"] each


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("expert_parallel")
    return {"ep2": _spawn(2, out, "train"), "one": _spawn(1, out, "resume")[0], "out": out}


def test_ep2_equals_one_process(runs):
    records = runs["ep2"]
    init = records[0]["init"]
    expected_losses, expected_weights = single_process_run(init)
    losses = [sum(values) / RANKS for values in zip(*(r["losses"] for r in records))]  # the mean of the ranks' objectives
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected_losses), **LOSS_TOL)
    final = records[0]["final"]
    assert final.keys() == expected_weights.keys()
    experts = [n for n in final if ".experts." in n]
    assert len(experts) == 4  # gate_up_proj and down_proj of two layers
    for name, weight in expected_weights.items():
        assert not torch.equal(weight, init[name]), f"{name} did not train"
    assert_adam_steps_close(final, expected_weights, lr_sum=LR_SUM)


def test_ep2_each_rank_holds_half_of_every_parameter(runs):
    from lightning_llm.models import build_model

    with torch.device("meta"):
        model = build_model("tiny-moe", vocab_size=VOCAB)
    total = sum(p.numel() for p in model.parameters())  # every dimension split here is even: exact halves
    assert [r["param_bytes"] for r in runs["ep2"]] == [4 * total // RANKS] * RANKS


def test_expert_token_counts_sum_to_tokens_times_k(runs):
    top_k = 2
    for step in range(STEPS):
        dispatched = sum(r["dispatched"][step] for r in runs["ep2"])  # [layers, experts], summed over the ranks
        assert dispatched.sum(dim=1).tolist() == [ROWS * SEQ * top_k] * 2
        logged = runs["ep2"][0]["logged"][step]
        assert {k: v for k, v in logged.items()} == {
            f"train/expert_tokens/layer{layer}/expert{e}": float(dispatched[layer, e])
            for layer in range(2) for e in range(4)}


def test_ep2_checkpoint_resumes_on_one_process(runs):
    uninterrupted = [sum(values) / RANKS for values in zip(*(r["losses"] for r in runs["ep2"]))][SAVE_AT:]
    resumed = runs["one"]["losses"]
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(uninterrupted), **LOSS_TOL)
    assert_adam_steps_close(runs["one"]["final"], runs["ep2"][0]["final"], lr_sum=LR_SUM)


def test_ep2_checkpoint_exports_the_whole_experts(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    from lightning_llm.export import export_checkpoint

    final = runs["ep2"][0]["final"]
    exported = AutoModelForCausalLM.from_pretrained(export_checkpoint(runs["out"] / f"step={STEPS}.ckpt", tmp_path / "hf"))
    state = exported.state_dict()
    assert state["model.layers.0.mlp.experts.gate_up_proj"].shape[0] == 4  # all experts, joined from both ranks
    assert all(torch.equal(state[name], weight) for name, weight in final.items())


# -- capacity factor ----------------------------------------------------------------------------------


def naive_experts_with_capacity(experts, hidden, top_k_index, top_k_weights, capacity_factor):
    """Token by token: each expert takes the first ceil(cf x T x k / E) pairs routed to it, in token order."""
    tokens, top_k = top_k_index.shape
    capacity = math.ceil(capacity_factor * tokens * top_k / experts.num_experts)
    taken = [0] * experts.num_experts
    out, dropped = torch.zeros_like(hidden), 0
    for t in range(tokens):
        for slot in range(top_k):
            e = int(top_k_index[t, slot])
            if taken[e] >= capacity:
                dropped += 1
                continue
            taken[e] += 1
            gate, up = (experts.gate_up_proj[e] @ hidden[t]).chunk(2)
            out[t] += top_k_weights[t, slot] * (experts.down_proj[e] @ (experts.act_fn(gate) * up))
    return out, dropped / (tokens * top_k)


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.25])
def test_capacity_factor_drops_as_a_naive_router(capacity_factor):
    from lightning_llm.models import build_model

    torch.manual_seed(0)
    # another shape than the preset's: 5 experts, top-3, odd widths
    model = build_model("tiny-moe", vocab_size=64, num_experts=5, num_experts_per_tok=3, hidden_size=40,
                        moe_intermediate_size=24, num_attention_heads=4, num_key_value_heads=2)
    block = model.model.layers[0].mlp
    hidden = torch.randn(37, 40)
    _, weights, index = block.gate(hidden)
    expected, dropped = naive_experts_with_capacity(block.experts, hidden, index, weights, capacity_factor)
    dispatch = use_capacity(model, capacity_factor)[0]
    assert dispatch.experts is block.experts
    with torch.no_grad():
        actual = block.experts(hidden, index, weights)
    # The same products summed in another order (a grouped matmul against one matrix-vector product per
    # pair): each output element chains a sum over the 40 hidden units, one over the 24 expert units and one
    # over the top-3, each bounded by reordered_sum_rtol of its terms; the terms (random signs, unit-scale
    # inputs) add up to a few times the largest output, so 10 x the largest output bounds each sum's terms.
    atol = 3 * reordered_sum_rtol(torch.float32, 40) * 10 * expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)
    assert dispatch.dropped_fraction.item() == pytest.approx(dropped, abs=1e-7)
    if capacity_factor < 1:  # the experts take fewer pairs in all than there are: some must drop
        assert dropped > 0


def test_dropless_dispatch_computes_what_the_model_computes():
    from lightning_llm.models import build_model

    torch.manual_seed(0)
    model = build_model("tiny-moe", vocab_size=64)
    ids = torch.randint(0, 64, (2, 11))
    expected = model(ids).logits
    dispatch = use_capacity(model, None)
    assert len(dispatch) == 2 and all(isinstance(d, ExpertDispatch) for d in dispatch)
    # The same rows per expert and the same top-k sum: only the row order inside an expert's group may differ
    # (the model's sort against a stable one), which a GEMM kernel may round differently at the tail of a block.
    # Four such sums per logit (gate-up over 64, down over 96, two layers), terms below 4 in magnitude.
    torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=4 * 4 * reordered_sum_rtol(torch.float32, 96))
    assert all(d.dropped_fraction.item() == 0 for d in dispatch)


@pytest.mark.parametrize("bad", [0, -1.0, True])
def test_capacity_factor_is_validated(bad):
    from lightning_llm.models import build_model

    with pytest.raises(ValueError, match=rf"capacity_factor must be a number > 0.*got {bad!r}"):
        use_capacity(build_model("tiny-moe", vocab_size=64), bad)


def test_expert_parallel_must_equal_the_data_parallel_degree():
    strategy = ParallelStrategy(data_parallel=4, expert_parallel=2)
    strategy._setup_distributed = lambda: None
    strategy.set_world_ranks = lambda: None
    strategy.cluster_environment = type("Env", (), {"world_size": lambda self: 4, "creates_processes_externally": False})()
    with pytest.raises(ValueError, match=r"expert_parallel=2 must equal the data-parallel degree 4"):
        strategy.setup_environment()


# -- the dispatch alone, on another shape: gradients, and a rank whose experts get no token ---------------

SHAPE = dict(vocab_size=96, num_experts=6, num_experts_per_tok=3, hidden_size=40, moe_intermediate_size=24,
             num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)


def _route_to_rank_zero(model) -> None:
    """Layer 1 sends every route to experts 0-2 (rank 0's at ep2): rank 1's experts get no rows."""
    model.model.layers[1].mlp.gate.register_forward_hook(lambda m, args, out: (out[0], out[1], out[2] % 3))


def _dispatch_grads(rank: int, world: int, out: Path) -> None:
    """Run in the processes of the ep2 job after training (their process group still up)."""
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_llm.models import build_model
    from lightning_llm.strategies.expert import plan_experts, shard_experts

    torch.manual_seed(0)  # the same model on both ranks (the experts are then rank 0's: the same again)
    model = build_model("tiny-moe", **SHAPE)
    _route_to_rank_zero(model)
    shard_experts(list(model.modules()), plan_experts(model, world), init_device_mesh("cpu", (world,)))
    tokens = torch.randint(0, 96, (4, 13), generator=torch.Generator().manual_seed(1)).chunk(world)[rank]
    logits = model(input_ids=tokens[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    received = [d.tokens_per_expert for d in dispatches(model)]
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if ".experts." in n}
    torch.save({"loss": loss.item(), "grads": grads, "received": received}, out / f"grads-rank{rank}.pt")


def test_dispatch_gradients_equal_one_process_on_another_shape(runs):
    from lightning_llm.models import build_model

    ranks = [torch.load(runs["out"] / f"grads-rank{r}.pt") for r in range(2)]
    torch.manual_seed(0)
    model = build_model("tiny-moe", **SHAPE)
    _route_to_rank_zero(model)
    tokens = torch.randint(0, 96, (4, 13), generator=torch.Generator().manual_seed(1))
    halves_loss = [torch.nn.functional.cross_entropy(model(input_ids=h[:, :-1]).logits.flatten(0, 1), h[:, 1:].flatten())
                   for h in tokens.chunk(2)]
    (sum(halves_loss) / 2).backward()  # the mean of the ranks' losses, as data parallelism averages
    assert sum(r["received"][1][3:].sum() for r in ranks) == 0  # layer 1: nothing for rank 1's experts
    for r, expected in zip(ranks, halves_loss, strict=True):
        assert r["loss"] == pytest.approx(expected.item(), rel=2 * reordered_sum_rtol(torch.float32, 96))
    for name, p in model.named_parameters():
        if ".experts." in name:
            # an expert's gradient sums over the 48 tokens x 3 routes of the global batch, in another order
            # on each rank; the rest of each element's arithmetic is the same
            bound = reordered_sum_rtol(torch.float32, 48 * 3) * p.grad.abs().max().item() + 1e-12
            torch.testing.assert_close(ranks[0]["grads"][name], p.grad, rtol=0, atol=bound)
            assert torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name])


def test_module_logs_the_dropped_fraction_and_refuses_it_for_a_dense_model():
    from lightning_llm.modules.pretrain import PretrainModule

    torch.manual_seed(0)
    module = PretrainModule("tiny-moe", vocab_size=256, capacity_factor=0.5)
    module.configure_model()
    logged = {}
    module.log = lambda name, value, **kwargs: logged.__setitem__(name, float(value))  # no trainer to log to
    module._data_parallel_size = lambda: 1
    batch = {"input_ids": torch.randint(0, 256, (2, 9))}
    batch["targets"] = torch.roll(batch["input_ids"], -1, dims=1)
    module.training_loss(batch)
    # the naive router's drops, layer by layer, on the hidden states each layer's experts received
    layers = module.model.model.layers
    inputs = {}
    hooks = [layer.mlp.experts.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args))
             for i, layer in enumerate(layers)]
    with torch.no_grad():
        module.model(batch["input_ids"])
    for hook in hooks:
        hook.remove()
    naive = [naive_experts_with_capacity(layer.mlp.experts, *inputs[i], 0.5)[1] for i, layer in enumerate(layers)]
    assert logged["train/dropped_fraction"] == pytest.approx(sum(naive) / len(naive), abs=1e-6)
    assert logged["train/dropped_fraction"] > 0  # half the capacity of an even load: some pairs must drop
    with pytest.raises(ValueError, match=r"capacity_factor=1.0 applies to a mixture-of-experts model; 'tiny' is dense"):
        PretrainModule("tiny", capacity_factor=1.0).configure_model()


def test_the_ep2_example_parses(capsys):
    from lightning_llm.cli import main

    example = Path(__file__).parent.parent / "examples" / "pretrain_moe_ep2.yaml"
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(example), "--print_config"])
    assert info.value.code == 0
    import yaml

    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["strategy"]["init_args"]["expert_parallel"] == 2
    assert printed["trainer"]["devices"] == 2 and printed["model"]["init_args"]["model"] == "moe-100m"

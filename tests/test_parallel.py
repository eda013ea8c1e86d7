"""ParallelStrategy against single-process training: tensor (and sequence) parallelism with ZeRO on gloo.

One 2-rank job trains at tp2 with sequence parallelism (checkpointing half way) and at tp2 without it;
one 1-rank job resumes the tp2 checkpoint; one 4-rank job trains dp2 x tp2 (ZeRO-3) for a few steps.
The tests compare what they wrote against a plain PyTorch loop on one process over the same global
batches, started from the weights the distributed run recorded.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp

from _precision_helpers import free_port
from lightning_llm.strategies.parallel import ParallelStrategy
from lightning_llm.strategies.tensor import check_divisible, plan_styles
from tolerances import assert_adam_steps_close, reordered_sum_rtol

VOCAB, ROWS, SEQ = 512, 4, 16  # the global batch is ROWS x SEQ tokens
STEPS, SAVE_AT = 6, 3
HP = dict(lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), warmup_steps=2, min_lr_ratio=0.1, max_steps=STEPS)
CLIP = 0.2  # below every step's gradient norm: clipping always acts, so a wrong global norm would show


def global_batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    batches = []
    for _ in range(SAVE_AT):
        tokens = torch.randint(0, VOCAB, (ROWS, SEQ + 1), generator=g)
        batches.append({"input_ids": tokens[:, :-1], "targets": tokens[:, 1:]})
    return batches


def _loader(data_rank: int, data_parallel: int):
    """The rows of every global batch that one data-parallel coordinate trains on (the sampler is off:
    the split is explicit, and the ranks of one tensor-parallel group get the same rows)."""
    rows = ROWS // data_parallel
    batches = [{k: v[data_rank * rows:(data_rank + 1) * rows] for k, v in b.items()} for b in global_batches()]
    return torch.utils.data.DataLoader(batches, batch_size=None)


# -- what runs in the spawned processes ----------------------------------------------------------


def _module(model: object = "tiny"):
    from lightning_llm.modules.pretrain import PretrainModule

    return PretrainModule(model, vocab_size=VOCAB, **HP)


def _one_kv_head():
    """The tiny preset with one kv-head for its 4 query heads: at tp2 both ranks hold it (replicated)."""
    from lightning_llm.models import build_config

    return build_config("tiny", num_key_value_heads=1)


def _trainer(world: int, strategy: ParallelStrategy | str, callbacks: list, ckpt_dir: Path | None = None,
             plugins: list = ()):
    from lightning.pytorch.callbacks import ModelCheckpoint

    if ckpt_dir is not None:
        callbacks = [*callbacks, ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", every_n_train_steps=SAVE_AT,
                                                 save_top_k=-1, save_last=True)]
    return L.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_steps=STEPS, logger=False,
                     enable_checkpointing=ckpt_dir is not None, enable_progress_bar=False, enable_model_summary=False,
                     use_distributed_sampler=False, gradient_clip_val=CLIP, callbacks=callbacks, plugins=list(plugins))


def _recorder(record: dict):
    from test_zero import full_weights

    class Recorder(L.Callback):
        def on_train_start(self, trainer, pl_module):
            from lightning_llm.strategies.zero import state_bytes

            record["init"] = full_weights(pl_module.model)
            record["sampler"] = getattr(trainer.strategy, "distributed_sampler_kwargs", None)
            record["param_bytes"] = state_bytes(pl_module)["params"]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            record.setdefault("losses", []).append(outputs["loss"].item())
            record["tokens"] = pl_module.tokens_seen

        def on_train_end(self, trainer, pl_module):
            record["final"] = full_weights(pl_module.model)

    return Recorder()


def _fit(world: int, rank: int, tp: int, out: Path, ckpt: str | None = None, save: bool = False, module=None,
         **options) -> dict:
    record: dict = {}
    torch.manual_seed(10 * rank)  # ranks draw different numbers: the model must not depend on it
    strategy = ParallelStrategy(tensor_parallel=tp, **options)
    trainer = _trainer(world, strategy, [_recorder(record)], out if save else None)
    module = module or _module()
    loader = _loader(rank // tp, world // tp)
    # With checkpoints, validation on the training batches at each epoch's end (steps run vocabulary-parallel too).
    trainer.fit(module, loader, loader if save else None, ckpt_path=ckpt)
    record["val_history"] = module.val_history
    return record


def _worker(rank: int, world: int, port: int, out: str, job: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    out = Path(out)
    if job == "tp2":
        results = {"sp": _fit(world, rank, 2, out / "sp", save=True, module=(module := _module())),
                   "no-sp": _fit(world, rank, 2, out, sequence_parallel=False, zero_stage=2),
                   "kv1": _fit(world, rank, 2, out, module=_module(_one_kv_head()))}
        with torch.no_grad():  # outside the training steps the LM head's logits come whole
            results["logits"] = module(global_batches()[0]["input_ids"])
    elif job == "resume_on_one":
        results = {"resumed": _fit(world, rank, 1, out, ckpt=str(out / "sp" / f"step={SAVE_AT}.ckpt"))}
    elif job == "dp2xtp2":  # then, in the same processes, its checkpoint resumed at dp4 (tp1)
        results = {"dp2xtp2": _fit(world, rank, 2, out / "dp2xtp2", save=True),
                   "resumed": _fit(world, rank, 1, out, ckpt=str(out / "dp2xtp2" / f"step={SAVE_AT}.ckpt"))}
    else:  # "resume_dp2xtp2_at_tp<n>": that checkpoint resumed on world // n data-parallel ranks x tp n
        results = {"resumed": _fit(world, rank, int(job[-1]), out, ckpt=str(out / "dp2xtp2" / f"step={SAVE_AT}.ckpt"))}
    torch.save(results, out / f"{job}-rank{rank}.pt")


def _spawn(world: int, out: Path, job: str) -> list[dict]:
    mp.spawn(_worker, args=(world, free_port(), str(out), job), nprocs=world, join=True)
    return [torch.load(out / f"{job}-rank{r}.pt", weights_only=False) for r in range(world)]


# -- the single-process oracle ---------------------------------------------------------------------


def single_process_run(init: dict[str, torch.Tensor], steps: int,
                       model_spec: object = "tiny") -> tuple[list[float], dict[str, torch.Tensor]]:
    """The same recipe in a plain PyTorch loop on one process over the whole global batches."""
    from torch.optim.lr_scheduler import LambdaLR

    from lightning_llm.models import build_model
    from lightning_llm.modules.pretrain import next_token_loss, parameter_groups, warmup_cosine

    model = build_model(model_spec, vocab_size=VOCAB)
    model.load_state_dict(init)
    optimizer = torch.optim.AdamW(parameter_groups(model, HP["weight_decay"]), lr=HP["lr"], betas=HP["betas"])
    schedule = LambdaLR(optimizer, lambda s: warmup_cosine(s, HP["warmup_steps"], STEPS, HP["min_lr_ratio"]))
    losses = []
    epoch = global_batches()
    for step in range(steps):
        batch = epoch[step % len(epoch)]
        loss = next_token_loss(model(input_ids=batch["input_ids"], use_cache=False).logits, batch["targets"])
        loss.backward()
        losses.append(loss.item())
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        assert norm > CLIP, f"step {step}: gradient norm {norm:.3f} does not exceed the clip value {CLIP}"
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    return losses, {k: v.detach() for k, v in model.state_dict().items()}


# -- the tests -------------------------------------------------------------------------------------

# fp32. A loss is a mean of ROWS x SEQ token losses; tensor parallelism splits each logit's dot product
# over the hidden units (64) and the intermediate ones (192) into per-rank partial sums, the log-sum-exp
# over the vocabulary (512) into per-rank ones, and data parallelism the token mean: every split is a
# reordering of one of those sums, each bounded by reordered_sum_rtol of its terms. The loss is a sum
# of such quantities of its own magnitude, so the largest sum (the vocabulary) bounds the relative
# change, doubled for the two sides. Weights: assert_adam_steps_close (the gradients carry the same noise).
LOSS_TOL = dict(rtol=2 * reordered_sum_rtol(torch.float32, VOCAB), atol=0)
LR_SUM = STEPS * HP["lr"]  # the warm-up and cosine steps are at most HP["lr"] each
# A logit passes through five reordered sums in sequence (attention and MLP outputs of two layers, the
# head), the longest over 192 terms; each moves it by reordered_sum_rtol of its terms' magnitudes, which
# stay below 4 (twice the tiny model's largest activations and logits after a few steps).
LOGITS_ATOL = 5 * 4 * reordered_sum_rtol(torch.float32, 192)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel")
    return {"tp2": _spawn(2, out, "tp2"), "one": _spawn(1, out, "resume_on_one")[0], "out": out}


def _assert_equals_one_process(records: list[dict], oracle: tuple | None = None, first_step: int = 0,
                               model_spec: object = "tiny") -> None:
    """The records' losses from `first_step` on and final weights equal the one-process run's (`oracle`:
    that run, if already computed from the same initial weights)."""
    init = records[0].get("init") if oracle is None else None  # the whole state dict, gathered on rank 0
    expected_losses, expected_weights = oracle or single_process_run(init, STEPS, model_spec)
    # Each rank logs its data-parallel group's loss over an equal share of tokens: the global loss is their mean.
    losses = [sum(values) / len(values) for values in zip(*(r["losses"] for r in records))]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected_losses[first_step:]), **LOSS_TOL)
    final = records[0]["final"]
    assert final.keys() == expected_weights.keys()
    if init is not None:
        for name, weight in expected_weights.items():
            assert not torch.equal(weight, init[name]), f"{name} did not train"
    assert_adam_steps_close(final, expected_weights, lr_sum=LR_SUM)


def _param_bytes(tp: int, dp: int) -> int:
    """fp32 bytes of one rank's parameters: the split matrices 1/(tp x dp), the norms (replicated over the
    tensor-parallel group) 1/dp; the tied embedding counted once. Exact: every dimension divides evenly."""
    from lightning_llm.models import build_model

    with torch.device("meta"):
        model = build_model("tiny", vocab_size=VOCAB)
    matrices = sum(p.numel() for p in model.parameters() if p.ndim == 2)
    norms = sum(p.numel() for p in model.parameters() if p.ndim == 1)
    return 4 * (matrices // (tp * dp) + norms // dp)


@pytest.mark.parametrize("layout", ["sp", "no-sp"])  # no-sp also runs ZeRO stage 2
def test_tp2_equals_one_process(runs, layout):
    records = [rank[layout] for rank in runs["tp2"]]
    _assert_equals_one_process(records)
    for record in records:  # one tensor-parallel group: one data-parallel replica, every token counted once
        assert record["sampler"] == {"num_replicas": 1, "rank": 0}
        assert record["tokens"] == STEPS * ROWS * SEQ
        assert record["param_bytes"] == _param_bytes(tp=2, dp=1)


def test_tp2_replicates_a_kv_head_that_the_degree_does_not_split(runs):
    """One kv-head for 4 query heads at tp2: each rank computes the kv-head its query heads use, and the
    replicated k/v weights' gradients are summed over the ranks (else they would miss half their terms)."""
    records = [rank["kv1"] for rank in runs["tp2"]]
    _assert_equals_one_process(records, model_spec=_one_kv_head())
    assert records[0]["final"]["model.layers.0.self_attn.k_proj.weight"].shape == (16, 64)  # whole: one head


def test_tp2_validation_and_whole_logits_equal_one_process(runs):
    from lightning_llm.models import build_model
    from lightning_llm.modules.pretrain import next_token_loss

    model = build_model("tiny", vocab_size=VOCAB)
    model.load_state_dict(runs["tp2"][0]["sp"]["final"])
    batches = global_batches()
    with torch.no_grad():
        losses = [next_token_loss(model(input_ids=b["input_ids"]).logits, b["targets"]) for b in batches]
        logits = model(input_ids=batches[0]["input_ids"]).logits
    for rank in runs["tp2"]:
        # Equal token counts per batch: the token-weighted mean is the mean of the batch means.
        step, value = rank["sp"]["val_history"][-1]
        assert step == STEPS
        torch.testing.assert_close(torch.tensor(value), torch.stack(losses).mean(), **LOSS_TOL)
        assert rank["logits"].shape == logits.shape and not hasattr(rank["logits"], "placements")
        torch.testing.assert_close(rank["logits"], logits, rtol=0, atol=LOGITS_ATOL)


def test_tp2_checkpoint_resumes_on_one_process(runs):
    uninterrupted = runs["tp2"][0]["sp"]["losses"][SAVE_AT:]
    resumed = runs["one"]["resumed"]
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(uninterrupted), **LOSS_TOL)
    assert_adam_steps_close(resumed["final"], runs["tp2"][0]["sp"]["final"], lr_sum=LR_SUM)


def test_tp2_checkpoint_consolidates_into_an_export(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    from lightning_llm.export import export_checkpoint, load_checkpoint

    last = runs["out"] / "sp" / "last.ckpt"
    final = runs["tp2"][0]["sp"]["final"]
    checkpoint = load_checkpoint(last)
    assert checkpoint["global_step"] == STEPS
    assert all(torch.equal(checkpoint["state_dict"][f"model.{name}"], weight) for name, weight in final.items())
    exported = AutoModelForCausalLM.from_pretrained(export_checkpoint(last, tmp_path / "hf")).state_dict()
    assert all(torch.equal(exported[name], weight) for name, weight in final.items())


@pytest.mark.slow
def test_dp2_x_tp2_equals_one_process_and_resumes_on_every_layout(tmp_path):
    """dp2 x tp2 (ZeRO-3) trains as one process does; its half-way checkpoint resumes at dp4 (tp1), at tp2
    (dp1) and on one process, each continuing as the one-process run does; its last one exports whole."""
    from transformers import AutoModelForCausalLM

    from lightning_llm.export import export_checkpoint

    runs = _spawn(4, tmp_path, "dp2xtp2")
    records = [rank["dp2xtp2"] for rank in runs]
    oracle = single_process_run(records[0]["init"], STEPS)
    _assert_equals_one_process(records, oracle)
    assert [r["sampler"] for r in records] == [{"num_replicas": 2, "rank": r // 2} for r in range(4)]
    assert all(r["tokens"] == STEPS * ROWS * SEQ and r["param_bytes"] == _param_bytes(tp=2, dp=2) for r in records)
    resumed = {"dp4": [rank["resumed"] for rank in runs],
               "tp2": [rank["resumed"] for rank in _spawn(2, tmp_path, "resume_dp2xtp2_at_tp2")],
               "one": [rank["resumed"] for rank in _spawn(1, tmp_path, "resume_dp2xtp2_at_tp1")]}
    for layout, records_after in resumed.items():
        assert len(records_after[0]["losses"]) == STEPS - SAVE_AT, layout
        _assert_equals_one_process(records_after, oracle, first_step=SAVE_AT)
        assert all(r["tokens"] == STEPS * ROWS * SEQ for r in records_after), layout  # tokens_seen resumed too
    exported = AutoModelForCausalLM.from_pretrained(export_checkpoint(tmp_path / "dp2xtp2" / "last.ckpt", tmp_path / "hf"))
    final = records[0]["final"]
    assert all(torch.equal(exported.state_dict()[name], weight) for name, weight in final.items())
    assert_adam_steps_close(exported.state_dict(), oracle[1], lr_sum=LR_SUM)


# -- setup errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(tensor_parallel=0), ValueError, r"tensor_parallel': 0"),
    (dict(data_parallel="two"), ValueError, r"data_parallel': 'two'"),
    (dict(microbatches=2), ValueError, r"\{'microbatches': 2\} configure a pipeline, but pipeline_parallel=1"),
    (dict(pipeline_parallel=2, microbatches=1), ValueError,
     r"microbatches=1 with schedule='1f1b' and pipeline_parallel=2: .* use microbatches >= 2"),
    (dict(context_parallel=0), ValueError, r"context_parallel': 0"),
    (dict(context_parallel=2, pipeline_parallel=2), NotImplementedError, r"context_parallel=2 with pipeline_parallel=2"),
    (dict(context_parallel=2, expert_parallel=2), NotImplementedError, r"context_parallel=2 with .*expert_parallel=2"),
    (dict(context_parallel=2, context_parallel_mode="ulysses"), ValueError,
     r"context_parallel_mode must be one of \('ring', 'all_to_all'\), got 'ulysses'"),
    (dict(context_parallel_mode="all_to_all"), ValueError, r"context_parallel_mode='all_to_all' .* context_parallel=1"),
    (dict(expert_parallel=2, tensor_parallel=2), NotImplementedError, r"expert_parallel=2 with tensor_parallel=2"),
    (dict(expert_parallel=2, zero_stage=1), NotImplementedError, r"expert_parallel=2 with .*zero_stage=1"),
    (dict(expert_parallel=2, pipeline_parallel=2), NotImplementedError, r"expert_parallel=2 with pipeline_parallel=2"),
    (dict(zero_stage=4), ValueError, r"zero_stage must be one of \(1, 2, 3\), got 4"),
    (dict(zero_stage=1, tensor_parallel=2), NotImplementedError, r"zero_stage=1 with tensor_parallel=2"),
    (dict(pipeline_parallel=2, schedule="interleaved-zero-bubble"), NotImplementedError,
     r"zero_stage=3 with schedule='interleaved-zero-bubble'.* Use zero_stage=1 or 2 with this schedule, or "
     r"schedule='interleaved-1f1b' with zero_stage=3"),
])
def test_bad_degrees_name_the_value(kwargs, error, match):
    with pytest.raises(error, match=match):
        ParallelStrategy(**kwargs)


@pytest.mark.parametrize("degrees, match", [
    (dict(data_parallel=2, tensor_parallel=2), r"pipeline_parallel=1 x data_parallel=2 x context_parallel=1 x tensor_parallel=2 must equal the world size 2"),
    (dict(pipeline_parallel=2, tensor_parallel=1), r"pipeline_parallel=2 x data_parallel='auto' x context_parallel=1 x tensor_parallel=1 must equal the world size 3.*multiple of the other degrees' product 2"),
])
def test_degrees_must_multiply_to_the_world_size(degrees, match):
    world = 3 if degrees.get("pipeline_parallel") else 2
    strategy = ParallelStrategy(**degrees)
    strategy._setup_distributed = lambda: None
    strategy.set_world_ranks = lambda: None
    strategy.cluster_environment = type("Env", (), {"world_size": lambda self: world, "creates_processes_externally": False})()
    with pytest.raises(ValueError, match=match):
        strategy.setup_environment()


@pytest.mark.parametrize("field, value, degree", [
    ("num_attention_heads", 5, 2), ("num_key_value_heads", 3, 2), ("num_key_value_heads", 3, 4),
    ("intermediate_size", 191, 2), ("vocab_size", 511, 2)])
def test_sizes_not_divisible_by_the_degree_are_refused(field, value, degree):
    from lightning_llm.models import build_config

    config = build_config("tiny", num_attention_heads=12, num_key_value_heads=4, head_dim=16)
    setattr(config, field, value)
    with pytest.raises(ValueError, match=rf"tensor_parallel={degree} does not divide {{'{field}': {value}}}"):
        check_divisible(config, degree)
    for kv_heads, degree in [(4, 2), (4, 4), (2, 4), (1, 4)]:  # kv-heads split, or replicated (a divisor of the degree)
        check_divisible(build_config("tiny", num_attention_heads=12, num_key_value_heads=kv_heads, head_dim=16), degree)


def test_plan_comes_from_the_hugging_face_plan():
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from lightning_llm.models import build_model
    from lightning_llm.strategies.tensor import RegionInput, Replicated

    with torch.device("meta"):
        model = build_model("tiny", vocab_size=VOCAB)
    styles = {name: type(plan_styles(model, True)[m]).__name__ for name, m in model.named_modules()
              if m in plan_styles(model, True)}
    layer = {k.split("layers.0.")[1]: v for k, v in styles.items() if "layers.0." in k}
    assert layer == {"self_attn": "RegionInput", "self_attn.q_proj": "ColwiseParallel",
                     "self_attn.k_proj": "ColwiseParallel", "self_attn.v_proj": "ColwiseParallel",
                     "self_attn.o_proj": "RowwiseParallel", "mlp": "RegionInput", "mlp.gate_proj": "ColwiseParallel",
                     "mlp.up_proj": "ColwiseParallel", "mlp.down_proj": "RowwiseParallel",
                     "input_layernorm": "SequenceParallel", "post_attention_layernorm": "SequenceParallel"}
    assert {k: v for k, v in styles.items() if "layers." not in k} == {
        "model.embed_tokens": "RowwiseParallel", "model.norm": "SequenceParallel", "lm_head": "ColwiseParallel"}
    assert len(styles) == 3 + 11 * model.config.num_hidden_layers
    without_sp = {type(s) for s in plan_styles(model, False).values()}
    assert without_sp == {ColwiseParallel, RowwiseParallel, RegionInput, Replicated}
    # tp4 over the tiny model's 2 kv-heads: k and v replicated (one head per pair of ranks), q still split.
    attention = model.model.layers[0].self_attn
    at_tp4 = plan_styles(model, True, degree=4)
    assert [type(at_tp4[m]).__name__ for m in (attention.q_proj, attention.k_proj, attention.v_proj)] == [
        "ColwiseParallel", "KeyValueHead", "KeyValueHead"]


def _adapted(config_kwargs: dict, lora_kwargs: dict, quantized: bool = False):
    from peft import LoraConfig, get_peft_model

    from lightning_llm.callbacks.lora import quantize_4bit
    from lightning_llm.models import build_model

    model = build_model("tiny", vocab_size=VOCAB, **config_kwargs)
    if quantized:
        model = quantize_4bit(model, compute_dtype=torch.float32)
    return get_peft_model(model, LoraConfig(**{"r": 4, "lora_dropout": 0.0, **lora_kwargs})).base_model.model


def test_lora_adapters_are_placed_beside_their_base():
    """Column-split projections: A replicated, B split like the base; row-split ones: A split like the base
    (its output on the residual stream's layout, kept a DTensor), B replicated (a DTensor out under SP)."""
    from lightning_llm.strategies.tensor import Replicated

    model = _adapted({}, dict(target_modules="all-linear", r=3))
    for sequence_parallel in (True, False):
        styles = plan_styles(model, sequence_parallel, degree=2)
        attention, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
        for column in (attention.q_proj, attention.k_proj, attention.v_proj, mlp.gate_proj, mlp.up_proj):
            a, b = styles[column.lora_A["default"]], styles[column.lora_B["default"]]
            assert type(styles[column.base_layer]).__name__ == "ColwiseParallel" and column not in styles
            assert isinstance(a, Replicated) and a.use_local_output is False and type(b).__name__ == "ColwiseParallel"
        for row in (attention.o_proj, mlp.down_proj):
            a, b = styles[row.lora_A["default"]], styles[row.lora_B["default"]]
            assert type(styles[row.base_layer]).__name__ == type(a).__name__ == "RowwiseParallel"
            assert a.output_layouts == styles[row.base_layer].output_layouts and a.use_local_output is False
            assert isinstance(b, Replicated) and b.use_local_output is not sequence_parallel


@pytest.mark.parametrize("config, lora, quantized, match", [
    (dict(num_key_value_heads=1), dict(target_modules=["q_proj", "k_proj"]), False,
     r"self_attn\.k_proj is a Linear adapter layer that tensor parallelism does not place: it sits on replicated "
     r"kv-heads .* leave k_proj and v_proj out of target_modules"),
    ({}, dict(target_modules=["v_proj"], lora_dropout=0.05), False,
     r"v_proj .* lora dropout \{'default': 0\.05\}: .* use dropout=0\.0"),
    ({}, dict(target_modules=["o_proj"], use_dora=True), False, r"o_proj .* variant \['default'\] \(DoRA"),
    (dict(num_key_value_heads=1), dict(target_modules=["q_proj"]), True,
     r"k_proj: a 4-bit \(QLoRA\) projection of 1 kv-heads at tensor_parallel=2: replicated kv-heads are not built "
     r"for a 4-bit base; use a degree that divides the kv-heads"),
    ({}, dict(target_modules=["lm_head"]), False,
     r"lm_head: a Linear adapter layer on the 'colwise_gather_output' entry .* leave this layer out of target_modules"),
])
def test_lora_adapters_that_tensor_parallelism_does_not_place_are_refused_by_name(config, lora, quantized, match):
    model = _adapted(config, lora, quantized)
    with pytest.raises(NotImplementedError, match=match):
        plan_styles(model, True, degree=2)


def test_parallel_is_a_strategy_name():
    from lightning.pytorch.strategies import StrategyRegistry

    import lightning_llm  # noqa: F401  (registers the names)

    strategy = StrategyRegistry.get("parallel")
    assert isinstance(strategy, ParallelStrategy) and strategy.stage == 3 and strategy.tensor_parallel == 1

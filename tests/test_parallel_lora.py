"""LoRA adapters under tensor parallelism (strategies/tensor.py, `adapter_styles`) against one process.

One 2-rank job trains LoRA adapters on every linear layer of a saved tiny base at tp2 with sequence
parallelism (checkpointing, and writing the adapter at the end), resumes its half-way checkpoint,
trains at tp2 without sequence parallelism, and at tp2 under `MixedPrecision("bf16-mixed")`; the tests compare
the losses and adapters with a one-process run from the same base and the same initial adapters, and the
export of the tp2 checkpoint with the one-process one. One 4-rank job (slow) does the same at dp2 x tp2 on
another shape. A quick 2-rank job counts the collectives each adapter factor issues.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp

from _precision_helpers import free_port
from test_parallel import CLIP, HP, LOSS_TOL, ROWS, SAVE_AT, SEQ, STEPS, VOCAB, _loader
from test_parallel_precision import _plugin, _update_error
from tolerances import UNIT_ROUNDOFF, adam_update_rtol, assert_adam_steps_close, loss_atol

LORA = dict(r=4, alpha=8, dropout=0.0)
# The dp2 x tp2 run: another shape (6 heads of 16 over 2 kv-heads, hidden 96, intermediate 160), rank 3, adapters
# on some projections only (of both kinds: column-split q, v; row-split o, down).
SHAPE = dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, head_dim=16, intermediate_size=160)
LORA_SOME = dict(r=3, alpha=6, dropout=0.0, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
LR_SUM = STEPS * HP["lr"]  # the warm-up and cosine steps are at most HP["lr"] each


class Record(L.Callback):
    """Losses, the pre-clipping gradient norm of every step, and the whole adapters at the start and the end."""

    def __init__(self) -> None:
        self.out: dict = {"losses": [], "norms": []}

    def on_train_start(self, trainer, pl_module):
        from lightning_llm.callbacks.lora import gathered_adapter_state

        self.out["init"] = {k: v.detach().clone() for k, v in gathered_adapter_state(pl_module.model).items()}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        squares = sum((g.full_tensor() if isinstance(g, DTensor) else g).double().square().sum() for g in grads)
        self.out["norms"].append(float(squares.sqrt()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.out["losses"].append(outputs["loss"].item())

    def on_train_end(self, trainer, pl_module):
        from lightning_llm.callbacks.lora import gathered_adapter_state

        self.out["final"] = {k: v.detach().clone() for k, v in gathered_adapter_state(pl_module.model).items()}


def _fit(world: int, rank: int, tp: int, base: Path, root: Path, lora: dict = LORA, ckpt: Path | None = None,
         qlora: bool = False, precision: str | None = None, **options) -> dict:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_llm.callbacks.lora import LoRACallback, QLoRACallback
    from lightning_llm.modules.pretrain import PretrainModule
    from lightning_llm.strategies.parallel import ParallelStrategy

    torch.manual_seed(0)  # the same initial adapters on every rank and in the one-process run
    record = Record()
    # QLoRA in fp32 compute: the dequantized NF4 weights are the same numbers on every rank and in one process,
    # so the fp32 tolerances hold; no gradient checkpointing (it recomputes the same forward, nothing to compare).
    adapters = partial(QLoRACallback, compute_dtype="float32", gradient_checkpointing=False) if qlora else LoRACallback
    # LoRA needs the base's weights: the whole model is built on every rank (empty_init=False), then split.
    strategy = ParallelStrategy(tensor_parallel=tp, empty_init=False, **options) if world > 1 else "auto"
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_steps=STEPS, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        gradient_clip_val=CLIP, default_root_dir=root, num_sanity_val_steps=0,
                        callbacks=[record, adapters(**lora, adapter_dir=str(root / "adapter")),
                                   ModelCheckpoint(dirpath=root / "ckpt", filename="{step}", save_last=True,
                                                   save_top_k=-1, every_n_train_steps=SAVE_AT)],
                        plugins=[_plugin(precision)] if precision else None)
    trainer.fit(PretrainModule(str(base), **HP), _loader(rank // tp, world // tp), ckpt_path=ckpt)
    return record.out


def _worker(rank: int, world: int, port: int, out: str, base: str, job: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    out, base = Path(out), Path(base)
    if job == "tp2":
        results = {"sp": _fit(world, rank, 2, base, out / "sp"),
                   "no-sp": _fit(world, rank, 2, base, out / "no-sp", sequence_parallel=False, zero_stage=2),
                   "resumed": _fit(world, rank, 2, base, out / "resumed", ckpt=out / "sp" / "ckpt" / f"step={SAVE_AT}.ckpt"),
                   "bf16": _fit(world, rank, 2, base, out / "bf16", precision="bf16")}
    elif job == "qlora":  # the 4-bit base, on the other shape, at tp2 with sequence parallelism
        results = {job: _fit(world, rank, 2, base, out / job, LORA_SOME, qlora=True)}
    else:  # "dp2xtp2"
        results = {job: _fit(world, rank, 2, base, out / job, LORA_SOME)}
    torch.save(results, out / f"{job}-rank{rank}.pt")


def _spawn(world: int, out: Path, base: Path, job: str) -> list[dict]:
    mp.spawn(_worker, args=(world, free_port(), str(out), str(base), job), nprocs=world, join=True)
    return [torch.load(out / f"{job}-rank{r}.pt", weights_only=False) for r in range(world)]


def _save_base(path: Path, **shape) -> Path:
    """A 'pretrained' tiny base on disk: adapter checkpoints are rebuilt on it."""
    from lightning_llm.models import build_model

    torch.manual_seed(1)
    build_model("tiny", vocab_size=VOCAB, **shape).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return _save_base(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def runs(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel_lora")
    one, one_bf16 = _fit(1, 0, 1, base, out / "one"), _fit(1, 0, 1, base, out / "one-bf16", precision="bf16")
    torch.set_num_threads(1)
    return {"tp2": _spawn(2, out, base, "tp2"), "one": one, "one-bf16": one_bf16, "out": out}


def _assert_equals_one_process(records: list[dict], one: dict) -> None:
    """fp32, the same arithmetic reordered (test_parallel.LOSS_TOL's argument for the losses). Clipping acts at
    every step, and the gradient norms it divides by agree to the same bound: each gradient is a sum over the same
    reordered reductions (tokens, hidden units, vocabulary), and the norm, a sum of their squares, is set by the
    largest of them, which carry no cancellation. Adam's update barely depends on the gradient's scale, so the
    norms are checked here, not through the weights."""
    assert all(norm > CLIP for norm in one["norms"]), one["norms"]
    for record in records:
        assert record["init"].keys() == one["init"].keys()
        assert all(torch.equal(v, one["init"][k]) for k, v in record["init"].items())  # the placement kept them
        torch.testing.assert_close(torch.tensor(record["norms"]), torch.tensor(one["norms"]), **LOSS_TOL)
    losses = [sum(values) / len(values) for values in zip(*(r["losses"] for r in records))]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(one["losses"]), **LOSS_TOL)
    final = records[0]["final"]
    assert any(".lora_B." in k for k in final) and all(v.abs().sum() > 0 for k, v in final.items() if ".lora_B." in k)
    for record in records[1:]:
        assert all(torch.equal(record["final"][k], v) for k, v in final.items())
    assert_adam_steps_close(final, one["final"], lr_sum=LR_SUM)


@pytest.mark.slow  # the fixture: one fit on one process and two in two, about a minute on 2 cores
@pytest.mark.parametrize("layout", ["sp", "no-sp"])  # no-sp also runs ZeRO stage 2
def test_lora_under_tp2_trains_as_one_process(runs, layout):
    _assert_equals_one_process([rank[layout] for rank in runs["tp2"]], runs["one"])


@pytest.mark.slow  # the fixture's
def test_lora_under_tp2_with_bf16_mixed_trains_as_one_process_under_it(runs):
    """bf16 autocast at tp2 (sequence parallelism) against one process under the same plugin: both round every
    matmul to bf16 and differ in the order of the sums tensor parallelism splits, so (tests/test_parallel_precision.py's
    argument) the losses are within loss_atol(bf16) = 3.1e-2 of each other and the adapters' update within
    adam_update_rtol(bf16, tokens) = 0.5 of the one-process one; the adapters start equal and stay fp32 parameters."""
    records, one = [rank["bf16"] for rank in runs["tp2"]], runs["one-bf16"]
    for record in records:
        assert all(torch.equal(v, one["init"][k]) for k, v in record["init"].items())
        assert all(v.dtype == torch.float32 for v in record["final"].values())
    losses = [sum(values) / len(values) for values in zip(*(r["losses"] for r in records))]
    assert len(losses) == STEPS
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(one["losses"]), rtol=0, atol=loss_atol(torch.bfloat16))
    error = _update_error(one["init"], records[0]["final"], one["final"])
    assert error < adam_update_rtol(torch.bfloat16, ROWS * SEQ), f"adapter update off the one-process one by {error:.4f}"
    # the plugin ran: its rounding moves the losses beyond the fp32 run's tolerance
    assert not torch.allclose(torch.tensor(losses), torch.tensor(runs["one"]["losses"]), **LOSS_TOL)


@pytest.mark.slow
def test_lora_tp2_checkpoint_resumes_with_the_same_losses(runs):
    """The sharded checkpoint holds the adapters and their optimizer state (not the frozen base): steps 4-6
    resumed from step 3 are the uninterrupted run's."""
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(runs["out"] / "sp" / "ckpt" / f"step={SAVE_AT}.ckpt").read_metadata().state_dict_metadata
    weights = [k for k in saved if k.startswith("state_dict.")]
    assert weights and all(".lora_" in k for k in weights), weights[:5]
    for rank in runs["tp2"]:
        straight, resumed = rank["sp"], rank["resumed"]
        torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(straight["losses"][SAVE_AT:]), **LOSS_TOL)
        assert_adam_steps_close(resumed["final"], straight["final"], lr_sum=LR_SUM)


@pytest.mark.slow
def test_lora_tp2_checkpoint_exports_the_one_process_adapter(runs, base, tmp_path):
    """The sharded tp2 checkpoint (adapters only) consolidates: `export` writes the adapter the run ended with (the
    one the callback wrote at the end of fit, and within Adam's rounding the one-process run's), and its merge is
    the base plus the adapters' product."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lightning_llm.callbacks.lora import export_lora_checkpoint

    out, final = runs["out"], runs["tp2"][0]["sp"]["final"]
    exported, _ = export_lora_checkpoint(out / "sp" / "ckpt" / "last.ckpt", tmp_path / "adapter")
    for written in (load_file(exported / "adapter_model.safetensors"),
                    load_file(out / "sp" / "adapter" / "adapter_model.safetensors")):
        assert len(written) == len(final) > 0
        for name, weight in written.items():
            assert torch.equal(weight, final[name.replace(".weight", ".default.weight")]), name
    # Merged: each adapted weight is W0 + (alpha / r) B A, against that sum computed here from the tp2 adapter. fp32:
    # the r-term product and the two additions reordered, each within (r + 2) u of the terms' magnitudes.
    path, error = export_lora_checkpoint(out / "sp" / "ckpt" / "last.ckpt", tmp_path / "merged", merge=True)
    assert error < 1e-4
    merged = AutoModelForCausalLM.from_pretrained(path).state_dict()
    base_weights = AutoModelForCausalLM.from_pretrained(base).state_dict()
    scale = LORA["alpha"] / LORA["r"]
    adapted = [k.removeprefix("base_model.model.").replace(".lora_A.default", "") for k in final if ".lora_A." in k]
    assert len(adapted) == 7 * 2  # every linear layer of the two decoder layers
    for name in adapted:
        a, b = (final[f"base_model.model.{name}".replace(".weight", f".lora_{x}.default.weight")] for x in "AB")
        expected = base_weights[name] + scale * b @ a
        bound = (LORA["r"] + 2) * UNIT_ROUNDOFF[torch.float32] * (base_weights[name].abs() + scale * b.abs() @ a.abs())
        assert ((merged[name] - expected).abs() <= bound).all(), name
    assert all(torch.equal(merged[k], v) for k, v in base_weights.items() if k not in adapted)  # the rest is the base
    # and the exported adapter is the one-process run's (assert_adam_steps_close, as the adapters after training)
    one, _ = export_lora_checkpoint(out / "one" / "ckpt" / "last.ckpt", tmp_path / "adapter-one")
    assert_adam_steps_close(load_file(exported / "adapter_model.safetensors"),
                            load_file(one / "adapter_model.safetensors"), lr_sum=LR_SUM)


@pytest.mark.slow  # four processes and one, about two minutes on 2 cores
def test_lora_under_dp2_x_tp2_on_another_shape_trains_as_one_process(tmp_path):
    """ZeRO-3 shards the adapters (and the frozen base) over the data dimension of the tensor-parallel split."""
    from safetensors.torch import load_file

    from lightning_llm.callbacks.lora import export_lora_checkpoint

    base = _save_base(tmp_path / "base", **SHAPE)
    records = [rank["dp2xtp2"] for rank in _spawn(4, tmp_path, base, "dp2xtp2")]
    one = _fit(1, 0, 1, base, tmp_path / "one", LORA_SOME)
    assert len([k for k in one["final"] if ".lora_A." in k]) == 4 * 2  # 4 projections in each of 2 layers
    _assert_equals_one_process(records, one)
    exported, _ = export_lora_checkpoint(tmp_path / "dp2xtp2" / "ckpt" / "last.ckpt", tmp_path / "adapter")
    written = load_file(exported / "adapter_model.safetensors")
    assert {k.replace(".weight", ".default.weight") for k in written} == records[0]["final"].keys()
    assert all(torch.equal(v, records[0]["final"][k.replace(".weight", ".default.weight")]) for k, v in written.items())


@pytest.mark.slow  # two processes and one, about a minute on 2 cores
def test_qlora_under_tp2_trains_as_one_process(tmp_path):
    """QLoRA's 4-bit base (`QuantizedParallel`: the NF4 weight whole on each rank, each multiplying by its slice)
    on the other shape: 6 heads over 2 kv-heads, intermediate 160 (each rank's 80 columns of down_proj are not
    whole 64-weight quantization blocks), adapters on q, v, o, down and the 4-bit k, gate, up without any."""
    from lightning_llm.strategies.tensor import QuantizedParallel

    base = _save_base(tmp_path / "base", **SHAPE)
    records = [rank["qlora"] for rank in _spawn(2, tmp_path, base, "qlora")]
    one = _fit(1, 0, 1, base, tmp_path / "one", LORA_SOME, qlora=True)
    assert len([k for k in one["final"] if ".lora_A." in k]) == 4 * 2
    _assert_equals_one_process(records, one)
    assert QuantizedParallel.__doc__  # the placement is documented where it is built


def _collectives_worker(rank: int, port: int, out: str) -> None:
    """One forward and backward of the tiny model with adapters on every linear at tp2 (no ZeRO), with and
    without sequence parallelism: the collectives each adapter factor issues, by module."""
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.debug import CommDebugMode

    from lightning_llm.models import build_model
    from lightning_llm.strategies.tensor import apply_styles, plan_styles

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    mesh, found = init_device_mesh("cpu", (2,)), {}
    for sequence_parallel in (True, False):
        torch.manual_seed(0)
        model = build_model("tiny", vocab_size=VOCAB)
        model = get_peft_model(model, LoraConfig(r=4, lora_dropout=0.0, target_modules="all-linear")).base_model.model
        apply_styles(list(model.modules()), plan_styles(model, sequence_parallel, degree=2), mesh)
        with CommDebugMode() as comm:
            model(input_ids=torch.randint(0, VOCAB, (2, 8))).logits.full_tensor().logsumexp(-1).mean().backward()
        issued = {fqn.split("layers.")[1]: {way: {str(op).split(".")[-1]: n for op, n in counts[way].items() if n}
                                            for way in ("forward", "backward")}
                  for fqn, counts in comm.comm_module_counts.items() if ".lora_" in fqn}
        found[sequence_parallel] = {fqn: {way: c for way, c in ways.items() if c} for fqn, ways in issued.items()}
    if rank == 0:
        torch.save(found, Path(out) / "collectives.pt")
    dist.destroy_process_group()


def test_what_each_adapter_communicates_under_tp2(tmp_path):
    """Column-split projections' adapters (A replicated, B split) communicate nothing of their own; a row-split
    projection's A completes its [.., r] output as the base does (a reduce-scatter over the sequence, all-gathered
    back in backward, under SP; an all-reduce without it) and its B communicates nothing."""
    mp.spawn(_collectives_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    found = torch.load(tmp_path / "collectives.pt")
    for sequence_parallel, modules in found.items():
        row_a = ({"forward": {"reduce_scatter_tensor": 1}, "backward": {"all_gather_into_tensor": 1}} if sequence_parallel
                 else {"forward": {"all_reduce": 1}})
        expected = {f"{layer}.{proj}.lora_A.default": row_a for layer in range(2)
                    for proj in ("self_attn.o_proj", "mlp.down_proj")}
        assert {k: v for k, v in modules.items() if v} == expected, sequence_parallel

"""ParallelStrategy with a pipeline dimension against single-process training, on gloo.

4-rank jobs train pipeline_parallel=2 x data_parallel=2 under ZeRO-2 (each stage's modules sharded over the
two pipelines) and ZeRO-1 (each stage replicated, its optimizer state sharded; one job per schedule: 1F1B,
interleaved 1F1B and zero bubble, the last two with 2 chunks per rank of a 4-layer model), one 2-rank job a
pipeline of 2 alone; the tests compare the losses and final
weights with a plain PyTorch loop on one process over the same global batches (tests/test_parallel.py's
oracle and tolerances), started from the weights the distributed run recorded, and check that the
module's own metrics are logged through the pipeline.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from _precision_helpers import free_port
from lightning_llm.strategies.parallel import ParallelStrategy
from lightning_llm.strategies.pipeline import MULTI_STAGE_SCHEDULES
from test_parallel import CLIP, VOCAB, LOSS_TOL, LR_SUM, ROWS, SAVE_AT, SEQ, STEPS, _loader, _module, global_batches, single_process_run
from tolerances import assert_adam_steps_close

METRICS = ("train/loss", "train/ppl", "train/lr", "train/tokens")


def _stage_weights(model) -> dict[str, torch.Tensor]:
    """This rank's stages' weights, whole (gathered over the data-parallel shards), as CPU copies."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def _recorder(record: dict) -> L.Callback:
    from lightning_llm.strategies.zero import state_bytes

    class Recorder(L.Callback):
        def on_train_start(self, trainer, pl_module):
            record["init"] = _stage_weights(pl_module.model)
            record["sampler"] = trainer.strategy.distributed_sampler_kwargs
            record["param_bytes"] = state_bytes(pl_module)["params"]
            head = getattr(pl_module.model, "lm_head", None)  # (on the last stage)
            if head is not None:
                head.register_forward_hook(self.see_logits)

        def see_logits(self, head, args, logits):
            """What the LM head hands on in a training forward (after the strategy's own hook): its type and the
            vocabulary size this rank holds."""
            if torch.is_grad_enabled():
                local = logits.to_local() if isinstance(logits, DTensor) else logits
                record.setdefault("train_logits", set()).add((type(logits).__name__, local.shape[-1]))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            record.setdefault("losses", []).append(outputs["loss"].item())
            record.setdefault("metrics", []).append({k: float(trainer.callback_metrics[k]) for k in METRICS
                                                     if k in trainer.callback_metrics})
            record.setdefault("lrs", []).append(trainer.optimizers[0].param_groups[0]["lr"])
            record["tokens_seen"] = pl_module.tokens_seen

        def on_train_end(self, trainer, pl_module):
            record["final"] = _stage_weights(pl_module.model)
            record["optimizer_bytes"] = state_bytes(pl_module, trainer.optimizers)["optimizer"]
            record["stepped_params"] = sum(len(g["params"]) for o in trainer.optimizers for g in o.param_groups)

    return Recorder()


def _four_layers():
    """The tiny preset with 4 decoder layers: the interleaved schedules run 2 chunks per rank, 4 stages at pp2."""
    from lightning_llm.models import build_config

    return build_config("tiny", num_hidden_layers=4)


def _worker(rank: int, world: int, port: int, out: str, pp: int, zero_stage: int, save: bool = False,
            resume: str | None = None, tp: int = 1, schedule: str = "1f1b") -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)  # 2 cores: more threads than cores stall gloo's send/recv
    torch.manual_seed(10 * rank)  # ranks draw different numbers: the model must not depend on it
    record: dict = {}
    dp = world // (pp * tp)
    pipeline = dict(microbatches=2, schedule=schedule) if pp > 1 else {}
    strategy = ParallelStrategy(pipeline_parallel=pp, tensor_parallel=tp, zero_stage=zero_stage, **pipeline)
    callbacks = [_recorder(record)]
    if save:
        callbacks.append(ModelCheckpoint(dirpath=out, filename="{step}", every_n_train_steps=SAVE_AT, save_top_k=-1,
                                         save_last=True))
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_steps=STEPS, logger=False,
                        enable_checkpointing=save, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, gradient_clip_val=CLIP, callbacks=callbacks)
    # Mesh (pipeline, data, tensor): global rank = (stage x dp + data coordinate) x tp + tensor coordinate; the
    # stages of a pipeline and the ranks of a tensor-parallel group get the rows of their data coordinate.
    # With checkpoints, validation on the training batches at each epoch's end (through the pipeline).
    loader = _loader(rank // tp % dp, dp)
    module = _module(_four_layers() if schedule in MULTI_STAGE_SCHEDULES else "tiny")
    trainer.fit(module, loader, loader if save else None, ckpt_path=resume)
    record["val_history"] = module.val_history
    if save:  # the live model, gathered from the stages and their shards, as the end-of-run export writes it
        from lightning_llm.export import export_module

        export_module(module, Path(out) / "live-hf")
    torch.save(record, Path(out) / f"{'resumed' if resume else 'run'}-rank{rank}.pt")


def _spawn(world: int, out: Path, pp: int, zero_stage: int, save: bool = False, resume: str | None = None,
           tp: int = 1, schedule: str = "1f1b") -> list[dict]:
    mp.spawn(_worker, args=(world, free_port(), str(out), pp, zero_stage, save, resume, tp, schedule), nprocs=world,
             join=True)
    return [torch.load(out / f"{'resumed' if resume else 'run'}-rank{r}.pt", weights_only=False) for r in range(world)]


def _joined(records: list[dict], key: str) -> dict[str, torch.Tensor]:
    """The whole model from the stages' weights (every rank of a stage holds them whole after the gather)."""
    joined: dict[str, torch.Tensor] = {}
    for record in records:
        for name, value in record[key].items():
            if name in joined:  # a tied embedding on the first and last stage, or another replica: equal
                assert torch.equal(joined[name], value), name
            joined[name] = value
    return joined


def _assert_equals_one_process(records: list[dict], model_spec: object = "tiny") -> None:
    init = _joined(records, "init")
    expected_losses, expected_weights = single_process_run(init, STEPS, model_spec)
    for record in records:  # every rank logs the global batch's loss
        torch.testing.assert_close(torch.tensor(record["losses"]), torch.tensor(expected_losses), **LOSS_TOL)
    final = _joined(records, "final")
    assert final.keys() == expected_weights.keys()
    for name, weight in expected_weights.items():
        assert not torch.equal(weight, init[name]), f"{name} did not train"
    assert_adam_steps_close(final, expected_weights, lr_sum=LR_SUM)


def _assert_module_metrics(records: list[dict], dp: int) -> None:
    """The module's own metrics, logged on every rank through the pipeline: the step's loss, its
    perplexity, the learning rate the step used and the tokens seen by all replicas so far."""
    for record in records:
        assert record["sampler"]["num_replicas"] == dp
        assert len(record["metrics"]) == STEPS
        for step, (metrics, loss) in enumerate(zip(record["metrics"], record["losses"])):
            assert metrics.keys() == set(METRICS)
            assert metrics["train/loss"] == pytest.approx(loss, rel=1e-6)
            assert metrics["train/ppl"] == pytest.approx(math.exp(loss), rel=1e-6)
            assert metrics["train/tokens"] == (step + 1) * ROWS * SEQ
        assert [m["train/lr"] for m in record["metrics"][1:]] == pytest.approx(record["lrs"][:-1])
        assert record["tokens_seen"] == STEPS * ROWS * SEQ


def _stage_numel(record: dict) -> int:
    """The number of parameters of this rank's stage (the tied embedding once)."""
    distinct = {name: w for name, w in record["final"].items()
                if not (name == "lm_head.weight" and "model.embed_tokens.weight" in record["final"])}
    return sum(w.numel() for w in distinct.values())


def _assert_stages_sharded(records: list[dict], dp: int) -> None:
    """Each rank holds 1/dp of its own stage's parameters (fp32; the tied embedding once), nothing of the others'."""
    for record in records:
        assert record["param_bytes"] * dp == 4 * _stage_numel(record)


def _assert_optimizer_state_sharded(records: list[dict], dp: int) -> None:
    """Each rank holds AdamW's two fp32 moments for 1/dp of its own stage's parameters (every tensor's rows split
    evenly here), and a 4-byte step count per tensor."""
    for record in records:
        moments = 2 * 4 * _stage_numel(record) // dp
        assert record["optimizer_bytes"] == moments + 4 * record["stepped_params"]


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["1f1b", "interleaved-zero-bubble"])  # (ZeRO-3 refuses zero bubble)
def test_pp2_x_dp2_zero2_equals_one_process(tmp_path, schedule):
    records = _spawn(4, tmp_path, pp=2, zero_stage=2, schedule=schedule)
    _assert_equals_one_process(records, _four_layers() if schedule in MULTI_STAGE_SCHEDULES else "tiny")
    _assert_module_metrics(records, dp=2)
    _assert_stages_sharded(records, dp=2)
    _assert_optimizer_state_sharded(records, dp=2)
    assert "lm_head.weight" not in records[0]["final"] and "lm_head.weight" in records[2]["final"]


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["1f1b", "interleaved-1f1b", "interleaved-zero-bubble"])
def test_pp2_x_dp2_zero1_equals_one_process(tmp_path, schedule):
    """ZeRO-1 on each stage: the stage replicated over its two pipelines (DistributedDataParallel, all-reducing
    once per step), the optimizer state sharded over them; the same losses and weights as one process. The
    interleaved schedules run 2 chunks per rank (4 stages of a 4-layer model), each its own replica; zero bubble
    also splits each backward into its input and weight halves."""
    records = _spawn(4, tmp_path, pp=2, zero_stage=1, schedule=schedule)
    _assert_equals_one_process(records, _four_layers() if schedule in MULTI_STAGE_SCHEDULES else "tiny")
    _assert_module_metrics(records, dp=2)
    _assert_stages_sharded(records, dp=1)  # whole parameters
    _assert_optimizer_state_sharded(records, dp=2)


@pytest.mark.slow
def test_pp2_x_tp2_equals_one_process(tmp_path):
    """Tensor and sequence parallelism inside each stage (ZeRO-2 over a data dimension of 1): the residual
    stream crosses the stage boundary as its sequence shards; the tied embedding's two copies (the
    first stage's embedding, the last stage's LM head) are split alike over the vocabulary, and the last
    stage's loss takes the logits as the two ranks' vocabulary slices (loss parallel): whole logits never exist."""
    records = _spawn(4, tmp_path, pp=2, zero_stage=2, tp=2)
    _assert_equals_one_process(records)
    _assert_module_metrics(records, dp=1)
    # mesh (pipeline, data, tensor): ranks 2 and 3 hold the last stage
    assert [record.get("train_logits") for record in records] == [None, None, *[{("DTensor", VOCAB // 2)}] * 2]


@pytest.fixture(scope="module")
def pp2(tmp_path_factory):
    """pipeline_parallel=2 (ZeRO-3 over a data dimension of 1), checkpointing every SAVE_AT steps and validating
    at each epoch's end; then one process resumes its step-SAVE_AT checkpoint with ParallelStrategy()."""
    out = tmp_path_factory.mktemp("pp2")
    records = _spawn(2, out, pp=2, zero_stage=3, save=True)
    resumed = _spawn(1, out, pp=1, zero_stage=3, resume=str(out / f"step={SAVE_AT}.ckpt"))[0]
    return records, resumed, out


@pytest.mark.slow  # the pp2 fixture's two jobs take ~2 minutes on 2 busy cores
def test_pp2_equals_one_process_and_logs_the_module_metrics(pp2):
    records, _, _ = pp2
    _assert_equals_one_process(records)
    _assert_module_metrics(records, dp=1)
    _assert_stages_sharded(records, dp=1)


@pytest.mark.slow  # the pp2 fixture's two jobs take ~2 minutes on 2 busy cores
def test_pp2_validation_runs_the_module_step_through_the_pipeline(pp2):
    from lightning_llm.models import build_model
    from lightning_llm.modules.pretrain import next_token_loss

    records, _, _ = pp2
    model = build_model("tiny", vocab_size=VOCAB)
    model.load_state_dict(_joined(records, "final"))
    with torch.no_grad():
        losses = [next_token_loss(model(input_ids=b["input_ids"]).logits, b["targets"]) for b in global_batches()]
    for record in records:
        step, value = record["val_history"][-1]
        assert step == STEPS
        torch.testing.assert_close(torch.tensor(value), torch.stack(losses).mean(), **LOSS_TOL)


@pytest.mark.slow  # the pp2 fixture's two jobs take ~2 minutes on 2 busy cores
def test_pp2_checkpoint_resumes_on_one_process(pp2):
    """The stages' checkpoint holds the whole model under the single-process names, with the optimizer
    state: one process resumes it and continues as the pipeline did."""
    records, resumed, _ = pp2
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(records[0]["losses"][SAVE_AT:]), **LOSS_TOL)
    assert_adam_steps_close(resumed["final"], _joined(records, "final"), lr_sum=LR_SUM)


@pytest.mark.slow  # the pp2 fixture's two jobs take ~2 minutes on 2 busy cores
def test_pp2_checkpoint_and_live_model_export_equal_the_trained_weights(pp2, tmp_path):
    from transformers import AutoModelForCausalLM

    from lightning_llm.export import export_checkpoint

    records, _, out = pp2
    final = _joined(records, "final")
    for exported_dir in (export_checkpoint(out / "last.ckpt", tmp_path / "hf"), out / "live-hf"):
        exported = AutoModelForCausalLM.from_pretrained(exported_dir).state_dict()
        assert exported.keys() == final.keys()
        assert all(torch.equal(exported[name], weight) for name, weight in final.items())


# -- setup errors --------------------------------------------------------------------------------


def test_more_stages_than_layers_is_refused_naming_both():
    from lightning_llm.strategies.pipeline import Pipeline

    module = _module()
    with torch.device("meta"):
        module.configure_model()
    with pytest.raises(ValueError, match=r"4 pipeline stages \(pipeline_parallel=4 x stages_per_rank=1\) but the model "
                                         r"has only 2 decoder layers: use at most 2 stages"):
        Pipeline(4, 4, "gpipe", degree="pipeline_parallel").split(module)


def test_a_module_without_its_pipeline_loss_is_refused():
    from lightning_llm.models import build_model
    from lightning_llm.strategies.pipeline import Pipeline

    class OwnLoss(L.LightningModule):  # a training_step of its own, no loss_sum / log_training_step
        def __init__(self):
            super().__init__()
            with torch.device("meta"):
                self.model = build_model("tiny", vocab_size=64)

    with pytest.raises(TypeError, match=r"OwnLoss cannot be trained through a pipeline: it must define `loss_sum"):
        Pipeline(2, 2, "1f1b").split(OwnLoss())

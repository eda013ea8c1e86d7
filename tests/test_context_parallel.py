"""ParallelStrategy(context_parallel=2) against single-process training, on gloo.

Two ranks split every sequence of the same global batches (load-balanced chunks, ring or all-to-all
attention, per-chunk position ids, the token mean over both) and train the tiny model for a few steps; the
global losses and the final weights must equal a plain PyTorch loop on one process over the whole sequences
(test_parallel's oracle, started from the weights the distributed run recorded). In the slow tier: dp2 x cp2,
and cp2 x tp2 in both modes. Packed instruction batches (several examples per row, position ids restarting
at each, examples crossing the chunks' boundaries) must take the steps one process takes with transformers'
own block-diagonal mask, in both modes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
import torch
import torch.multiprocessing as mp

from _precision_helpers import free_port
from lightning_llm.strategies.context import check_block_size, shard_batch
from lightning_llm.strategies.parallel import ParallelStrategy
from test_instruct_distributed import STEPS as PACKED_STEPS
from test_instruct_distributed import fit
from test_instruct_module import write_records
from test_parallel import (
    LOSS_TOL,
    LR_SUM,
    ROWS,
    SEQ,
    STEPS,
    _loader,
    _module,
    _recorder,
    _trainer,
    single_process_run,
)
from tolerances import adam_update_rtol, assert_adam_steps_close, reordered_sum_rtol


def _worker(rank: int, world: int, port: int, out: str, cp: int, tp: int, mode: str | None,
            checkpointing: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    record: dict = {}
    torch.manual_seed(10 * rank)  # ranks draw different numbers: the model must not depend on it
    strategy = ParallelStrategy(context_parallel=cp, tensor_parallel=tp, context_parallel_mode=mode,
                                activation_checkpointing=checkpointing)
    trainer = _trainer(world, strategy, [_recorder(record)])
    # The mesh is data x context x tensor: every rank of a context x tensor-parallel group reads its data
    # coordinate's rows whole, and the strategy cuts its share of the sequences.
    trainer.fit(module := _module(), _loader(rank // (cp * tp), world // (cp * tp)))
    record["attention"] = module.model.config._attn_implementation
    record["train_loss"] = float(trainer.callback_metrics["train/loss"])
    torch.save(record, Path(out) / f"cp-rank{rank}.pt")


# cp2 with activation checkpointing: the decoder layers' forward runs again in backward, with ring attention
# too. cp2 x tp2: each tensor-parallel rank holds 2 query heads and 1 K/V head, which all-to-all attention
# repeats for its two context-parallel ranks.
@pytest.mark.parametrize("world,cp,tp,mode,checkpointing", [
    pytest.param(2, 2, 1, None, True, id="cp2-checkpointed"),
    pytest.param(2, 2, 1, "all_to_all", False, id="cp2-all-to-all"),
    pytest.param(4, 2, 1, None, False, marks=pytest.mark.slow, id="dp2xcp2"),
    pytest.param(4, 2, 2, "ring", False, marks=pytest.mark.slow, id="cp2xtp2-ring"),
    pytest.param(4, 2, 2, "all_to_all", False, marks=pytest.mark.slow, id="cp2xtp2-all-to-all")])
def test_cp2_training_equals_one_process(tmp_path, world, cp, tp, mode, checkpointing):
    mp.spawn(_worker, args=(world, free_port(), str(tmp_path), cp, tp, mode, checkpointing), nprocs=world, join=True)
    records = [torch.load(tmp_path / f"cp-rank{r}.pt", weights_only=False) for r in range(world)]
    assert {r["attention"] for r in records} == {"lightning_ulysses" if mode == "all_to_all" else "lightning_ring"}
    init = records[0]["init"]
    expected_losses, expected_weights = single_process_run(init, STEPS)
    # Each rank returns its tokens' loss sum times the ranks that average gradients (all of them), over all
    # tokens: the ranks' mean is the global token mean.
    losses = [sum(values) / world for values in zip(*(r["losses"] for r in records))]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected_losses), **LOSS_TOL)
    # The logged loss is the global one on every rank.
    for record in records:
        torch.testing.assert_close(record["train_loss"], expected_losses[-1], **LOSS_TOL)
    # The ranks of a context x tensor-parallel group share a sampler coordinate; they count every token once.
    for rank, record in enumerate(records):
        assert record["sampler"] == {"num_replicas": world // (cp * tp), "rank": rank // (cp * tp)}
        assert record["tokens"] == STEPS * ROWS * SEQ
    final = records[0]["final"]
    for name, weight in expected_weights.items():
        assert not torch.equal(weight, init[name]), f"{name} did not train"
    assert_adam_steps_close(final, expected_weights, lr_sum=LR_SUM)


@pytest.mark.parametrize("batch,error,match", [
    ({"input_ids": torch.zeros(2, 30, dtype=torch.long)}, ValueError, "sequence length 30 is not a multiple of 4"),
    ({"input_ids": torch.zeros(2, 16, dtype=torch.long), "attention_mask": torch.tensor([[1] * 15 + [0]] * 2)},
     ValueError, "padded"),
    ([torch.zeros(2, 16)], ValueError, "dict batches"),
])
def test_batches_context_parallelism_cannot_split_are_refused(batch, error, match, monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    with pytest.raises(error, match=match):
        shard_batch(batch, None)


def test_a_block_size_that_does_not_cut_into_chunks_is_refused_at_setup():
    class Data:
        block_size = 100

    with pytest.raises(ValueError, match="sequence length 100 is not a multiple of 8"):
        check_block_size(Data(), 4)
    check_block_size(Data(), 2)
    check_block_size(object(), 4)  # a data module without a block size: the steps check each batch


def test_shard_batch_gives_each_token_its_position_and_target(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    ids = torch.arange(16).reshape(1, 16) + 100
    share = shard_batch({"input_ids": ids, "targets": ids + 1, "num_tokens": torch.tensor([16])}, None)
    # 4 chunks of 4: rank 0 holds chunks 0 and 3
    assert share["position_ids"].tolist() == [[0, 1, 2, 3, 12, 13, 14, 15]]
    assert torch.equal(share["input_ids"], share["position_ids"] + 100)
    assert torch.equal(share["targets"], share["input_ids"] + 1)
    assert torch.equal(share["num_tokens"], torch.tensor([16]))


@pytest.mark.parametrize("heads,kv_heads,cp,tp,refused", [
    (4, 2, 2, 1, None), (4, 2, 4, 1, None), (4, 1, 2, 2, None),  # K/V heads split; repeated; one per TP rank
    (4, 2, 3, 1, "4 query heads and 2 K/V heads"), (4, 2, 4, 2, "2 query heads and 1 K/V heads"),
    (6, 6, 4, 1, "6 query heads and 6 K/V heads")])
def test_all_to_all_mode_refuses_at_setup_heads_the_ranks_cannot_share(heads, kv_heads, cp, tp, refused):
    from lightning_llm.models import build_config, build_model
    from lightning_llm.strategies.context import ALL_TO_ALL_IMPLEMENTATION, use_all_to_all_attention

    with torch.device("meta"):
        model = build_model(build_config("tiny", num_attention_heads=heads, num_key_value_heads=kv_heads,
                                         hidden_size=16 * heads, head_dim=16))
    if refused is None:
        use_all_to_all_attention([model], cp, tp)
        assert model.config._attn_implementation == ALL_TO_ALL_IMPLEMENTATION
    else:
        with pytest.raises(ValueError, match=rf"over {cp} ranks .*{refused}.*degrees that fit"):
            use_all_to_all_attention([model], cp, tp)


def test_the_mode_is_read_from_yaml_and_a_bad_one_names_the_accepted(tmp_path, capsys):
    from lightning_llm.data.pretrain import PretrainDataModule
    from lightning_llm.lightning_cli import LLMCLI
    from lightning_llm.modules.pretrain import PretrainModule

    config = {"model": {"class_path": "lightning_llm.PretrainModule", "init_args": {"model": "tiny"}},
              "data": {"class_path": "lightning_llm.PretrainDataModule", "init_args": {"sources": str(tmp_path)}},
              "trainer": {"accelerator": "cpu", "devices": 2, "logger": False, "strategy": {
                  "class_path": "lightning_llm.strategies.parallel.ParallelStrategy",
                  "init_args": {"context_parallel": 2, "context_parallel_mode": "all_to_all"}}}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))

    def cli(*args: str) -> LLMCLI:
        return LLMCLI(PretrainModule, PretrainDataModule, subclass_mode_model=True, subclass_mode_data=True,
                      run=False, args=["--config", str(tmp_path / "run.yaml"), *args])

    assert cli().trainer.strategy.context_parallel_mode == "all_to_all"
    with pytest.raises(SystemExit):
        cli("--trainer.strategy.init_args.context_parallel_mode=ulysses")
    assert "Expected a typing.Literal['ring', 'all_to_all']" in capsys.readouterr().err


def test_shard_batch_keeps_each_packed_token_its_position_in_its_document(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])  # two documents, the second across chunks 1 to 3
    share = shard_batch({"input_ids": torch.arange(8).reshape(1, 8), "position_ids": positions}, None)
    # 4 chunks of 2: rank 1 holds chunks 1 and 2
    assert share["input_ids"].tolist() == [[2, 3, 4, 5]]
    assert share["position_ids"].tolist() == [[2, 0, 1, 2]]


def test_a_batch_with_targets_is_padded_to_whole_chunks_and_its_tokens_keep_their_places(monkeypatch):
    # Unpacked instruction rows are as long as a batch's longest example: any length. The strategy pads them on
    # the right to a multiple of the 2N chunks, with targets -100 and positions continuing each row.
    import torch.distributed as dist

    from lightning_llm.strategies.context import pad_to_chunks

    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    ids = torch.arange(10, 20).reshape(2, 5)
    targets = torch.tensor([[11, 12, 13, -100, -100], [16, 17, 18, 19, 7]])
    whole = pad_to_chunks({"input_ids": ids, "targets": targets}, 4)
    assert whole["input_ids"].shape == (2, 8) and torch.equal(whole["input_ids"][:, :5], ids)
    assert torch.equal(whole["targets"][:, :5], targets) and (whole["targets"][:, 5:] == -100).all()
    shares = []
    for rank in range(2):
        monkeypatch.setattr(dist, "get_rank", lambda group=None, rank=rank: rank)
        shares.append(shard_batch({"input_ids": ids, "targets": targets, "num_tokens": torch.tensor([3, 5])}, None))
    # rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2 (of 2 tokens each)
    order = torch.cat([shares[0]["input_ids"][:, :2], shares[1]["input_ids"], shares[0]["input_ids"][:, 2:]], 1)
    assert torch.equal(order, whole["input_ids"])
    positions = torch.cat([shares[0]["position_ids"][:, :2], shares[1]["position_ids"], shares[0]["position_ids"][:, 2:]], 1)
    assert torch.equal(positions, torch.arange(8).expand(2, 8))
    assert sum(int((s["targets"] != -100).sum()) for s in shares) == int((targets != -100).sum())
    packed = pad_to_chunks({"input_ids": ids, "targets": targets, "position_ids": torch.tensor([[0, 1, 0, 1, 2]] * 2)}, 4)
    assert packed["position_ids"].tolist() == [[0, 1, 0, 1, 2, 3, 4, 5]] * 2  # the padding joins the last document
    with pytest.raises(ValueError, match=r"length 5 is not a multiple of 4.*\['loss_weights'\]"):
        pad_to_chunks({"input_ids": ids, "targets": targets, "loss_weights": torch.ones(2, 5)}, 4)
    with pytest.raises(ValueError, match="not a multiple of 4"):  # without targets nothing says what padding means
        shard_batch({"input_ids": ids}, None)


PACKED_BLOCK, PACKED_ROWS = 128, 2


def _packed_worker(rank: int, port: int, root: str, vocab_size: int, mode: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    batches = torch.load(Path(root) / "batches.pt")  # both ranks read the whole rows: the strategy splits them
    # built whole from the seed, as the one process builds it (empty_init draws other initial weights)
    strategy = ParallelStrategy(context_parallel=2, context_parallel_mode=mode, empty_init=False)
    torch.save(fit(batches, vocab_size, Path(root) / "cp2", 2, strategy), Path(root) / f"packed-rank{rank}.pt")


@pytest.mark.slow
@pytest.mark.parametrize("mode,packing", [("ring", True), ("ring", False), ("all_to_all", True)])
def test_cp2_on_packed_instruction_batches_equals_one_process(tmp_path, tokenizer, mode, packing):
    from lightning_llm.data.instruct import InstructionDataModule

    data = tmp_path / "train.jsonl"
    write_records(data, 48, tasks=("add", "reverse"))
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    dm = InstructionDataModule(str(data), tokenizer=str(tmp_path / "tokenizer"), block_size=PACKED_BLOCK,
                               batch_size=PACKED_ROWS, packing=packing, val_fraction=0, seed=0)
    dm.setup("fit")
    batches = [batch for _, batch in zip(range(PACKED_STEPS), dm.train_dataloader())]
    if packing:
        # Rows hold several documents (examples, and the padding as one more), which cross the boundaries of
        # the 2 x 2 chunks of 32 tokens.
        chunk = PACKED_BLOCK // 4
        rows = [(positions == 0).nonzero().flatten().tolist() for batch in batches for positions in batch["position_ids"]]
        assert max(len(starts) for starts in rows) > 2, rows
        for starts in rows:
            ends = [*starts[1:], PACKED_BLOCK]
            assert len(starts) > 1 and any(a // chunk != (b - 1) // chunk for a, b in zip(starts, ends)), starts
    else:
        # One example per row, right-padded to the batch's longest: lengths the 4 chunks do not divide, which
        # the strategy pads further (its padding, like the rows', has no targets).
        assert any(batch["input_ids"].shape[1] % 4 for batch in batches), [b["input_ids"].shape for b in batches]
    torch.save(batches, tmp_path / "batches.pt")
    vocab_size = len(dm.tokenizer)
    mp.start_processes(_packed_worker, args=(free_port(), str(tmp_path), vocab_size, mode), nprocs=2,
                       start_method="spawn")
    # The oracle: one process, transformers' default attention with its block-diagonal mask for packed rows.
    single_losses, single_grads, single_counted = fit(batches, vocab_size, tmp_path / "single")
    tokens = PACKED_ROWS * max(batch["input_ids"].shape[1] for batch in batches)
    for rank in range(2):
        losses, grads, counted = torch.load(tmp_path / f"packed-rank{rank}.pt")
        # the tokens counted (train/tokens, throughput): each replica's sum over its context-parallel ranks,
        # which hold shares of the same rows, is the rows' tokens, as one process counts them
        assert counted == single_counted, rank
        # As tests/test_instruct_distributed.py: the loss a token mean of at most `tokens` terms summed in
        # another order; the first step's gradient a reordered sum over those tokens, later ones after Adam's
        # rounding noise. (Ring attention's merge reorders each query's sum over at most PACKED_BLOCK keys, and
        # all-to-all attention sums each document's keys in one call as one process's kernel does but in its own
        # order: fewer terms than the token sums either way.) Documents that saw each other would move the loss
        # by percents.
        assert losses == pytest.approx(single_losses, rel=2 * reordered_sum_rtol(torch.float32, tokens)), rank
        for step, (mine, oracle) in enumerate(zip(grads, single_grads, strict=True)):
            error = torch.cat([(mine[k] - g).flatten() for k, g in oracle.items()]).norm()
            scale = torch.cat([g.flatten() for g in oracle.values()]).norm()
            bound = reordered_sum_rtol(torch.float32, tokens) if step == 0 else adam_update_rtol(torch.float32, tokens)
            assert error / scale < bound, (rank, step, (error / scale).item())


@pytest.mark.parametrize("mode", ["ring", "all_to_all"])
def test_context_parallel_attention_without_position_ids_is_refused(mode):
    # The position ids are how both modes keep packed documents apart: a model that drops them is refused.
    from types import SimpleNamespace

    from lightning_llm.strategies.context import all_to_all_attention_forward, ring_attention_forward, sequence_split

    forward = {"ring": ring_attention_forward, "all_to_all": all_to_all_attention_forward}[mode]
    q = torch.zeros(1, 2, 4, 8)
    with sequence_split(object()), pytest.raises(ValueError, match="needs the position ids in attention"):
        forward(SimpleNamespace(is_causal=True), q, q, q, None)


@pytest.mark.parametrize("mode", ["ring", "all_to_all"])
@pytest.mark.parametrize("given, match", [
    ({"softcap": 50.0}, r"soft-capping \(got softcap=50.0\)"),
    ({"s_aux": torch.zeros(2)}, r"also passes s_aux"),
    ({"sliding_window": 16}, r"sliding_window=16 only on causal sequences of at most 16 tokens.*sequence of 32 keys"),
], ids=["softcap", "sinks", "sliding-window"])
def test_context_parallel_attention_refuses_what_it_does_not_compute(mode, given, match, monkeypatch):
    # Ring and all-to-all attention compute plain causal attention over the whole sequence: soft-capping, sinks and
    # a window the sequence reaches (4 tokens here x 8 ranks = 32 > 16) were ignored without a word.
    from types import SimpleNamespace

    import lightning_llm.strategies.context as context

    monkeypatch.setattr(context.dist, "get_world_size", lambda group=None: 8)
    forward = {"ring": context.ring_attention_forward, "all_to_all": context.all_to_all_attention_forward}[mode]
    q = torch.zeros(1, 2, 4, 8)
    with context.sequence_split(object()), pytest.raises(ValueError, match=match):
        forward(SimpleNamespace(is_causal=True), q, q, q, None, position_ids=torch.arange(4)[None], **given)

"""Multi-node training: two nodes of one process each, simulated on this machine through torchrun's c10d
rendezvous (the launch a cluster without SLURM uses), running `lightning-llm fit` with ZeROStrategy on gloo.

The oracle is a one-process run on the same global batches: PretrainDataModule's sampler is a
`DistributedSampler` (so Lightning keeps it rather than adding its own shuffling one) that deals one
seeded permutation out over the data-parallel ranks, so the two ranks' batches of `batch_size` rows
together are the one-process batch of `2 x batch_size` rows.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml
from _precision_helpers import launch_nodes, private_mounts, read_losses
from tolerances import reordered_sum_rtol

from lightning_llm.checkpoint import load_checkpoint
from lightning_llm.cli import main

REPOSITORY = Path(__file__).parent.parent
TESTS = Path(__file__).parent
STEPS, ROWS, BLOCK = 4, 2, 32  # per node: ROWS blocks of BLOCK tokens a step


def config(corpus_dir: Path, losses: Path, *, nodes: int, rows: int, cache: str, checkpoints: str | None) -> dict:
    """A tiny pretraining run on `nodes` nodes of one CPU process (ZeRO stage 2), recording every rank's losses;
    its other outputs (the saved config) go beside `losses`."""
    callbacks = [{"class_path": "_precision_helpers.LossFile", "init_args": {"directory": str(losses)}}]
    if checkpoints is not None:
        callbacks.append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                          "init_args": {"dirpath": checkpoints, "every_n_train_steps": 2, "save_last": True}})
    return {
        "seed_everything": 0,
        "model": {"class_path": "lightning_llm.PretrainModule", "init_args": {"model": "tiny", "warmup_steps": 2}},
        "data": {"class_path": "lightning_llm.PretrainDataModule",
                 "init_args": {"sources": str(corpus_dir), "vocab_size": 300, "block_size": BLOCK, "batch_size": rows,
                               "cache_dir": cache}},
        "trainer": {"accelerator": "cpu", "num_nodes": nodes, "devices": 1, "max_steps": STEPS,
                    "strategy": {"class_path": "lightning_llm.ZeROStrategy", "init_args": {"stage": 2}},
                    "default_root_dir": str(losses.parent), "enable_checkpointing": checkpoints is not None,
                    "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
                    "limit_val_batches": 0, "num_sanity_val_steps": 0, "gradient_clip_val": 1.0,
                    "callbacks": callbacks},
    }


def write_config(path: Path, content: dict) -> Path:
    path.write_text(yaml.safe_dump(content))
    return path


def node_env() -> dict[str, str]:
    # the project, and the tests' helpers that the config names (LossFile)
    return {"PYTHONPATH": f"{REPOSITORY}:{TESTS}"}


# `lightning-llm fit`, with a line per token file tokenized appended to $TOKENIZED (from any node).
COUNTING_FIT = """
import os, sys
import lightning_llm.data.pretrain as pretrain
from lightning_llm.cli import main

tokenize = pretrain.tokenize_to_file

def counted(source, tokenizer, path, *args, **kwargs):
    with open(os.environ["TOKENIZED"], "a") as log:
        log.write(f"{path}\\n")
    return tokenize(source, tokenizer, path, *args, **kwargs)

pretrain.tokenize_to_file = counted
main(sys.argv[1:])
"""


def fit_on_two_nodes(tmp_path: Path, run: dict, node_local: Path | None = None) -> list:
    """`lightning-llm fit` of `run` on two simulated nodes; each node's working directory is its own."""
    config_file = write_config(tmp_path / "run.yaml", run)
    program = ["--no-python", sys.executable, "-c", COUNTING_FIT, "fit", "--config", str(config_file)]
    return launch_nodes(program, [tmp_path / "node0", tmp_path / "node1"], node_local=node_local,
                        env={**node_env(), "TOKENIZED": str(tmp_path / "tokenized.txt")})


def tokenized(tmp_path: Path) -> list[str]:
    return (tmp_path / "tokenized.txt").read_text().splitlines()


# Each logged loss is the token mean over the global batch (ROWS x BLOCK tokens on each of 2 ranks) of
# logits that are dot products over the tiny model's 64 hidden units; the ranks sum it, and the gradient,
# in another order than one process, which moves a loss by at most reordered_sum_rtol of its terms
# (positive here, so of the loss itself), as in test_zero.
LOSS_TOL = dict(rtol=2 * reordered_sum_rtol(torch.float32, 2 * ROWS * BLOCK), atol=0)


def test_two_nodes_through_torchrun_train_as_one_process(tmp_path, corpus_dir):
    cache, checkpoints = tmp_path / "shared-cache", tmp_path / "checkpoints"
    two = config(corpus_dir, tmp_path / "losses", nodes=2, rows=ROWS, cache=str(cache), checkpoints=str(checkpoints))
    done = fit_on_two_nodes(tmp_path, two)
    for node, result in enumerate(done):
        assert result.returncode == 0, f"node {node}:\n{result.stdout[-4000:]}"

    one = config(corpus_dir, tmp_path / "oracle", nodes=1, rows=2 * ROWS, cache=str(tmp_path / "cache1"), checkpoints=None)
    main(["fit", "--config", str(write_config(tmp_path / "one.yaml", one))])

    expected = read_losses(tmp_path / "oracle", 0)
    node0, node1 = read_losses(tmp_path / "losses", 0), read_losses(tmp_path / "losses", 1)
    assert [step for step, _ in expected] == list(range(1, STEPS + 1))
    assert node0 == node1  # both nodes log the same global loss at the same steps
    assert [step for step, _ in node0] == [step for step, _ in expected]
    torch.testing.assert_close(torch.tensor([loss for _, loss in node0]), torch.tensor([loss for _, loss in expected]),
                               **LOSS_TOL)
    # the sharded checkpoint holds both nodes' shards (load_checkpoint verifies the shard set)
    assert load_checkpoint(checkpoints / "last.ckpt")["global_step"] == STEPS
    # the cache both nodes share was tokenized once (by global rank 0), not once per node
    assert len(tokenized(tmp_path)) == 1 and Path(tokenized(tmp_path)[0]).parent.parent == cache


@pytest.mark.skipif(not private_mounts(), reason="needs mount namespaces (unshare -rm) to give a node a disk of its own")
def test_node_local_disks_get_their_own_token_cache_and_refuse_sharded_checkpoints(tmp_path, corpus_dir):
    scratch = tmp_path / "scratch"  # each node's own disk at this path (node 1: an empty tmpfs)
    run = config(corpus_dir, tmp_path / "losses", nodes=2, rows=ROWS, cache=str(scratch / "cache"),
                 checkpoints=str(scratch / "checkpoints"))
    done = fit_on_two_nodes(tmp_path, run, node_local=scratch)
    # Each node tokenized into its own cache, and both trained on the same data until the first checkpoint
    # (step 2), which every rank refused to write: node 1 cannot see the folder rank 0 made for the shards.
    files = tokenized(tmp_path)
    assert len(files) == 2 and len(set(files)) == 1 and Path(files[0]).parent.parent == scratch / "cache"
    assert read_losses(tmp_path / "losses", 0)[:2] == read_losses(tmp_path / "losses", 1)[:2]
    for node, result in enumerate(done):
        assert result.returncode != 0, f"node {node} succeeded:\n{result.stdout[-3000:]}"
        assert "the checkpoint folder must be on a filesystem that every node shares" in result.stdout, result.stdout[-3000:]
    assert not (scratch / "checkpoints" / "step=2.ckpt").exists()  # no checkpoint without node 1's shards

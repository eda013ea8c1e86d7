"""Multi-node training: two nodes of one process each, simulated on this machine through torchrun's c10d
rendezvous (the launch a cluster without SLURM uses), running `lightning-llm fit` with ZeROStrategy on gloo.

The oracle is a one-process run on the same global batches: PretrainDataModule's sampler is a
`DistributedSampler` (so Lightning keeps it rather than adding its own shuffling one) that deals one
seeded permutation out over the data-parallel ranks, so the two ranks' batches of `batch_size` rows
together are the one-process batch of `2 x batch_size` rows.
"""

from __future__ import annotations

import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import yaml
from _precision_helpers import free_port, launch_nodes, private_mounts, read_losses
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


@pytest.mark.slow
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


@pytest.mark.slow
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


# -- the recipes and the cluster environments, without a cluster -----------------------------------------

# What srun sets for task 3 of 4 (node 1 of 2, second task there), and what torchrun sets for the same
# process of a 2-node job of 2 processes a node.
SLURM_TASK = {"SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
              "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_ID": "4321",
              "SLURM_JOB_NAME": "lightning-llm-pretrain", "SLURM_NODELIST": "gpu[07-08]"}
TORCHRUN_PROCESS = {"RANK": "3", "LOCAL_RANK": "1", "GROUP_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
                    "TORCHELASTIC_RUN_ID": "lightning-llm-pretrain"}
# (recipe, the launcher it calls, the environment that launcher gives each process, Lightning's environment)
RECIPES = {"slurm": ("examples/slurm/pretrain.sbatch", "srun", SLURM_TASK, "SLURMEnvironment"),
           "torchrun": ("examples/multinode/torchrun.sh", "torchrun", TORCHRUN_PROCESS, "TorchElasticEnvironment")}


def launcher_arguments(recipe: str, tmp_path: Path, *extra: str) -> list[str]:
    """The arguments the recipe passes to its launcher (srun or torchrun), run by bash in the repository with a
    stand-in launcher that records them, for an allocation of 2 nodes of 2 devices; `extra`: the recipe's own
    arguments (options for lightning-llm fit)."""
    script, launcher, _, _ = RECIPES[recipe]
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / launcher).write_text('#!/bin/sh\nprintf "%s\\0" "$@" > "$RECORDED"\n')
    (stubs / launcher).chmod(0o755)
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "RECORDED": str(tmp_path / "args"), "RUN_DIR": str(tmp_path / "run"),
           "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "2", "NNODES": "2", "GPUS_PER_NODE": "2",
           "MASTER_ADDR": "10.0.0.1"}
    subprocess.run(["bash", script, *extra], cwd=REPOSITORY, env=env, check=True)
    return (tmp_path / "args").read_text().split("\0")[:-1]


def fit_arguments(arguments: list[str]) -> list[str]:
    """What follows `fit` in a launcher's arguments (the options of `lightning-llm fit`)."""
    return arguments[arguments.index("fit") + 1:]


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_the_recipes_command_line_parses_and_takes_its_size_from_the_allocation(recipe, tmp_path, capsys):
    arguments = launcher_arguments(recipe, tmp_path)
    if recipe == "slurm":
        assert arguments[:2] == ["lightning-llm", "fit"]
    else:
        assert {"--nnodes=2", "--nproc_per_node=2", "--rdzv_backend=c10d", "--rdzv_endpoint=10.0.0.1:29400"} <= set(arguments)
        assert arguments[arguments.index("-m") + 1:][:2] == ["lightning_llm.cli", "fit"]
    with pytest.raises(SystemExit) as info:
        main(["fit", *fit_arguments(arguments), "--print_config"])
    assert info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    # (devices stays the string "2", which Lightning reads as a count, as it does on its own command line)
    assert (printed["trainer"]["num_nodes"], str(printed["trainer"]["devices"])) == (2, "2")
    assert printed["trainer"]["strategy"] == "zero2"
    assert printed["trainer"]["default_root_dir"] == str(tmp_path / "run")


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_a_recipe_passes_its_arguments_on_to_fit_so_a_parallel_layout_replaces_zero2(recipe, tmp_path, capsys):
    parallel = ["--trainer.strategy=lightning_llm.ParallelStrategy", "--trainer.strategy.tensor_parallel=2"]
    arguments = launcher_arguments(recipe, tmp_path, *parallel)
    with pytest.raises(SystemExit):
        main(["fit", *fit_arguments(arguments), "--print_config"])
    strategy = yaml.safe_load(capsys.readouterr().out)["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning_llm.ParallelStrategy"  # (mesh: data_parallel "auto" x 2 per node)
    assert (strategy["init_args"]["tensor_parallel"], strategy["init_args"]["data_parallel"]) == (2, "auto")


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_each_process_of_a_recipe_takes_the_ranks_its_launcher_gives(recipe, tmp_path, monkeypatch):
    from lightning.fabric.plugins import environments

    from lightning_llm.data.pretrain import PretrainDataModule
    from lightning_llm.lightning_cli import LLMCLI
    from lightning_llm.modules.pretrain import PretrainModule
    from lightning_llm.strategies.zero import ZeROStrategy

    arguments = fit_arguments(launcher_arguments(recipe, tmp_path))
    _, _, process, environment = RECIPES[recipe]
    for name, value in {**process, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(name, value)
    # the recipe's trainer, built (not run) on this CPU as that process
    cli = LLMCLI(PretrainModule, PretrainDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
                 args=[*arguments, "--trainer.accelerator=cpu"])
    trainer, expected = cli.trainer, getattr(environments, environment)()  # Lightning's own reading of the variables
    assert isinstance(trainer.strategy, ZeROStrategy)
    assert type(trainer.strategy.cluster_environment).__name__ == environment
    assert (trainer.global_rank, trainer.local_rank, trainer.node_rank, trainer.world_size) == (3, 1, 1, 4)
    assert (trainer.global_rank, trainer.local_rank, trainer.node_rank, trainer.world_size) == (
        expected.global_rank(), expected.local_rank(), expected.node_rank(), expected.world_size())
    expected.validate_settings(num_devices=trainer.num_devices, num_nodes=trainer.num_nodes)  # sizes agree


# A 2-node launch of 1 process a node (this process: node 1), and a trainer set for another size: through the
# command line (1 node x 1 device), and a Python Trainer with ZeROStrategy (1 node x 2 devices: the same
# number of processes, another split, which Lightning's own check of torchrun's world size lets pass).
ONE_PER_NODE = {"slurm": {**SLURM_TASK, "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0",
                          "SLURM_NTASKS_PER_NODE": "1"},
                "torchrun": {**TORCHRUN_PROCESS, "RANK": "1", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1"}}
MISMATCH_ERRORS = {
    ("slurm", "cli"): "You set `num_nodes=1` in Lightning, but the number of nodes configured in SLURM `--nodes=2` "
                      "does not match. HINT: Set `num_nodes=2`.",
    ("slurm", "trainer"): "You set `devices=2` in Lightning, but the number of tasks per node configured in SLURM "
                          "`--ntasks-per-node=1` does not match. HINT: Set `devices=1`.",
    ("torchrun", "cli"): "torchrun started 2 processes, 1 on each of 2 nodes, but the trainer is set for num_nodes=1 x "
                         "devices=1: set num_nodes=2 and devices=1 (command line: --trainer.num_nodes=2 --trainer.devices=1)",
    ("torchrun", "trainer"): "torchrun started 2 processes, 1 on each of 2 nodes, but the trainer is set for num_nodes=1 x "
                             "devices=2: set num_nodes=2 and devices=1",
}


@pytest.mark.parametrize("recipe, via", list(MISMATCH_ERRORS))
def test_a_trainer_size_that_does_not_match_the_launch_stops_naming_both(recipe, via, tmp_path, corpus_dir,
                                                                         monkeypatch, capsys):
    import lightning as L
    from _precision_helpers import TinyLM, loader, pattern_batches

    from lightning_llm.strategies.zero import ZeROStrategy

    for name, value in {**ONE_PER_NODE[recipe], "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(name, value)
    run = config(corpus_dir, tmp_path / "losses", nodes=1, rows=ROWS, cache=str(tmp_path / "cache"), checkpoints=None)
    # (without the check, the process would wait for its peer in the rendezvous: this bounds the wait)
    run["trainer"]["strategy"]["init_args"]["timeout"] = "0:00:20"
    if via == "cli":
        with pytest.raises(SystemExit) as info:
            main(["fit", "--config", str(write_config(tmp_path / "run.yaml", run))])
        assert info.value.code == 1
        assert MISMATCH_ERRORS[recipe, via] in capsys.readouterr().err
        assert not (tmp_path / "losses").exists()  # stopped before any training
    else:
        trainer = L.Trainer(accelerator="cpu", num_nodes=1, devices=2, strategy=ZeROStrategy(stage=2, timeout=timedelta(seconds=20)), max_steps=1,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False)
        with pytest.raises(ValueError, match="^" + re.escape(MISMATCH_ERRORS[recipe, via])):
            trainer.fit(TinyLM(), loader(pattern_batches(1)))


@pytest.mark.parametrize("strategy", ["pipeline", "parallel"])
def test_the_mesh_strategies_check_the_launch_size_too(strategy, monkeypatch):
    """ParallelStrategy (and PipelineStrategy, its one-dimension form) set up their own mesh: they make the same
    check before the rendezvous (without it the process would wait for its peer until the timeout)."""
    import lightning as L
    from _precision_helpers import TinyLM, loader, pattern_batches

    from lightning_llm.strategies.parallel import ParallelStrategy, PipelineStrategy

    for name, value in {**ONE_PER_NODE["torchrun"], "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(name, value)
    timeout = timedelta(seconds=20)
    built = PipelineStrategy(stages=2, timeout=timeout) if strategy == "pipeline" else ParallelStrategy(tensor_parallel=2, timeout=timeout)
    trainer = L.Trainer(accelerator="cpu", num_nodes=1, devices=2, strategy=built, max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="^" + re.escape(MISMATCH_ERRORS["torchrun", "trainer"])):
        trainer.fit(TinyLM(), loader(pattern_batches(1)))

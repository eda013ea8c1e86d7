#!/bin/bash
# Pretraining on several nodes without SLURM: run this script on every node, with the same NNODES and
# MASTER_ADDR (an address of one node that every node reaches; its port RDZV_PORT must be open).
# torchrun's c10d rendezvous gathers the nodes, numbers them, and starts GPUS_PER_NODE processes on each;
# Lightning's TorchElasticEnvironment reads their ranks (RANK, LOCAL_RANK, GROUP_RANK, WORLD_SIZE).
#
#   on every node:  NNODES=2 MASTER_ADDR=10.0.0.1 bash examples/multinode/torchrun.sh
#   extra options go to lightning-llm fit:  ... bash examples/multinode/torchrun.sh --trainer.max_steps=1000
#   tensor parallelism inside each node, ZeRO-3 across the nodes (mesh: data_parallel = NNODES x tensor_parallel
#   = GPUS_PER_NODE):  ... bash examples/multinode/torchrun.sh --trainer.strategy=lightning_llm.ParallelStrategy \
#                          --trainer.strategy.tensor_parallel=8
#
# RUN_DIR (checkpoints, logs, export) and the token cache must be on a filesystem every node shares:
# every rank writes its shards of a checkpoint into one folder.
set -euo pipefail
NNODES=${NNODES:?set NNODES to the number of nodes}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR to the address of one node that every node reaches}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi --list-gpus | wc -l)}
RDZV_PORT=${RDZV_PORT:-29400}
RUN_ID=${RUN_ID:-lightning-llm-pretrain}
CONFIG=${CONFIG:-examples/pretrain_tiny_gpu.yaml}
RUN_DIR=${RUN_DIR:-$PWD/runs/pretrain_multinode}
export LIGHTNING_LLM_CACHE=${LIGHTNING_LLM_CACHE:-$RUN_DIR/cache}

torchrun --nnodes="$NNODES" --nproc_per_node="$GPUS_PER_NODE" \
    --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$RDZV_PORT" --rdzv_id="$RUN_ID" \
    -m lightning_llm.cli fit --config "$CONFIG" \
    --trainer.num_nodes="$NNODES" \
    --trainer.devices="$GPUS_PER_NODE" \
    --trainer.strategy=zero2 \
    --trainer.default_root_dir="$RUN_DIR" \
    "$@"

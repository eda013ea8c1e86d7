"""The size a trainer is set for (`num_nodes` x `devices`) against the processes its launcher started.

Lightning compares the two only when it starts the processes itself. Under torchrun or SLURM (a cluster
environment that `creates_processes_externally`) it does not: a trainer set for one node in a two-node
job sets up with ranks it does not expect, then waits in the rendezvous or fails far from the cause.
`check_launch_size` makes the comparison there too, before any process group, through the environment's
own `validate_settings` (SLURMEnvironment compares with `--nodes` and `--ntasks-per-node`), and for
torchrun also compares the processes per node, which Lightning's check (the product only) lets pass.
"""

from __future__ import annotations

import os
from typing import Any

from lightning.fabric.plugins.environments import TorchElasticEnvironment


def check_launch_size(strategy: Any) -> None:
    """Raise, naming both sizes and the fix, unless the trainer's `num_nodes` and `devices` match the
    processes an external launcher started. `strategy`: a Lightning strategy (`cluster_environment`,
    `num_nodes`, `num_processes`); one that Lightning's own launcher starts is checked by that launcher."""
    environment = getattr(strategy, "cluster_environment", None)
    if environment is None or not environment.creates_processes_externally:
        return
    nodes, devices = strategy.num_nodes, strategy.num_processes
    if isinstance(environment, TorchElasticEnvironment):
        world, per_node = environment.world_size(), int(os.environ.get("LOCAL_WORLD_SIZE", devices))
        if (nodes, devices) != (world // per_node, per_node):
            raise ValueError(
                f"torchrun started {world} processes, {per_node} on each of {world // per_node} nodes, but the trainer "
                f"is set for num_nodes={nodes} x devices={devices}: set num_nodes={world // per_node} and "
                f"devices={per_node} (command line: --trainer.num_nodes={world // per_node} "
                f"--trainer.devices={per_node}), or start torchrun with --nnodes={nodes} --nproc_per_node={devices}")
        return
    environment.validate_settings(num_devices=devices, num_nodes=nodes)

"""Shared test helpers: small LightningModules and data, a metrics-recording logger, a per-rank loss file,
free ports, and a launcher of simulated nodes through torchrun's rendezvous."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader

from lightning_llm.models import build_model

VOCAB = 256


def pattern_batches(n: int, batch_size: int = 4, seq_len: int = 32, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Learnable token streams: t[i+1] = (5 * t[i] + 3) mod VOCAB from a random start, shifted targets."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        tokens = [torch.randint(0, VOCAB, (batch_size,), generator=gen)]
        for _ in range(seq_len):
            tokens.append((5 * tokens[-1] + 3) % VOCAB)
        stream = torch.stack(tokens, dim=1)
        batches.append({"input_ids": stream[:, :-1], "targets": stream[:, 1:]})
    return batches


def loader(batches: list) -> DataLoader:
    return DataLoader(batches, batch_size=None, shuffle=False)


class TinyLM(LightningModule):
    """The tiny Llama preset, AdamW and a linear-warmup LambdaLR stepped every optimizer step."""

    def __init__(self, lr: float = 3e-3, warmup: int = 10, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        # transformers' init at std 0.02 (not the project's small init): the precision tests' premises and
        # bounds (bf16 spacing of the weights, max|logit| < 2 in tolerances.loss_atol) are stated for it
        self.model = build_model("tiny", vocab_size=VOCAB, initializer_range=0.02)
        self.lr, self.warmup = lr, warmup
        self.losses: list[float] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self.model(input_ids=batch["input_ids"]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch["targets"].flatten())
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / self.warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class MetricsRecorder(Logger):
    """A logger that keeps every `log_metrics` call in memory: [(step, {name: value})]."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.records.append((step, dict(metrics)))

    def series(self, name: str) -> list[float]:
        return [metrics[name] for _, metrics in self.records if name in metrics]


class PlantOverflow(Callback):
    """Puts an inf (or `value`) into one gradient after backward on the given (0-based) optimizer steps,
    and snapshots weights, optimizer state, LR and loss scale (if any) around every step."""

    def __init__(self, steps: set[int], value: float = float("inf")) -> None:
        self.steps, self.value = steps, value
        self.before: dict[int, dict] = {}
        self.after: dict[int, dict] = {}

    def snapshot(self, trainer, module) -> dict:
        optimizer = trainer.optimizers[0]
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        return {"weights": copy.deepcopy(module.state_dict()), "optimizer": copy.deepcopy(optimizer.state_dict()),
                "lr": optimizer.param_groups[0]["lr"], "scale": scaler.get_scale() if scaler is not None else None}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before[trainer.global_step] = self.snapshot(trainer, module)

    def on_after_backward(self, trainer, module):
        if trainer.global_step in self.steps:
            next(module.parameters()).grad.view(-1)[0] = self.value

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.after[trainer.global_step - 1] = self.snapshot(trainer, module)


def draw_residual_branches(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Draw a fresh model's residual projections (o_proj, down_proj), which the project's init starts at zero
    (models.init_stds), with the small init's std 1 / (sqrt(d) L): a forward check on a fresh model (an attention
    mask, packing, a split) then depends on its attention and MLP weights, not on its embeddings alone."""
    from lightning_llm.models import RESIDUAL_PROJECTIONS

    config = model.config if hasattr(model, "config") else model.model.config
    std = 1 / (config.hidden_size ** 0.5 * config.num_hidden_layers)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in RESIDUAL_PROJECTIONS and isinstance(module, torch.nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
    return model


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LossFile(Callback):
    """Every rank appends the logged `name` of each training step to `<directory>/losses-rank<global rank>.jsonl`
    (a file per rank, so ranks on different nodes can be compared; appended, so a failed run keeps its steps)."""

    def __init__(self, directory: str, name: str = "train/loss") -> None:
        self.directory, self.name = Path(directory), name

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / f"losses-rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps([trainer.global_step, float(trainer.callback_metrics[self.name])]) + "\n")


def read_losses(directory: Path, rank: int) -> list[tuple[int, float]]:
    """What `LossFile` wrote for `rank`: (step after the batch, loss) of every training batch."""
    return [tuple(line) for line in map(json.loads, (directory / f"losses-rank{rank}.jsonl").read_text().splitlines())]


def private_mounts() -> bool:
    """Whether this machine lets a process mount in a mount namespace of its own (`unshare -rm`), which
    `launch_nodes(node_local=...)` needs."""
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def launch_nodes(program: list[str], node_dirs: list[Path], env: dict[str, str] | None = None,
                 node_local: Path | None = None, timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Run `program` (what torchrun runs: `["-m", module, *args]`, or `["--no-python", executable, *args]`) as a
    job of len(node_dirs) nodes of one process each, the way a cluster launches one: a `torchrun --nnodes=N
    --node_rank=i --rdzv_backend=c10d` per node, all meeting at one rendezvous endpoint. Node i runs in its
    own working directory `node_dirs[i]`. `node_local`: a folder that node 0 sees as it is and every other
    node as an empty folder of its own (a tmpfs in a private mount namespace, see `private_mounts`), as
    node-local scratch disks mounted at one path are. Returns each node's finished process (stdout and
    stderr together in `.stdout`)."""
    nodes = len(node_dirs)
    endpoint = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    procs = []
    for rank, node_dir in enumerate(node_dirs):
        node_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", "--nproc_per_node=1",
                   f"--node_rank={rank}", "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}",
                   f"--rdzv_id=test-{endpoint}", "--local_addr=127.0.0.1", "--max_restarts=0", *program]
        if node_local is not None and rank > 0:
            node_local.mkdir(parents=True, exist_ok=True)
            command = ["unshare", "-rm", "sh", "-c", 'mount -t tmpfs tmpfs "$0" && exec "$@"', str(node_local), *command]
        procs.append(subprocess.Popen(command, cwd=node_dir, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [proc.communicate(timeout=timeout)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [subprocess.CompletedProcess(proc.args, proc.returncode, out) for proc, out in zip(procs, outputs)]

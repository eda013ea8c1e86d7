"""What a benchmark records besides its figures: the machine it ran on (the device, and the versions of
torch, CUDA, cuDNN, triton and the libraries the runs go through), and its JSON and PNG files, written
atomically so that an interrupted run never leaves half a result.

    python benchmarks/record.py    # print the environment as JSON (gpu.sh's first step; imports torch only)
"""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

PACKAGES = ("triton", "transformers", "lightning", "peft", "bitsandbytes")


def machine() -> str:
    """One line naming the device: the GPU, or the CPU with its core and thread counts."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"


def environment() -> dict[str, Any]:
    """Device, its properties on CUDA, and the versions that decide a benchmark's figures."""
    info: dict[str, Any] = {"machine": machine(), "python": platform.python_version(), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "cpus": os.cpu_count()}
    for package in PACKAGES:
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, compute_capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
                    cudnn=torch.backends.cudnn.version(), device_count=torch.cuda.device_count())
    else:
        info["device"] = "cpu"
    return info


def write_json(data: Any, path: str | os.PathLike) -> None:
    """`data` as indented JSON at `path` (folders created), written atomically."""
    from lightning_llm.checkpoint import atomic_file  # (here: printing the environment needs torch only)

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        f.write(json.dumps(data, indent=2).encode())


def save_figure(fig: Any, path: str | os.PathLike) -> None:
    """A matplotlib figure as a PNG at `path`, written atomically."""
    from lightning_llm.checkpoint import atomic_file

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=120)


def main() -> None:
    print(json.dumps(environment(), indent=2))


if __name__ == "__main__":
    main()

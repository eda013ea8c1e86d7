"""What tests/gpu/ runs on: CUDA when present, or the CPU in `gpu.sh --dry-run` (LIGHTNING_LLM_GPU_DRY_RUN=1)."""

from __future__ import annotations

import os

import torch

DRY_RUN = os.environ.get("LIGHTNING_LLM_GPU_DRY_RUN") == "1"
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

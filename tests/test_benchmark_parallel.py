"""benchmarks/parallel.py --quick: the communication of one training step under ParallelStrategy, counted by
torch's CommDebugMode, equals the textbook formulas (Megatron TP, sequence parallelism, ZeRO-2 and ZeRO-3), and the
per-rank bytes are the split ones (ZeRO-2 gathers each parameter once per step: a step that calls its module
while the strategy runs it inside the root's forward once gathered the root's embedding a second time). Not timed: the step times the quick mode prints are not checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # four layouts in two processes, about a minute: the suite leaves it to `pytest -m slow`
def test_quick_mode_communication_matches_the_formulas(tmp_path):
    out = tmp_path / "parallel.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "parallel.py"), "--quick", "--out", str(out)],
                   cwd=ROOT / "benchmarks", env=env, check=True, capture_output=True, timeout=600)
    rows = {row["layout"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"tp2", "tp2+SP", "dp2 ZeRO-2", "dp2 ZeRO-3"}
    for layout, row in rows.items():
        collectives = row["comm"]["collectives"]
        total = sum(c["formula"] for c in collectives.values())
        for kind, c in collectives.items():
            if c["formula"]:  # within 5%: the small tensors (loss-parallel statistics, norm gradients) are the rest
                assert abs(c["measured"] / c["formula"] - 1) <= 0.05, (layout, kind, c)
            else:
                assert c["measured"] <= 0.05 * total, (layout, kind, c)
        assert row["comm"]["holds"] and not row["comm"]["other_types"], (layout, row["comm"])
    # CommDebugMode sees FSDP2's parameter all-gathers and gradient reduce-scatters.
    assert rows["dp2 ZeRO-3"]["comm"]["collectives"]["all_gather"]["measured"] > 0
    # Per rank at tp2 (ZeRO over a data-parallel dimension of 1): half of every matrix, the whole norms.
    import torch

    from lightning_llm.models import build_model

    with torch.device("meta"):
        model = build_model("tiny")
    matrices = sum(p.numel() for p in model.parameters() if p.ndim == 2)
    norms = sum(p.numel() for p in model.parameters() if p.ndim == 1)
    for layout in ("tp2", "tp2+SP"):
        assert rows[layout]["params"] == rows[layout]["grads"] == 4 * (matrices // 2 + norms), layout
        # AdamW: two moments of each parameter's shard and a 4-byte step count per parameter.
        assert rows[layout]["optimizer"] == 2 * rows[layout]["params"] + 4 * len(list(model.parameters())), layout

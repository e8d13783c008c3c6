"""MoE and hybrid models trained by the trainer on 2 CPU ranks, with NVFP4 experts and NVFP4 gradients.

Each model is a tiny config from AutoConfig (``model.config`` in the run JSON, no download), the same
ones tests/ds_fp4/test_experts.py checks numerically. Each model trains once, under ZeRO-2 or ZeRO-3 in
turn (both stages are covered, ZeRO-3 by three models with experts partitioned and gathered), for 16
steps with falling loss.
"""

from __future__ import annotations

import json
import math

import pytest
from tiny_runs import TINY_MOE, TINY_MOE_COMMON

from .conftest import run, steps, write_config

MOE = {**TINY_MOE_COMMON, "max_position_embeddings": 64, "tie_word_embeddings": False}
STAGE = {"qwen3_moe": 3, "mixtral": 2, "deepseek_v3": 3, "gpt_oss": 2, "nemotron_h": 3}  # each model once


@pytest.mark.parametrize("name", list(TINY_MOE))
def test_a_tiny_moe_model_trains_on_2_ranks_with_nvfp4_experts(corpus, tmp_path, name):
    stage = STAGE[name]
    model = {"config": {"model_type": name, **MOE, **TINY_MOE[name]}, "init_seed": 0}
    cfg = write_config(tmp_path / "cfg.json", corpus, model=model, zero_optimization={"stage": stage},
                       nvfp4={"keep_first_blocks": 0, "keep_last_blocks": 0},
                       trainer={"max_steps": 16, "save_interval": 0, "warmup_steps": 2})
    out = run(cfg, 2, timeout=900).output()
    assert "experts x" in out and "per token" in out, out[-3000:]
    head = next(line for line in out.splitlines() if "NVFP4 conversion:" in line)
    assert "of weight FLOPs per token" in head
    rows = steps(tmp_path / "run")
    losses = [rows[s]["loss"] for s in sorted(rows)]
    assert len(losses) == 16 and all(math.isfinite(x) for x in losses), losses
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.3, f"{name} (ZeRO-{stage}): loss {first:.3f} -> {last:.3f}: {json.dumps(losses)}"

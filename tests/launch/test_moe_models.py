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

from .conftest import run, steps, write_config

MOE = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
       "num_experts_per_tok": 2, "tie_word_embeddings": False}
MODELS = {
    "qwen3_moe": (3, {"intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 3,
                      "num_experts": 8, "head_dim": 16}),
    "mixtral": (2, {"intermediate_size": 64, "num_hidden_layers": 3, "num_local_experts": 8}),
    "deepseek_v3": (3, {"intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 3,
                        "n_routed_experts": 8, "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 2,
                        "topk_group": 1, "q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
                        "qk_rope_head_dim": 16, "v_head_dim": 16, "num_key_value_heads": 4}),
    "gpt_oss": (2, {"intermediate_size": 64, "num_hidden_layers": 3, "num_local_experts": 8, "head_dim": 16,
                    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
                    "sliding_window": 16}),
    "nemotron_h": (3, {"intermediate_size": 128, "num_hidden_layers": 4, "hybrid_override_pattern": "M*-E",
                       "mamba_num_heads": 16, "mamba_head_dim": 8, "ssm_state_size": 16, "n_groups": 2,
                       "mamba_d_conv": 4, "expand": 2, "n_routed_experts": 8, "moe_intermediate_size": 32,
                       "moe_shared_expert_intermediate_size": 32, "head_dim": 16, "n_group": 1,
                       "topk_group": 1}),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_a_tiny_moe_model_trains_on_2_ranks_with_nvfp4_experts(corpus, tmp_path, name):
    stage, extra = MODELS[name]
    model = {"config": {"model_type": name, **MOE, **extra}, "init_seed": 0}
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

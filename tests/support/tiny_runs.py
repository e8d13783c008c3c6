"""What the trainer and Slurm tests share: a tiny, fast run config derived from the demo config.

The model is a 4-layer Llama with hidden size 64 (~0.2-0.3 s per step on 2 CPU ranks); the data is a
small prepared corpus (the `corpus` fixture in tests/conftest.py).
"""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo-cpu.json"
TINY_MODEL = {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 64}


# Tiny MoE and hybrid models for AutoConfig.for_model(name, **TINY_MOE_COMMON, **TINY_MOE[name]): hidden 64,
# 8 experts with 2 per token, every expert dim a multiple of 16 (tests/ds_fp4/test_experts.py and
# tests/launch/test_moe_models.py).
TINY_MOE_COMMON = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts_per_tok": 2}
TINY_MOE = {
    "qwen3_moe": {"intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 3, "num_experts": 8,
                  "head_dim": 16},
    "mixtral": {"intermediate_size": 64, "num_hidden_layers": 3, "num_local_experts": 8},
    "deepseek_v3": {"intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 3,
                    "n_routed_experts": 8, "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 2,
                    "topk_group": 1, "q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
                    "qk_rope_head_dim": 16, "v_head_dim": 16, "num_key_value_heads": 4},
    "gpt_oss": {"intermediate_size": 64, "num_hidden_layers": 3, "num_local_experts": 8, "head_dim": 16,
                "layer_types": ["sliding_attention", "full_attention", "sliding_attention"], "sliding_window": 16},
    # Mamba, attention, MLP and MoE blocks, one mixer each.
    "nemotron_h": {"intermediate_size": 128, "num_hidden_layers": 4, "hybrid_override_pattern": "M*-E",
                   "mamba_num_heads": 16, "mamba_head_dim": 8, "ssm_state_size": 16, "n_groups": 2,
                   "mamba_d_conv": 4, "expand": 2, "n_routed_experts": 8, "moe_intermediate_size": 32,
                   "moe_shared_expert_intermediate_size": 32, "head_dim": 16, "n_group": 1, "topk_group": 1},
}


def write_config(path: Path, corpus: Path, **sections) -> Path:
    """The demo config with the tiny model, ``corpus`` as data, and per-section overrides merged in
    (``trainer={"max_steps": 4}`` updates the trainer section; a non-dict value replaces a section)."""
    cfg = json.loads(DEMO.read_text())
    cfg["model"]["config"].update(TINY_MODEL)
    cfg["data"] = {"sources": [str(corpus)], "seq_len": 64, "seed": 7}
    cfg["trainer"].update({"out_dir": str(path.parent / "run"), "max_steps": 8, "save_interval": 4,
                           "eval_interval": 0, "log_interval": 1, "progress": False, "warmup_steps": 2})
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(cfg.get(section), dict):
            cfg[section].update(values)
        else:
            cfg[section] = values
    path.write_text(json.dumps(cfg, indent=1))
    return path


def steps(out_dir: Path) -> dict[int, dict]:
    """steps.jsonl as {step: row}; a step logged twice (before a crash and after the resume) keeps the last."""
    rows = {}
    for line in (out_dir / "steps.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row
    return rows


def golden_config(path: Path, corpus: Path) -> Path:
    """The golden run (tests/launch/test_golden.py, bench/cpu_numerics.py): the paper recipe with NVFP4
    gradient communication, 12 steps on 2 ranks.

    Two choices keep it portable (launch/cpu_numerics.py): torch's fused AdamW, whose ATen kernel takes
    square roots with the CPU's exact instruction (the unfused one calls MKL's vector math, whose rounding
    differs between CPUs: 20% of float32 square roots one ulp off on one machine, none on another), and
    no gradient clipping, since DeepSpeed's gradient norm ends in such a square root."""
    return write_config(path, corpus,
                        nvfp4={"preset": "paper", "keep_first_blocks": 1, "keep_last_blocks": 1,
                               "grad_comm": "nvfp4", "stats_interval": 0},
                        trainer={"max_steps": 12, "save_interval": 0, "warmup_steps": 2}, gradient_clipping=0.0,
                        optimizer={"type": "AdamW", "params": {"lr": 0.003, "betas": [0.9, 0.95], "eps": 1e-08,
                                                               "weight_decay": 0.1, "torch_adam": True,
                                                               "fused": True}})

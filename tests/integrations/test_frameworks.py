"""ds_fp4 inside the training scripts DeepSpeed users already run (docs/integrations.md).

Real frameworks, real launchers, 2 CPU ranks over gloo: HF Trainer and Accelerate scripts that never
import ds_fp4, started through ``python -m ds_fp4.run``; a GPT-NeoX-style script that calls
deepspeed.initialize itself; Lightning's DeepSpeedStrategy after ``ds_fp4.patch_deepspeed()``. Each run
happens once per module and several tests read its result.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch.distributed import free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32)
NVFP4 = {"grad_comm": "nvfp4", "keep_first_blocks": 0, "keep_last_blocks": 0}
HF_ARGS = ["--use_cpu", "--max_steps", "20", "--per_device_train_batch_size", "8", "--learning_rate", "3e-3",
           "--logging_steps", "5", "--report_to", "none", "--seed", "1"]


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    out.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    return out


def launch(cmd: list[str], out: Path, extra_env: dict[str, str] | None = None) -> dict:
    """Run ``cmd`` from ``out``; its result.json, or a failure with the output's tail."""
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, cwd=out, env={**env(), **(extra_env or {})}, capture_output=True, text=True,
                          timeout=600)
    (out / "output.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not (out / "result.json").exists():
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-5000:]}")
    return {**json.loads((out / "result.json").read_text()), "output": proc.stdout + proc.stderr}


def deepspeed_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
            *args]


def write_json(path: Path, value: dict) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))
    return str(path)


def eligible(section: dict, prefix: str = "") -> set[str]:
    """The Linear layers ds_fp4 converts in the tiny Llama under ``section``'s recipe."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ds_fp4 import NVFP4Config, convert_to_nvfp4

    report = convert_to_nvfp4(LlamaForCausalLM(LlamaConfig(**TINY)), NVFP4Config.from_dict(section).recipe)
    return {prefix + name for name in report.converted}


def nvfp4_layers(result: dict) -> set[str]:
    return {name for name, cls in result["linears"].items() if cls == "NVFP4Linear"}


# HF Trainer ------------------------------------------------------------------------------------------
HF_ZERO2 = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto", "gradient_clipping": "auto", "zero_optimization": {"stage": 2},
            "nvfp4": NVFP4}  # no optimizer section: the Trainer's AdamW, built before deepspeed.initialize
HF_ZERO3 = {**HF_ZERO2, "zero_optimization": {"stage": 3},
            "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "torch_adam": True}},
            "nvfp4": {**NVFP4, "weight_comm": "nvfp4"}}


def hf_run(tmp: Path, config: dict, *extra: str, resume: str | None = None) -> dict:
    cfg = write_json(tmp / "ds.json", config)
    cmd = deepspeed_cmd("--module", "ds_fp4.run", str(HERE / "hf_trainer_script.py"), "--deepspeed", cfg,
                        "--output_dir", str(tmp / "out"), *HF_ARGS, *extra)
    result = launch(cmd, tmp / "out", {"RESUME_FROM": resume} if resume else None)
    result["losses"] = {h["step"]: h["loss"] for h in result["log_history"] if "loss" in h}
    result["dir"] = tmp / "out"
    return result


@pytest.fixture(scope="module")
def hf_zero2(tmp_path_factory):
    pytest.importorskip("accelerate", reason="HF Trainer needs accelerate: EXTRAS=dev make setup installs it")
    return hf_run(tmp_path_factory.mktemp("hf2"), HF_ZERO2, "--save_strategy", "steps", "--save_steps", "10")


@pytest.fixture(scope="module")
def hf_zero3(tmp_path_factory):
    pytest.importorskip("accelerate", reason="HF Trainer needs accelerate: EXTRAS=dev make setup installs it")
    return hf_run(tmp_path_factory.mktemp("hf3"), HF_ZERO3, "--save_strategy", "no")


@pytest.mark.slow
@pytest.mark.parametrize("run", ["hf_zero2", "hf_zero3"])
def test_hf_trainer_trains_in_nvfp4_from_a_script_that_never_imports_ds_fp4(run, request):
    result = request.getfixturevalue(run)
    losses = result["losses"]
    assert losses[20] < losses[5] - 0.2, losses
    assert nvfp4_layers(result) == eligible(NVFP4) and len(nvfp4_layers(result)) == 28
    history = [h for h in result["log_history"] if "loss" in h]
    assert all(h["nvfp4/grad_ratio_vs_bf16"] <= 0.30 for h in history), history
    # the Trainer's own log lines carry the callback's scalars too (it runs before the reporting callbacks)
    assert all(h["nvfp4/grad_sqnr_db_min"] > 5 and 0 <= h["nvfp4/input_underflow_max"] < 0.5 for h in history)
    assert "'nvfp4/grad_ratio_vs_bf16'" in result["output"]
    assert result["output"].count("ds_fp4: NVFP4 conversion: 28/29 linear layers") == 1  # rank 0, once
    if run == "hf_zero3":
        assert all(h["nvfp4/weight_ratio_vs_bf16"] <= 0.30 for h in history if "nvfp4/weight_ratio_vs_bf16" in h)
        assert "ZeRO-3 weight all-gathers nvfp4 (ZeRO stage 3, 2 ranks)" in result["output"]


@pytest.mark.slow
def test_hf_trainer_resume_repeats_the_uninterrupted_run_bit_for_bit(hf_zero2, tmp_path):
    """The resumed run draws the same rounding noise: torch's generator (restored by the Trainer) for the
    layers, and the communication's seed counter (carried in the DeepSpeed checkpoint by ds_fp4)."""
    checkpoint = hf_zero2["dir"] / "checkpoint-10"
    resumed = hf_run(tmp_path, HF_ZERO2, "--save_strategy", "no", resume=str(checkpoint))
    assert {s: resumed["losses"][s] for s in (15, 20)} == {s: hf_zero2["losses"][s] for s in (15, 20)}


# Accelerate ------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_accelerate_launch_trains_in_nvfp4_with_the_optimizer_it_was_given(stage, tmp_path):
    pytest.importorskip("accelerate", reason="install the test extra: EXTRAS=dev make setup")
    section = {**NVFP4, **({"weight_comm": "nvfp4"} if stage == 3 else {})}
    cfg = write_json(tmp_path / "ds.json", {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1,
                                            "gradient_clipping": 1.0, "zero_optimization": {"stage": stage},
                                            "nvfp4": section})
    yaml = tmp_path / "accelerate.yaml"
    yaml.write_text(f"compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\ndeepspeed_config:\n"
                    f"  deepspeed_config_file: {cfg}\nnum_machines: 1\nnum_processes: 2\n")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(yaml), "--main_process_port",
           str(free_port()), "-m", "ds_fp4.run", str(HERE / "accelerate_script.py"), str(tmp_path / "out"), "20"]
    result = launch(cmd, tmp_path / "out")
    assert result["world"] == 2
    assert result["same_parameters"]  # conversion kept the Parameter objects the optimizer holds
    assert sum(result["losses"][-4:]) / 4 < sum(result["losses"][:4]) / 4 - 0.2, result["losses"]
    assert nvfp4_layers(result) == eligible(section)
    comm = result["comm"]
    assert 0 < comm["grad_bytes_sent"] <= 0.30 * comm["grad_bytes_bf16"]


# Plain DeepSpeed, GPT-NeoX style ---------------------------------------------------------------------
PLAIN = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 2},
         "optimizer": {"type": "AdamW", "params": {"lr": 0.003, "torch_adam": True}}}


def plain_run(tmp: Path, config: dict, launcher: str) -> dict:
    """The script under DeepSpeed's launcher ("deepspeed"), under it through ds_fp4.run ("deepspeed --module
    ds_fp4.run"), or under torchrun through ds_fp4.run ("torchrun -m ds_fp4.run")."""
    cfg = write_json(tmp / "ds.json", config)
    script = [str(HERE / "plain_deepspeed_script.py"), "--deepspeed_config", cfg, "--out", str(tmp / "out")]
    cmd = {"deepspeed": deepspeed_cmd(*script),
           "deepspeed --module ds_fp4.run": deepspeed_cmd("--module", "ds_fp4.run", *script),
           "torchrun -m ds_fp4.run": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                      "--master_port", str(free_port()), "-m", "ds_fp4.run", *script]}[launcher]
    return launch(cmd, tmp / "out")


@pytest.mark.slow
def test_a_config_without_nvfp4_trains_bit_identically_to_plain_deepspeed(tmp_path):
    plain = plain_run(tmp_path / "plain", PLAIN, "deepspeed")
    patched = plain_run(tmp_path / "patched", PLAIN, "deepspeed --module ds_fp4.run")
    assert patched["losses"] == plain["losses"]
    assert patched["params_sha256"] == plain["params_sha256"]
    assert nvfp4_layers(patched) == set() and "ds_fp4: NVFP4" not in patched["output"]


@pytest.mark.slow
def test_args_deepspeed_config_with_nvfp4_converts_and_ranks_draw_different_rounding_noise(tmp_path):
    section = {"grad_comm": "nvfp4"}  # the default recipe: it keeps its first and last blocks in BF16
    result = plain_run(tmp_path, {**PLAIN, "nvfp4": section}, "torchrun -m ds_fp4.run")
    assert nvfp4_layers(result) == eligible(section) and len(nvfp4_layers(result)) == 14
    assert result["losses"][-1] < result["losses"][0] - 0.2
    assert 0 < result["comm"]["grad_bytes_sent"] <= 0.30 * result["comm"]["grad_bytes_bf16"]
    codes = result["sr_codes"]
    assert len(codes) == 2 and codes[0] != codes[1], "both ranks drew the same stochastic-rounding bits"


# Lightning -------------------------------------------------------------------------------------------
def lightning(tmp: Path, mode: str, ranks: int) -> dict:
    pytest.importorskip("lightning", reason="install the test extra: EXTRAS=dev make setup")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
           str(free_port()), str(HERE / "lightning_script.py"), str(tmp), mode]
    return launch(cmd, tmp)


@pytest.mark.slow
def test_lightning_deepspeed_strategy_sets_up_an_nvfp4_engine_after_the_one_line_patch(tmp_path):
    """What runs without a GPU: the strategy's own model-and-optimizer setup, then training steps."""
    result = lightning(tmp_path, "setup", ranks=2)
    assert nvfp4_layers(result) == eligible(NVFP4, prefix="model.")
    losses = result["losses"]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.2, losses
    assert 0 < result["comm"]["grad_bytes_sent"] <= 0.30 * result["comm"]["grad_bytes_bf16"]


@pytest.mark.slow
def test_lightning_trainer_fit(tmp_path):
    """Lightning's DeepSpeedStrategy refuses any accelerator but CUDA: on CPU this records the refusal and
    skips with it; on a GPU it trains (bench/gpu_acceptance runs it there)."""
    result = lightning(tmp_path, "fit", ranks=1 if not torch.cuda.is_available() else torch.cuda.device_count())
    if "error" in result:
        assert not torch.cuda.is_available(), result["error"]
        assert "only supported on CUDA GPUs" in result["error"]
        pytest.skip(f"Lightning says: {result['error']}")
    assert nvfp4_layers(result) == eligible(NVFP4, prefix="model.")
    assert sum(result["losses"][-4:]) / 4 < sum(result["losses"][:4]) / 4 - 0.2

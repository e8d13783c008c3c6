"""Inside deepspeed.zero.Init: models import and build, and ds_fp4 computes exactly what it computes outside.

The worker (zero_init_worker.py) runs in its own process, because zero.Init patches torch globally and
because the failures it guards against happen only on the first import of a module or the first use of
a cache in a process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch.distributed import free_port

WORKER = Path(__file__).with_name("zero_init_worker.py")


@pytest.fixture(scope="module")
def worker(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zero_init")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port()), "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(WORKER), str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"zero_init_worker failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return out


def test_a_model_module_first_imported_inside_zero_init_builds(worker):
    report = json.loads((worker / "imports.json").read_text())
    assert report["built"] == "LlamaForCausalLM"


def test_the_trainers_zero3_build_ties_embeddings_and_runs_the_models_own_init(worker):
    """Under zero.Init Hugging Face's init would write into partitioned placeholders: torch.empty weights
    (fused experts) kept garbage, and Linear kept PyTorch's default. launch.config initialises each module on
    gathered parameters instead, and leaves the weight tying to Hugging Face."""
    builds = json.loads((worker / "imports.json").read_text())["trainer_builds"]
    assert builds["llama_tied"]["tied"] is True
    assert builds["qwen3_moe"]["tied"] is False
    for name, build in builds.items():
        for pname, std in build["std"].items():
            if pname.endswith("norm.weight"):
                continue
            assert 0.015 < std < 0.025, (name, pname, std)  # initializer_range 0.02, bf16 storage
    assert any(".experts.gate_up_proj" in p for p in builds["qwen3_moe"]["std"])


def test_every_causal_lm_class_of_transformers_imports_inside_zero_init(worker):
    report = json.loads((worker / "imports.json").read_text())
    assert report["classes"] > 100
    assert report["failures"] == {}, "\n".join(f"{k}: {v}" for k, v in report["failures"].items())


@pytest.mark.skipif(torch.cuda.is_available(), reason="compares with the CPU interpreter run of this process")
def test_ds_fp4_computes_the_same_bits_inside_zero_init(worker):
    spec = importlib.util.spec_from_file_location("zero_init_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fixed = module.inputs()
    outside = module.battery(fixed, module.nvfp4_layer(fixed["w"]))
    inside = torch.load(worker / "battery.pt")
    assert sorted(inside) == sorted(outside)
    wrong = []
    for name in sorted(outside):
        a, b = inside[name], outside[name]
        if a.dtype != b.dtype or a.shape != b.shape:
            wrong.append(f"{name}: {a.dtype} {tuple(a.shape)} inside vs {b.dtype} {tuple(b.shape)} outside")
        elif not torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)):
            wrong.append(f"{name}: different bits")
    assert not wrong, "\n".join(wrong)

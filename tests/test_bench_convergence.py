"""bench/convergence.py plans its runs for both presets without starting any (the GPU one included,
which no CI machine can run)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def conv():
    spec = importlib.util.spec_from_file_location("convergence_bench", REPO / "bench" / "convergence.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_preset_plans_one_run_per_variant_from_a_token_budget(conv, tmp_path, monkeypatch):
    monkeypatch.setitem(conv.PRESETS["gpu"], "root", str(tmp_path))  # no finished runs there
    variants = conv.run_names(list(conv.VARIANTS), [0, 1])
    todo, ranks = conv.plan(conv.PRESETS["gpu"], variants, [], gpus=8)
    assert todo == variants and set(ranks.values()) == {8}
    todo, _ = conv.plan(conv.PRESETS["gpu"], variants, [], gpus=1)
    assert not any(v.startswith("nvfp4_comm") for v in todo)  # nothing to communicate on one GPU
    # The GPU config trains for a token budget (max_tokens); the plan turns it into steps.
    assert conv.parse_run_config(REPO / conv.PRESETS["gpu"]["config"]).total_steps() > 100


def test_finished_runs_are_not_started_again(conv, tmp_path, monkeypatch):
    monkeypatch.setitem(conv.PRESETS["cpu"], "root", str(tmp_path))
    steps = conv.parse_run_config(REPO / conv.PRESETS["cpu"]["config"]).total_steps()
    (tmp_path / "bf16").mkdir()
    rows = "".join(f'{{"step": {s}, "loss": 1.0}}\n' for s in range(1, steps + 1))
    (tmp_path / "bf16" / "steps.jsonl").write_text(rows)
    (tmp_path / "nvfp4").mkdir()
    (tmp_path / "nvfp4" / "steps.jsonl").write_text('{"step": 1, "loss": 1.0}\n')  # unfinished: runs again
    todo, ranks = conv.plan(conv.PRESETS["cpu"], ["bf16", "nvfp4", "nvfp4_comm"], [], gpus=None)
    assert todo == ["nvfp4", "nvfp4_comm"]
    assert ranks == {"bf16": 1, "nvfp4": 1, "nvfp4_comm": 2}


def test_deterministic_variants_get_no_seed_repeats(conv):
    assert conv.run_names(["bf16", "no_sr", "nvfp4"], [0, 1]) == ["bf16", "no_sr", "nvfp4", "nvfp4@seed1"]

"""Golden loss curve: a fixed-seed NVFP4 run must reproduce its stored per-step losses exactly, on any CPU.

Any change to the numerics (quantization, rounding, the RNG streams, the recipe's dispatch, the
collectives) or to the data order shows up here. If a change is intended, regenerate the golden file
with `python -m pytest tests/launch/test_golden.py --update-golden` and say why in the commit.

Exact equality holds across machines because the ranks run with launch.cpu_numerics.PORTABLE_CPU_ENV:
ATen, MKL and oneDNN capped at an instruction set every x86-64 CPU has, one thread per rank. Unpinned,
the same run differs from step 1 between CPU kinds, and stochastic rounding turns that into a 1.6% loss
difference by step 12 (docs/trainer.md has the measured spread). The corpus is committed
(tests/golden/corpus.jsonl), so the curve does not depend on the interpreter's standard library either.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_runs import golden_config

from launch.cpu_numerics import PORTABLE_CPU_ENV, cpu_model

from .conftest import run, steps

pytestmark = pytest.mark.slow  # real multi-rank training runs

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
# The outer environments the pinned run must not notice: the machine's defaults, and every library pushed
# to AVX2 (on an AVX-512 machine that changes all three; the pins decide either way).
OUTER = {"machine-defaults": {},
         "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}


def golden_run(tmp_path: Path) -> list[float]:
    from data_pipeline import prepare

    data = tmp_path / "data"
    prepare([str(GOLDEN / "corpus.jsonl")], data, vocab_size=512, workers=0, progress=False)
    cfg = golden_config(tmp_path / "cfg.json", data)
    run(cfg, 2, env=PORTABLE_CPU_ENV)  # over the outer environment, which the test has set
    return [steps(tmp_path / "run")[s]["loss"] for s in range(1, 13)]


@pytest.mark.parametrize("outer", OUTER)
def test_nvfp4_loss_curve_matches_the_golden_curve_exactly(tmp_path, request, monkeypatch, outer):
    for key, value in OUTER[outer].items():
        monkeypatch.setenv(key, value)
    got = golden_run(tmp_path)
    path = GOLDEN / "nvfp4_losses.json"
    if request.config.getoption("--update-golden") and outer == "machine-defaults":
        path.write_text(json.dumps({"steps": list(range(1, 13)), "losses": got, "cpu": cpu_model(),
                                    "env": PORTABLE_CPU_ENV}, indent=1) + "\n")
    golden = json.loads(path.read_text())
    diffs = [f"step {i + 1}: {g!r} vs golden {e!r}"
             for i, (g, e) in enumerate(zip(got, golden["losses"], strict=True)) if g != e]
    assert got == golden["losses"], (f"golden made on {golden['cpu']}, this is {cpu_model()}, both with "
                                     f"{golden['env']}:\n" + "\n".join(diffs))
    assert got[-1] < got[0]

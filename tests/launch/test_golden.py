"""Golden loss curve: a fixed-seed NVFP4 run must reproduce its stored per-step losses exactly.

Any change to the numerics (quantization, rounding, the RNG streams, the recipe's dispatch, the
collectives) or to the data order shows up here. If a change is intended, regenerate the golden file
with `python -m pytest tests/launch/test_golden.py --update-golden` and say why in the commit.
The corpus is committed (tests/golden/corpus.jsonl), so the curve does not depend on the interpreter's
standard library; the run uses one thread per rank, so it does not depend on the core count either.
"""

from __future__ import annotations

import json
from pathlib import Path

from .conftest import run, steps, write_config

GOLDEN = Path(__file__).resolve().parents[1] / "golden"


def test_nvfp4_loss_curve_matches_the_golden_curve_exactly(tmp_path, request):
    from data_pipeline import prepare

    data = tmp_path / "data"
    prepare([str(GOLDEN / "corpus.jsonl")], data, vocab_size=512, workers=0, progress=False)
    cfg = write_config(tmp_path / "cfg.json", data,
                       nvfp4={"preset": "paper", "keep_first_blocks": 1, "keep_last_blocks": 1,
                              "grad_comm": "nvfp4", "stats_interval": 0},
                       trainer={"max_steps": 12, "save_interval": 0, "warmup_steps": 2})
    run(cfg, 2)
    got = [steps(tmp_path / "run")[s]["loss"] for s in range(1, 13)]
    path = GOLDEN / "nvfp4_losses.json"
    if request.config.getoption("--update-golden"):
        path.write_text(json.dumps({"steps": list(range(1, 13)), "losses": got}, indent=1) + "\n")
    golden = json.loads(path.read_text())["losses"]
    diffs = [f"step {i + 1}: {g!r} vs golden {e!r}" for i, (g, e) in enumerate(zip(got, golden, strict=True)) if g != e]
    assert got == golden, "\n".join(diffs)
    assert got[-1] < got[0]

"""The "Train on your own data" path as the README and docs/trainer.md show it: their `data` blocks parse,
and bench/walkthrough.py (which runs that path end to end, timed) builds the config the docs describe."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from launch.config import parse_run_config

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", REPO / "docs" / "trainer.md"]


def data_blocks(path: Path) -> list[dict]:
    """Every ```json block of the file that is a `"data": {...}` fragment, as a dict."""
    blocks = re.findall(r"```json\n(.*?)```", path.read_text(), flags=re.S)
    return [json.loads("{" + b + "}")["data"] for b in blocks if b.lstrip().startswith('"data"')]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_the_documented_data_blocks_are_valid_run_config(doc, tmp_path):
    blocks = data_blocks(doc)
    assert blocks, f"{doc.name} lost its data block"
    for data in blocks:
        raw = json.loads((REPO / "configs" / "demo-cpu.json").read_text())
        raw["data"] = data  # as the docs say: replace the demo's data block
        path = tmp_path / "my-run.json"
        path.write_text(json.dumps(raw))
        cfg = parse_run_config(path)
        assert cfg.embedded is None and cfg.data.sources[0].path == data["sources"][0]["path"]


def test_the_walkthrough_builds_the_documented_config_and_checks_its_arguments(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import walkthrough
    finally:
        sys.path.remove(str(REPO / "bench"))
    args = type("Args", (), {"steps": 40, "save_interval": 10})()
    raw = walkthrough.run_config(tmp_path / "data", tmp_path / "run", args)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(raw))
    cfg = parse_run_config(path)
    assert cfg.trainer.max_steps == 40 and cfg.trainer.eval_interval == 10 and cfg.embedded is None
    assert [s.path for s in cfg.data.sources] == [str(tmp_path / "data")]
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "walkthrough.py"), "--kill-at", "5"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--kill-at 5 must lie in [--save-interval 10, --steps 40)" in proc.stderr

"""Parsing the run JSON: every section validated once, unknown keys named with the valid ones listed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from launch.config import parse_run_config

from .conftest import DEMO, REPO, child_env


def demo(**changes):
    cfg = json.loads(DEMO.read_text())
    for dotted, value in changes.items():
        node = cfg
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        if value is KeyError:
            del node[leaf]
        else:
            node[leaf] = value
    return cfg


def test_the_demo_configs_parse():
    for name in ("demo-cpu.json", "demo-cpu-bf16.json"):
        cfg = parse_run_config(REPO / "configs" / name)
        assert cfg.global_batch == 16 and cfg.micro_batch == 8
        assert cfg.embedded is not None and cfg.data.sources[0].path == cfg.embedded.out_dir
        assert "nvfp4" not in cfg.deepspeed and "trainer" not in cfg.deepspeed
    assert parse_run_config(REPO / "configs" / "demo-cpu-bf16.json").nvfp4_config.recipe.enabled is False


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(trainer__max_step=10),
         r"unknown key\(s\) \['max_step'\] in the \"trainer\" config section; valid keys: .*max_steps"),
        (dict(model__cfg={}), r"unknown key\(s\) \['cfg'\] in the \"model\" .*init_seed"),
        (dict(data__seqlen=5), r"unknown key\(s\) \['seqlen'\] in the \"data\" .*seq_len"),
        (dict(nvfp4__grad_com="nvfp4"), r"unknown key\(s\) \['grad_com'\] in the \"nvfp4\" .*grad_comm"),
        (dict(data__embedded__vocab=3), r"unknown key\(s\) \['vocab'\] in the \"data.embedded\""),
        (dict(trainer__max_tokens=1000), "exactly one of max_steps / max_tokens"),
        (dict(trainer__decay_shape="exp"), r"decay_shape must be one of \('linear', 'cosine', 'sqrt'\); got 'exp'"),
        (dict(trainer__bf16_tail_fraction=1.5), r"bf16_tail_fraction must be a number in \[0, 1\]; got 1.5"),
        (dict(trainer__keep_checkpoints=0), "keep_checkpoints must be an integer >= 1; got 0"),
        (dict(gradient_accumulation_steps=2), "remove gradient_accumulation_steps"),
        (dict(train_micro_batch_size_per_gpu=KeyError), "needs an integer train_micro_batch_size_per_gpu"),
        (dict(model__config={"hidden_size": 64}), "\"model_type\""),
        (dict(model__config="no/such/dir"), "is not a config.json or a directory holding one"),
        (dict(data__seq_len=0), r"DataConfig.seq_len = 0"),
    ],
)
def test_bad_configs_name_the_key_and_the_fix(changes, match):
    with pytest.raises(ValueError, match=match):
        parse_run_config(demo(**changes))


def test_overrides_are_json_values_and_validated():
    cfg = parse_run_config(DEMO, ["trainer.max_steps=7", "nvfp4.preset=no_sr", "trainer.out_dir=runs/x"])
    assert cfg.trainer.max_steps == 7 and cfg.trainer.out_dir == "runs/x"
    assert cfg.nvfp4_config.recipe.grad.rounding == "nearest"
    with pytest.raises(ValueError, match="unknown key"):
        parse_run_config(DEMO, ["trainer.maxsteps=7"])
    with pytest.raises(ValueError, match="must look like section.key=value"):
        parse_run_config(DEMO, ["trainer.max_steps"])


def test_train_py_rejects_a_bad_config_before_starting_any_rank(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(demo(trainer__max_step=3)))
    proc = subprocess.run([sys.executable, "launch/train.py", "--deepspeed_config", str(path)], cwd=REPO,
                          env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "unknown key(s) ['max_step'] in the \"trainer\" config section" in proc.stderr
    assert "init_distributed" not in proc.stderr  # failed while parsing, before the process group

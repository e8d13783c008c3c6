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
    assert parse_run_config(REPO / "configs" / "demo-cpu-bf16.json").nvfp4.recipe.enabled is False


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(trainer__max_step=10),
         r"unknown key\(s\) \['max_step'\] in the \"trainer\" config section; valid keys: .*max_steps"),
        (dict(model__cfg={}), r"unknown key\(s\) \['cfg'\] in the \"model\" .*init_seed"),
        (dict(data__seqlen=5), r"unknown key\(s\) \['seqlen'\] in the \"data\" .*seq_len"),
        (dict(nvfp4__grad_com="nvfp4"), r"unknown key\(s\) \['grad_com'\] in the \"nvfp4\" .*grad_comm"),
        (dict(nvfp4__grad={"round": "nearest"}),
         r"unknown key\(s\) \['round'\] in the \"nvfp4.grad\" config section; valid keys: \['hadamard', 'rounding'"),
        (dict(data__embedded__vocab=3), r"unknown key\(s\) \['vocab'\] in the \"data.embedded\" .*vocab_size"),
        (dict(data__sources=[{"path": "x", "wieght": 2}]),
         r"unknown key\(s\) \['wieght'\] in the \"data.sources\[0\]\" config section; "
         r"valid keys: \['path', 'weight'\]"),
        (dict(trainer__max_tokens=1000), r"trainer: give exactly one of max_steps / max_tokens; got 200 / 1000"),
        (dict(trainer__decay_shape="exp"), r"trainer.decay_shape must be 'linear', 'cosine' or 'sqrt'; got 'exp'"),
        (dict(trainer__bf16_tail_fraction=1.5), r"trainer.bf16_tail_fraction must be less than or equal to 1; got 1.5"),
        (dict(trainer__keep_checkpoints=0), "trainer.keep_checkpoints must be greater than or equal to 1; got 0"),
        (dict(trainer__max_steps=True), "trainer.max_steps must be a valid integer; got True"),
        (dict(trainer__progress="yes"), "trainer.progress must be a valid boolean; got 'yes'"),
        (dict(trainer__peak_tflops=0), "trainer.peak_tflops must be greater than 0; got 0"),
        (dict(nvfp4__keep_last_blocks=-1), "nvfp4.keep_last_blocks must be greater than or equal to 0; got -1"),
        (dict(data__embedded__eval_fraction=1), "data.embedded.eval_fraction must be less than 1; got 1"),
        (dict(gradient_accumulation_steps=2), "remove gradient_accumulation_steps"),
        (dict(train_micro_batch_size_per_gpu=KeyError), "needs an integer train_micro_batch_size_per_gpu"),
        (dict(model__config={"hidden_size": 64}), r"model.config: give a path or an inline config with \"model_type\""),
        (dict(model__config="no/such/dir"),
         "model.config: 'no/such/dir' is not a config.json or a directory holding one"),
        (dict(data__seq_len=0), r"data.seq_len must be greater than or equal to 1; got 0"),
        (dict(data__sources=[{"path": "x", "weight": -1}]), r"data.sources\[0\].weight must be greater than 0; got -1"),
        (dict(trainer=[1]), r"the \"trainer\" config section must be an object; got \[1\]"),
        (dict(nvfp4=3), r"the \"nvfp4\" config section must be an object; got 3"),
    ],
)
def test_bad_configs_name_the_key_and_the_fix(changes, match):
    with pytest.raises(ValueError, match=match):
        parse_run_config(demo(**changes))


def test_overrides_are_json_values_and_validated():
    cfg = parse_run_config(DEMO, ["trainer.max_steps=7", "nvfp4.preset=no_sr", "trainer.out_dir=runs/x"])
    assert cfg.trainer.max_steps == 7 and cfg.trainer.out_dir == "runs/x"
    assert cfg.nvfp4.recipe.grad.rounding == "nearest"
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


def test_deepspeed_gets_its_own_keys_and_ignores_the_run_sections():
    """RunConfig.deepspeed is DeepSpeed's part alone; and a user's JSON that still holds a trainer's sections
    works with ds_fp4.initialize too, because DeepSpeed 0.19 ignores top-level keys it does not know."""
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = parse_run_config(DEMO)
    assert sorted(set(json.loads(DEMO.read_text())) - set(cfg.deepspeed)) == ["data", "model", "nvfp4", "trainer"]
    alone, with_sections = DeepSpeedConfig(cfg.deepspeed), DeepSpeedConfig(json.loads(DEMO.read_text()))
    settings = [name for name in vars(alone) if name != "_param_dict"]
    assert len(settings) > 50 and "train_batch_size" in settings and "zero_optimization_stage" in settings
    for name in settings:  # every parsed setting equal; a sub-config object compared by its fields
        a, b = getattr(alone, name), getattr(with_sections, name)
        assert (vars(a) if hasattr(a, "__dict__") else a) == (vars(b) if hasattr(b, "__dict__") else b), name


def test_initialize_takes_the_parsed_section_or_the_json_one_not_both():
    import dataclasses

    import torch

    import ds_fp4

    cfg = parse_run_config(DEMO)
    model = torch.nn.Linear(16, 16)
    with pytest.raises(ValueError, match="the NVFP4 settings were given twice"):
        ds_fp4.initialize(model=model, config={**cfg.deepspeed, "nvfp4": {}}, nvfp4=cfg.nvfp4)
    with pytest.raises(TypeError, match=r"nvfp4= takes an NVFP4Config .*got dict"):
        ds_fp4.initialize(model=model, config=cfg.deepspeed, nvfp4=cfg.raw["nvfp4"])
    # The object is checked against DeepSpeed's keys exactly as a JSON section is (the demo runs ZeRO-1).
    with pytest.raises(ValueError, match="weight_comm=\"nvfp4\" compresses ZeRO-3 .*stage is 1"):
        ds_fp4.initialize(model=model, config=cfg.deepspeed, nvfp4=dataclasses.replace(cfg.nvfp4, weight_comm="nvfp4"))
    assert isinstance(model, torch.nn.Linear)  # nothing was converted before the errors

"""The resume check's rules on their own (launch/resume.py); tests/launch/test_trainer.py runs them in a real
resume. Which changes are refused, how a whole section is allowed, and what the messages name."""

from __future__ import annotations

import pytest

from launch.config import ConfigError
from launch.resume import check_resume_config, config_changes, flatten

OLD = {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 8,
       "optimizer": {"type": "AdamW", "params": {"lr": 0.003, "betas": [0.9, 0.95]}},
       "nvfp4": {"preset": "paper", "stats_interval": 25},
       "data": {"sources": ["a"], "seq_len": 64},
       "trainer": {"max_steps": 8, "log_interval": 1, "out_dir": "runs/a"}}


def changed(**edits) -> dict:
    """OLD with "section.key" (dotted) set to a value, or removed when the value is ...."""
    new = flatten(OLD)
    for key, value in edits.items():
        key = key.replace("__", ".")
        if value is ...:
            del new[key]
        else:
            new[key] = value
    nested: dict = {}
    for key, value in new.items():
        *parents, leaf = key.split(".")
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


def test_flatten_keeps_lists_whole_and_changes_name_old_and_new():
    assert flatten(OLD)["optimizer.params.betas"] == [0.9, 0.95]
    assert config_changes(OLD, changed(data__sources=["a", "b"], data__seed=7, trainer__max_steps=...)) == [
        ("data.seed", "(unset) -> 7"), ("data.sources", '["a"] -> ["a", "b"]'), ("trainer.max_steps", "8 -> (unset)")]
    assert config_changes(OLD, OLD) == []


@pytest.mark.parametrize("key, value", [("data__seq_len", 32), ("data__sources", ["b"]), ("train_batch_size", 32),
                                        ("optimizer__params__lr", 0.001), ("nvfp4__preset", "no_sr"),
                                        ("trainer__max_steps", 9), ("trainer__warmup_steps", 2),
                                        ("gradient_clipping", 1.0)])
def test_a_change_of_what_the_run_computes_is_refused_unless_allowed(key, value):
    dotted = key.replace("__", ".")
    with pytest.raises(ConfigError, match=rf"(?s)the config changed since the checkpoint ckpt/step_4.*  {dotted}: "
                                         rf".* -> .*--set 'trainer.allow_config_change=\[\"{dotted}\"\]'"):
        check_resume_config(OLD, changed(**{key: value}), (), "ckpt/step_4")
    [(name, change)] = config_changes(OLD, changed(**{key: value}))
    section = dotted.split(".")[0]  # a whole section allows its keys
    assert check_resume_config(OLD, changed(**{key: value}), (section,), "ckpt/step_4") == [
        f"resume: config changes accepted by trainer.allow_config_change (the run continues differently): "
        f"{name}: {change}"]


def test_observation_changes_pass_and_are_said_once_and_an_old_checkpoint_is_not_compared():
    new = changed(trainer__log_interval=5, trainer__out_dir="runs/b", nvfp4__stats_interval=0,
                  train_micro_batch_size_per_gpu=4, tensorboard={"enabled": False})
    assert check_resume_config(OLD, new, (), "c") == [
        "resume: config changes since the checkpoint that leave the run as it was: nvfp4.stats_interval: 25 -> 0; "
        "tensorboard.enabled: (unset) -> false; train_micro_batch_size_per_gpu: 8 -> 4; "
        'trainer.log_interval: 1 -> 5; trainer.out_dir: "runs/a" -> "runs/b"']
    assert check_resume_config(OLD, OLD, (), "c") == []
    assert check_resume_config(None, OLD, (), "c") == [
        "resume: c holds no run config (written before configs were stored): not compared"]
    with pytest.raises(ConfigError, match=r"(?s)  data.seq_len: 64 -> 32\n  trainer.max_steps: 8 -> 9\n.*"
                                         r"\[\"data.seq_len\", \"trainer.max_steps\"\]"):
        check_resume_config(OLD, changed(data__seq_len=32, trainer__max_steps=9, trainer__log_interval=2), (), "c")

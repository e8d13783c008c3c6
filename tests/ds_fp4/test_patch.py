"""ds_fp4.patch_deepspeed, python -m ds_fp4.run and the per-rank seeds, in this process (the real frameworks
run in tests/integrations/test_frameworks.py)."""

from __future__ import annotations

import argparse
import base64
import json
import subprocess
import sys
import textwrap

import pytest
import torch

import ds_fp4
from ds_fp4 import engine as ds_engine
from ds_fp4 import integrations, rng
from ds_fp4.deepspeed_patches import initialize_hook
from ds_fp4.run import split_argv


@pytest.fixture
def recorded(monkeypatch):
    """deepspeed.initialize replaced by a recorder before patching; the patch removed afterwards."""
    import deepspeed

    ds_fp4.unpatch_deepspeed()
    calls = {"deepspeed": [], "ds_fp4": []}

    def fake_deepspeed(args=None, model=None, optimizer=None, model_parameters=None, training_data=None,
                       lr_scheduler=None, distributed_port=29500, mpu=None, dist_init_required=None,
                       collate_fn=None, config=None, mesh_param=None, config_params=None):
        calls["deepspeed"].append(dict(locals()))
        return ("engine", None, None, None)

    def fake_ds_fp4(model=None, **kwargs):
        calls["ds_fp4"].append({"model": model, **kwargs})
        return ("engine", None, None, None)

    monkeypatch.setattr(deepspeed, "initialize", fake_deepspeed)
    monkeypatch.setattr(ds_engine, "initialize", fake_ds_fp4)
    monkeypatch.setattr(integrations, "started", lambda engine: None)
    assert ds_fp4.patch_deepspeed()
    yield calls
    ds_fp4.unpatch_deepspeed()


def test_patch_is_idempotent_and_unpatch_restores_deepspeed():
    import deepspeed

    ds_fp4.unpatch_deepspeed()
    original = deepspeed.initialize
    try:
        assert ds_fp4.patch_deepspeed() is True
        hooked = deepspeed.initialize
        assert hooked is not original and hooked.__wrapped__ is original
        assert ds_fp4.patch_deepspeed() is False and deepspeed.initialize is hooked
        assert initialize_hook.original_initialize() is original
    finally:
        assert ds_fp4.unpatch_deepspeed() is True
    assert deepspeed.initialize is original and ds_fp4.unpatch_deepspeed() is False
    assert initialize_hook.original_initialize() is original


def _config_forms(tmp_path, config: dict) -> dict:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    encoded = base64.urlsafe_b64encode(json.dumps(config).encode()).decode()
    return {
        "config dict": dict(config=config),
        "config path": dict(config=str(path)),
        "config base64": dict(config=encoded),
        "config_params (Accelerate, HF)": dict(config_params=config),
        "args.deepspeed_config": dict(args=argparse.Namespace(deepspeed_config=str(path), local_rank=0)),
    }


def test_without_an_nvfp4_section_deepspeed_gets_the_very_same_call(recorded, tmp_path):
    import deepspeed

    model = torch.nn.Linear(16, 16)
    for form, kwargs in _config_forms(tmp_path, {"train_micro_batch_size_per_gpu": 1}).items():
        recorded["deepspeed"].clear()
        deepspeed.initialize(model=model, model_parameters=model.parameters(), **kwargs)
        assert not recorded["ds_fp4"], form
        (call,) = recorded["deepspeed"]
        assert call["model"] is model, form
        for key, value in kwargs.items():
            assert call[key] is value, form  # the same objects, not copies


def test_an_nvfp4_section_in_any_config_form_goes_to_ds_fp4_initialize(recorded, tmp_path):
    import deepspeed

    model = torch.nn.Linear(16, 16)
    config = {"train_micro_batch_size_per_gpu": 1, "nvfp4": {"grad_comm": "nvfp4"}}
    for form, kwargs in _config_forms(tmp_path, config).items():
        recorded["ds_fp4"].clear()
        deepspeed.initialize(model=model, **kwargs)
        (call,) = recorded["ds_fp4"]
        assert call["model"] is model, form
        assert not recorded["deepspeed"], form
    # Positional arguments, as deepspeed.initialize(args, model, optimizer, ...) takes them (HF's
    # HfDeepSpeedConfig hands its dict over the same way as config_params).
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    recorded["ds_fp4"].clear()
    deepspeed.initialize(None, model, optimizer, config=config)
    (call,) = recorded["ds_fp4"]
    assert call["model"] is model and call["optimizer"] is optimizer and call["config"] is config


def test_an_unreadable_config_is_left_to_deepspeed_to_report_with_a_warning(recorded, caplog):
    import deepspeed

    deepspeed.initialize(model=torch.nn.Linear(16, 16), config="/no/such/ds.json")
    assert len(recorded["deepspeed"]) == 1 and not recorded["ds_fp4"]
    assert "cannot read the DeepSpeed config '/no/such/ds.json'" in caplog.text


def test_configs_deepspeed_accepts_but_json_does_not_still_find_the_section(recorded, tmp_path):
    """DeepSpeed reads files with hjson (comments, trailing commas) and takes dicts with any values."""
    import deepspeed

    path = tmp_path / "ds.hjson"
    path.write_text('{\n  // a comment\n  "train_micro_batch_size_per_gpu": 1,\n'
                    '  "nvfp4": {"grad_comm": "nvfp4"},\n}\n')
    deepspeed.initialize(model=torch.nn.Linear(16, 16), config=str(path))
    deepspeed.initialize(model=torch.nn.Linear(16, 16), config={"nvfp4": {}, "checkpoint_dir": tmp_path})
    assert len(recorded["ds_fp4"]) == 2 and not recorded["deepspeed"]
    assert ds_engine.load_config(str(path))["nvfp4"] == {"grad_comm": "nvfp4"}


def test_args_deepspeed_config_is_restored_and_deepspeed_writes_local_rank_to_the_callers_args(monkeypatch, tmp_path):
    """DeepSpeed sets args.local_rank on the args it is given; with a config in args.deepspeed_config,
    ds_fp4 hands DeepSpeed the caller's own args (the config cleared for the call, then put back)."""
    seen = {}

    class Engine:
        def save_checkpoint(self, save_dir, tag=None, client_state=None):
            return True

        def load_checkpoint(self, load_dir, tag=None):
            return None, None

    def fake_deepspeed(args=None, model=None, config=None, **kwargs):
        seen["deepspeed_config"] = args.deepspeed_config
        seen["config"] = config
        args.local_rank = 5
        return Engine(), None, None, None

    monkeypatch.setattr(ds_fp4.deepspeed_patches, "original_initialize", lambda: fake_deepspeed)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1,
                                "nvfp4": {"selftest": False, "sr_rank_seeds": False}}))
    args = argparse.Namespace(deepspeed_config=str(path), local_rank=-1)
    ds_fp4.initialize(model=torch.nn.Sequential(torch.nn.Linear(32, 32)), args=args)
    assert seen["deepspeed_config"] is None and "nvfp4" not in seen["config"]
    assert args.deepspeed_config == str(path) and args.local_rank == 5


def test_load_config_reads_dicts_paths_and_base64_and_names_what_it_cannot_read(tmp_path):
    config = {"a": 1}
    encoded = base64.urlsafe_b64encode(json.dumps(config).encode()).decode()
    assert ds_engine.load_config(encoded) == config
    with pytest.raises(FileNotFoundError, match="neither an existing file nor base64 JSON"):
        ds_engine.load_config(str(tmp_path / "missing.json"))
    with pytest.raises(TypeError, match="got int"):
        ds_engine.load_config(3)


# python -m ds_fp4.run ---------------------------------------------------------------------------------
def test_split_argv_hands_the_launchers_local_rank_to_the_script():
    assert split_argv(["--local_rank=1", "train.py", "--deepspeed", "ds.json"]) == \
        ("path", "train.py", ["--local_rank=1", "--deepspeed", "ds.json"])
    assert split_argv(["--local_rank", "0", "train.py"]) == ("path", "train.py", ["--local_rank", "0"])
    assert split_argv(["-m", "pkg.train", "x"]) == ("module", "pkg.train", ["x"])
    for bad, message in ((["--verbose", "train.py"], "unknown option '--verbose'"), ([], "usage"),
                         (["-m"], "-m needs a module name")):
        with pytest.raises(SystemExit, match=message):
            split_argv(bad)


def test_run_keeps_runpy_semantics_name_argv_path_and_exit_code(tmp_path):
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent("""
        import json, sys
        import deepspeed
        import helper  # next to the script: its directory is first on sys.path
        print(json.dumps({"name": __name__, "argv": sys.argv, "hooked": hasattr(deepspeed.initialize, "__wrapped__")}))
        if "--crash" in sys.argv:
            raise RuntimeError("boom")
        sys.exit(int(sys.argv[-1]))
    """))
    (tmp_path / "helper.py").write_text("")
    (tmp_path / "user_pkg").mkdir()
    (tmp_path / "user_pkg" / "__init__.py").write_text("")
    (tmp_path / "user_pkg" / "main.py").write_text(script.read_text())
    run = [sys.executable, "-m", "ds_fp4.run"]
    env = {"PATH": "/usr/bin:/bin"}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    # From another directory and without PYTHONPATH: only the script's own directory makes `helper` importable.
    proc = subprocess.run([*run, str(script), "--flag", "3"], capture_output=True, text=True, timeout=300, env=env,
                          cwd=elsewhere)
    assert proc.returncode == 3, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"name": "__main__", "argv": [str(script), "--flag", "3"], "hooked": True}

    proc = subprocess.run([*run, str(script), "--crash", "0"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1 and "RuntimeError: boom" in proc.stderr

    proc = subprocess.run([*run, "-m", "user_pkg.main", "0"], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["name"] == "__main__" and out["argv"][0].endswith("user_pkg/main.py") and out["argv"][1:] == ["0"]

    proc = subprocess.run([*run, str(tmp_path / "missing.py")], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1 and "no such script" in proc.stderr


# Per-rank stochastic-rounding seeds -------------------------------------------------------------------
def _sr_codes(rank: int, seed: int = 0) -> torch.Tensor:
    previous = rng.set_rank_fold(rank)
    try:
        torch.manual_seed(seed)
        return ds_fp4.quantize(torch.linspace(-3, 3, 4096).reshape(16, 256), rounding="stochastic").data
    finally:
        rng.set_rank_fold(previous)


def test_ranks_seeded_alike_draw_different_stochastic_rounding_bits_and_rank_0_is_unchanged():
    torch.manual_seed(0)
    unfolded = ds_fp4.quantize(torch.linspace(-3, 3, 4096).reshape(16, 256), rounding="stochastic").data
    assert torch.equal(_sr_codes(0), unfolded)
    codes = [_sr_codes(r) for r in range(4)]
    for a in range(4):
        for b in range(a + 1, 4):
            assert not torch.equal(codes[a], codes[b]), (a, b)
    assert torch.equal(_sr_codes(3), codes[3])  # the same rank and generator state: the same bits


def test_a_restored_generator_repeats_the_folded_draws():
    rng.set_rank_fold(5)
    try:
        torch.manual_seed(1)
        rng.draw_seed()
        state = torch.random.get_rng_state()  # what a checkpoint holds (HF Trainer saves it per rank)
        first = [rng.draw_seed() for _ in range(8)]
        torch.random.set_rng_state(state)
        assert [rng.draw_seed() for _ in range(8)] == first
        assert all(0 <= s <= rng.MAX_SEED for s in first)
    finally:
        rng.set_rank_fold(0)
    with pytest.raises(ValueError, match="rank must be >= 0"):
        rng.set_rank_fold(-1)
    assert rng.set_rank_fold(0) == 0  # the failed call changed nothing

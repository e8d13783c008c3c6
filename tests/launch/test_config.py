"""Parsing the run JSON: every section validated once, unknown keys named with the valid ones listed;
DeepSpeed's keys checked against DeepSpeed; the rules between sections; a config error printed once."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from launch.config import ConfigError, check_batch, parse_run_config

from .conftest import DEMO, REPO, child_env, free_port, run, write_config

CONFIGS = sorted((REPO / "configs").glob("*.json"))


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
        # DeepSpeed's keys, checked against what DeepSpeed reads (launch/deepspeed_keys.py)
        (dict(gradient_cliping=1.0), r"unknown top-level key 'gradient_cliping': DeepSpeed \S+ does not read it, "
                                     r"and it is not a section of the run \(nvfp4, model, data, trainer\); "
                                     r"did you mean gradient_clipping\?"),
        (dict(trainr={}), r"unknown top-level key 'trainr': .*did you mean trainer\?"),
        (dict(zero_optimization={"stgae": 1}),
         r"unknown key 'stgae' in the \"zero_optimization\" section: DeepSpeed \S+ refuses it; did you mean stage\?"),
        (dict(zero_optimization={"stage": 2, "offload_optimizer": {"devcie": "cpu"}}),
         r"unknown key 'devcie' in the \"zero_optimization.offload_optimizer\" section: .*did you mean device\?"),
        (dict(zero_optimization={"stage": "two"}), r"zero_optimization.stage must be 0, 1, 2, 3 .*; got 'two'"),
        (dict(optimizer={"tpye": "AdamW", "params": {"lr": 0.1}}),
         r"unknown key 'tpye' in the \"optimizer\" section: DeepSpeed \S+ does not read it with this config; "
         r"did you mean type\?\nunknown key 'params' in the \"optimizer\" section"),
        (dict(activation_checkpointing={"partition_activation": True}),
         r"'partition_activation' in the \"activation_checkpointing\" .*did you mean partition_activations\?"),
        (dict(fp16={"enabled": True}), r"DeepSpeed \S+ refuses the config: bfloat16 and fp16 .* simultaneously"),
        (dict(elasticity={}), r"DeepSpeed \S+ refuses the config: Elastic training has been removed"),
        # the rules between sections
        (dict(train_batch_size=20), r"train_batch_size 20 must be divisible by train_micro_batch_size_per_gpu 8 x "
                                    r"the world size; .* multiple of 8 x the number of ranks \(e.g. 16 or 24 on one"),
        (dict(data__seq_len=256), r"data.seq_len 256 is longer than the model's position limit, "
                                  r"model.config.max_position_embeddings = 128; raise "
                                  r"model.config.max_position_embeddings to 256 or more, or lower data.seq_len to "
                                  r"128 or less"),
        (dict(model__config={"model_type": "gpt2", "n_positions": 64}),  # another architecture's name for it
         r"data.seq_len 128 is longer .*, model.config.max_position_embeddings = 64"),
        (dict(model__config={"model_type": "llama"}),  # unset: the architecture's default (2048) counts
         None),
    ],
)
def test_bad_configs_name_the_key_and_the_fix(changes, match):
    if match is None:
        parse_run_config(demo(**changes))
        return
    with pytest.raises(ValueError, match=match):
        parse_run_config(demo(**changes))


def test_the_position_limit_of_a_config_json_path_is_checked(tmp_path):
    model = dict(json.loads(DEMO.read_text())["model"]["config"], max_position_embeddings=32)
    (tmp_path / "config.json").write_text(json.dumps(model))
    parse_run_config(demo(model__config=str(tmp_path), data__seq_len=32))
    with pytest.raises(ValueError, match=rf"data.seq_len 64 is longer than the model's position limit, "
                                         rf"max_position_embeddings in {tmp_path} = 32; raise max_position_embeddings"
                                         rf" in {tmp_path} to 64 or more, or lower data.seq_len to 32 or less"):
        parse_run_config(demo(model__config=str(tmp_path), data__seq_len=64))


@pytest.mark.parametrize("G, B, W, message", [
    (24, 8, 2, "train_batch_size 24 must be divisible by train_micro_batch_size_per_gpu x world size = 8 x 2 = 16; "
               "choose train_batch_size as a multiple of 16 (16 or 32), or a train_micro_batch_size_per_gpu that "
               "divides 24 / 2 = 12, or a number of ranks that divides 24 / 8 = 3 (gradient accumulation steps = "
               "train_batch_size / (train_micro_batch_size_per_gpu x world size))"),
    (16, 8, 3, "train_batch_size 16 must be divisible by train_micro_batch_size_per_gpu x world size = 8 x 3 = 24; "
               "choose train_batch_size as a multiple of 24 (24), or a number of ranks that divides 16 / 8 = 2 ("),
    (12, 4, 2, "= 4 x 2 = 8; choose train_batch_size as a multiple of 8 (8 or 16), or a train_micro_batch_size_per_"
               "gpu that divides 12 / 2 = 6, or a number of ranks that divides 12 / 4 = 3 ("),
])
def test_the_batch_arithmetic_names_g_b_w_and_the_fix(G, B, W, message):
    with pytest.raises(ConfigError) as e:  # a ValueError that train.py prints once, even after the ranks met
        check_batch(G, B, W)
    assert message in str(e.value)
    for g, b, w in [(16, 8, 2), (24, 8, 3), (512, 1, 8), (16, 8, None), (24, 8, None)]:
        check_batch(g, b, w)  # train_batch_size = micro x accumulation x world: nothing to say


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_passes_every_check(path):
    cfg = parse_run_config(path)
    for world in (1, 2):  # the CPU configs' launch, and every GPU config's batch on 1 and 2 ranks
        cfg.check_world_size(world)


def test_the_deepspeed_key_list_comes_from_deepspeed_and_holds_every_known_key():
    """The derivation (launch/deepspeed_keys.py) finds the keys of configs/, a sample of DeepSpeed's documented
    keys at the top level and inside the sections it reads key by key, and the keys the trainer adds."""
    import inspect

    import deepspeed
    from deepspeed.runtime.config import DeepSpeedConfig

    from launch.config import SECTIONS
    from launch.deepspeed_keys import READ_OUTSIDE_THE_PROBE, check_deepspeed_keys, deepspeed_reads, top_level_keys

    top = top_level_keys(deepspeed_reads({"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1}))
    used = {k for p in CONFIGS for k in json.loads(p.read_text())} - set(SECTIONS)
    documented = {
        "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer", "scheduler",
        "fp16", "bf16", "gradient_clipping", "zero_optimization", "steps_per_print", "wall_clock_breakdown",
        "tensorboard", "wandb", "csv_monitor", "comet", "flops_profiler", "activation_checkpointing", "aio",
        "checkpoint", "data_types", "prescale_gradients", "gradient_predivide_factor", "communication_data_type",
        "zero_allow_untested_optimizer", "dump_state", "comms_logger", "compile", "data_efficiency", "autotuning",
        "torch_autocast", "sequence_parallel_size", "data_parallel_size", "hybrid_engine", "pipeline",
        "tensor_parallel", "timers", "memory_breakdown", "dataloader_drop_last", "zero_force_ds_cpu_optimizer",
    }
    assert used <= top and documented <= top, (used | documented) - top
    assert not top & {"elasticity", "amp", "nebula", "gradient_cliping"}  # removed features are not suggested
    # The keys the probe cannot see are still read where READ_OUTSIDE_THE_PROBE says.
    assert '"data_parallel_size"' in inspect.getsource(deepspeed.initialize)
    assert '"sequence_parallel_size"' in inspect.getsource(DeepSpeedConfig.__init__)
    assert set(READ_OUTSIDE_THE_PROBE) == {"data_parallel_size", "sequence_parallel_size"}
    full = {
        "train_batch_size": 16, "train_micro_batch_size_per_gpu": 8, "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}, "legacy_fusion": False},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}},
        "checkpoint": {"tag_validation": "Warn", "load_universal": True, "use_node_local_storage": False,
                       "parallel_write": {"pipeline_stage": False}},
        "data_types": {"grad_accum_dtype": "fp32"},
        "activation_checkpointing": {"partition_activations": False, "cpu_checkpointing": False,
                                     "contiguous_memory_optimization": False, "number_checkpoints": None,
                                     "synchronize_checkpoint_boundary": False, "profile": False},
        "flops_profiler": {"enabled": False, "profile_step": 1, "module_depth": -1, "top_modules": 1,
                           "detailed": True, "output_file": None},
        "aio": {"block_size": 1048576, "queue_depth": 8, "single_submit": False, "overlap_events": True},
        "comms_logger": {"enabled": False, "verbose": False, "prof_all": True, "debug": False},
        "tensorboard": {"enabled": True, "output_path": "runs/x/tensorboard", "job_name": "train"},
        "bf16": {"enabled": True}, "zero_optimization": {"stage": 2, "overlap_comm": True},
        "sequence_parallel_size": 1, "data_parallel_size": 2,
    }
    check_deepspeed_keys(full, SECTIONS)
    assert json.loads(json.dumps(full)) == full  # the probe worked on a copy


def test_the_rank_of_a_process_comes_from_its_launcher_before_the_process_group():
    from launch.distributed import env_rank

    assert env_rank({}) == 0
    assert env_rank({"RANK": "3", "SLURM_PROCID": "0"}) == 3
    assert env_rank({"OMPI_COMM_WORLD_RANK": "2", "SLURM_PROCID": "0"}) == 2  # mpirun inside an allocation
    assert env_rank({"SLURM_PROCID": "5"}) == 5
    assert env_rank({"PMIX_RANK": "1", "SLURM_PROCID": "1"}) == 1


@pytest.mark.slow
@pytest.mark.parametrize("case, sections, message", [
    ("a misspelled DeepSpeed key", {"gradient_cliping": 1.0},
     "unknown top-level key 'gradient_cliping': DeepSpeed"),
    ("batch arithmetic found once the world size is known", {"train_batch_size": 24},
     "train_batch_size 24 must be divisible by train_micro_batch_size_per_gpu x world size = 8 x 2 = 16"),
    ("a seq_len longer than the model's positions", {"data": {"seq_len": 128}},
     "data.seq_len 128 is longer than the model's position limit, model.config.max_position_embeddings = 64"),
    ("a dataset that was never prepared, found once the ranks open it", {"data": {"sources": ["/nonexistent/ds"]}},
     "config error in {cfg}: data / model: no manifest at /nonexistent/ds/manifest.json; run `ds-fp4-data "
     "prepare ... --out /nonexistent/ds` first"),
])
def test_a_config_error_is_printed_once_without_a_traceback_and_every_rank_exits_78(
        corpus, tmp_path, case, sections, message):
    """Two real ranks started as srun starts them: rank 0 alone prints the error; both exit 78."""
    from launch.train import EXIT_CONFIG

    cfg = write_config(tmp_path / "cfg.json", corpus)
    raw = json.loads(cfg.read_text())
    for key, value in sections.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) else value
    cfg.write_text(json.dumps(raw))
    ranks = run(cfg, 2, expect=EXIT_CONFIG, timeout=300)
    out = ranks.output()
    message = message.format(cfg=cfg)
    assert ranks.codes == [78, 78]
    assert out.count(message) == 1 and out.count("config error in ") == 1, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    started = "distributed: " in out  # the batch needs the world size: found after the process group is up
    assert started == ("once" in case), out[-4000:]


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
    assert proc.returncode == 78
    assert "unknown key(s) ['max_step'] in the \"trainer\" config section" in proc.stderr
    assert "Traceback" not in proc.stderr  # a config error, not a bug
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


@pytest.mark.slow
def test_under_the_deepspeed_launcher_a_config_error_is_printed_once_and_the_launcher_exits_78():
    """`make train`'s launcher: it stops the other rank when one exits, and passes the exit code on."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "launch/train.py", "--deepspeed_config", "configs/demo-cpu.json", "--set", "gradient_cliping=1.0"]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 78, out[-4000:]
    assert out.count("unknown top-level key 'gradient_cliping'") == 1 and "Traceback" not in out, out[-4000:]

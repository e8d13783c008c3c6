"""The trainer end to end with real rank processes: logging, checkpoints, kill -9 resume, resize,
elastic restart, preemption, the non-finite guard, export."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import stat
import subprocess
import sys

import pytest
import torch
from tiny_runs import TINY_MODEL

from .conftest import REPO, TRAIN, Ranks, child_env, free_port, run, steps, wait_for, write_config

pytestmark = pytest.mark.slow  # real multi-rank training runs

SCALARS = ["train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu", "train/skipped_steps",
           "comm/grad_bytes_sent", "comm/grad_bytes_saved", "comm/grad_ratio_vs_bf16", "eval/loss"]
HEALTH = ["amax", "underflow", "saturated", "sqnr_db"]


@pytest.fixture(scope="module")
def baseline(corpus, tmp_path_factory):
    """An uninterrupted 2-rank run of 8 steps (checkpoints at 4 and 8): the reference for the resume tests."""
    d = tmp_path_factory.mktemp("baseline")
    cfg = write_config(d / "cfg.json", corpus, nvfp4={"stats_interval": 3},
                       trainer={"eval_interval": 4, "eval_batches": 1})
    umask = os.umask(0o022)  # the usual umask, so that the files' modes are known
    try:
        run(cfg, 2)
    finally:
        os.umask(umask)
    return d / "run", cfg


def test_demo_config_runs_and_logs_every_scalar_to_tensorboard(baseline):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = baseline
    acc = EventAccumulator(str(out / "tensorboard" / "train"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    missing = [t for t in SCALARS if t not in tags]
    assert not missing, missing
    assert not [t for t in tags if t.startswith("Train/Samples/")]  # DeepSpeed's duplicate of train/lr
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 9))
    layer = "model.layers.1.mlp.down_proj"  # converted (blocks 0 and 3 stay in BF16)
    for tensor in ("input", "weight", "grad"):
        for name in HEALTH:
            assert f"nvfp4/{layer}/{tensor}/{name}" in tags
    assert not any(t.startswith("nvfp4/model.layers.0.") for t in tags)
    # stats_interval 3: health at steps 0, 3, 6 (logged with the step count after it, 1, 4, 7).
    assert [e.step for e in acc.Scalars(f"nvfp4/{layer}/weight/sqnr_db")] == [1, 4, 7]
    ratio = acc.Scalars("comm/grad_ratio_vs_bf16")[-1].value
    assert 0.25 < ratio <= 0.30
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert losses[-1] < losses[0]


def test_checkpoints_are_complete_pruned_and_pointed_to(baseline):
    ckpts = baseline[0] / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000008"
    complete = sorted(d.name for d in ckpts.glob("step_*") if (d / "COMPLETE").is_file())
    assert complete == ["step_00000004", "step_00000008"]  # keep_checkpoints = 2
    meta = json.loads((ckpts / "step_00000008" / "meta.json").read_text())
    assert meta["step"] == 8 and meta["dp_world_size"] == 2 and meta["data"] == {"samples_consumed": 8 * 16}
    assert meta["run_config"] == json.loads(baseline[1].read_text())  # compared on resume
    for f in (ckpts / "latest", ckpts / "step_00000008" / "meta.json"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f  # the umask's mode, as any file (not mkstemp's 0600)


KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from launch import trainer, train
original = trainer.Trainer.train_step
def train_step(self):
    if self.step == {at} and self.rank == 0:
        os.kill(os.getpid(), signal.SIGKILL)  # no handler, no cleanup: as a crashed node
    return original(self)
trainer.Trainer.train_step = train_step
sys.exit(train.main())
"""


def test_kill_9_then_restart_repeats_the_uninterrupted_losses_exactly(baseline, tmp_path):
    """Determinism makes this bitwise on CPU: per-step RNG reseeding, the loader counter, the optimizer state
    and the NVFP4 communication counter are all restored from the step-4 checkpoint. What the killed run
    logged after step 4 is dropped, so steps.jsonl and TensorBoard hold every step once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ref_out, ref_cfg = baseline
    cfg = json.loads(ref_cfg.read_text())
    cfg["trainer"]["out_dir"] = str(tmp_path / "run")
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    script = tmp_path / "kill_train.py"
    script.write_text(KILL_SCRIPT.format(repo=str(REPO), at=6))  # rank 0 dies before step 7
    ranks = Ranks(tmp_path / "cfg.json", 2, script=script)
    ranks.procs[0].wait(timeout=600)
    ranks.kill(signal.SIGKILL)  # rank 1 is left waiting in a collective
    out = tmp_path / "run"
    assert ranks.procs[0].returncode == -signal.SIGKILL
    assert max(steps(out)) == 6 and (out / "checkpoints" / "latest").read_text() == "step_00000004"
    resumed = run(tmp_path / "cfg.json", 2).output()
    assert "steps.jsonl: dropped 2 rows after step 4" in resumed
    lines = [json.loads(line)["step"] for line in (out / "steps.jsonl").read_text().splitlines()]
    assert lines == list(range(1, 9))  # 5 and 6 once, though the killed run had logged them
    acc = EventAccumulator(str(out / "tensorboard" / "train"), size_guidance={"scalars": 0})
    acc.Reload()
    assert len(list((out / "tensorboard" / "train").glob("events.out.tfevents.*"))) == 2
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 9))  # the killed run's 5, 6 purged
    ours, ref = steps(out), steps(ref_out)
    assert sorted(ours) == list(range(1, 9))
    for s in range(5, 9):
        assert ours[s]["digest"] == ref[s]["digest"]
        assert ours[s]["loss"] == ref[s]["loss"], (s, ours[s]["loss"], ref[s]["loss"])


def test_resume_refuses_a_changed_run_unless_the_change_is_allowed(baseline, tmp_path):
    """seq_len and max_steps change what the resumed run computes: refused, naming each key old -> new, until
    trainer.allow_config_change lists them. log_interval and out_dir only change what is logged where."""
    ref_out, ref_cfg = baseline
    cfg = json.loads(ref_cfg.read_text())
    cfg["trainer"].update(out_dir=str(tmp_path / "run"), log_interval=2, max_steps=10)
    cfg["data"]["seq_len"] = 32
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    shutil.copytree(ref_out / "checkpoints" / "step_00000004", tmp_path / "run" / "checkpoints" / "step_00000004")
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_00000004")
    text = run(tmp_path / "cfg.json", 2, expect=78).output()  # a config error, said once by rank 0
    assert text.count("the config changed since the checkpoint") == 1, text[-3000:]
    assert "  data.seq_len: 64 -> 32\n  trainer.max_steps: 8 -> 10\n" in text
    assert """--set 'trainer.allow_config_change=["data.seq_len", "trainer.max_steps"]'""" in text
    assert "log_interval: " not in text and not (tmp_path / "run" / "steps.jsonl").exists()

    allowed = run(tmp_path / "cfg.json", 2, ['trainer.allow_config_change=["data.seq_len", "trainer.max_steps"]'])
    text = allowed.output()
    assert text.count("resume: config changes since the checkpoint that leave the run as it was: ") == 1
    assert "trainer.log_interval: 1 -> 2" in text and f'trainer.out_dir: "{ref_out}" -> "{tmp_path / "run"}"' in text
    assert "allow_config_change: (unset)" not in text  # the list itself is said once, below
    assert ("resume: config changes accepted by trainer.allow_config_change (the run continues differently): "
            "data.seq_len: 64 -> 32; trainer.max_steps: 8 -> 10") in text
    assert "resumed from" in text and "train: 10 steps x 16 x 32 tokens" in text
    assert sorted(steps(tmp_path / "run")) == list(range(5, 11))


def test_two_rank_checkpoint_resumes_on_one_rank_with_the_same_data_order(baseline, tmp_path):
    ref_out, ref_cfg = baseline
    cfg = json.loads(ref_cfg.read_text())
    cfg["trainer"]["out_dir"] = str(tmp_path / "run")
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    out = tmp_path / "run"
    ranks = Ranks(tmp_path / "cfg.json", 2)
    wait_for(lambda: (out / "checkpoints" / "step_00000004" / "COMPLETE").exists(), what="the step-4 checkpoint")
    ranks.kill(signal.SIGKILL)
    (out / "checkpoints" / "latest").write_text("step_00000004")  # resume from 4 even if 8 was reached
    for later in out.glob("checkpoints/step_0000000[5-9]"):
        (later / "COMPLETE").unlink(missing_ok=True)
    resumed = run(tmp_path / "cfg.json", 1)
    assert "universal checkpoint from 2 ranks" in resumed.output()
    assert "2 micro-steps per step" in resumed.output()  # the global batch of 16 is kept
    ours, ref = steps(out), steps(ref_out)
    for s in range(5, 9):
        assert ours[s]["digest"] == ref[s]["digest"], s  # the very same samples
        assert ours[s]["lr"] == ref[s]["lr"]
        # Not bitwise: 1 rank sums in another order and draws other stochastic-rounding bits.
        assert ours[s]["loss"] == pytest.approx(ref[s]["loss"], rel=0.02)


def test_the_8b_zero3_config_shrunk_with_set_trains_on_2_cpu_ranks(corpus, tmp_path):
    """configs/llama-8b-zero3.json itself, only shrunk with --set: the model is built under zero.Init, its
    gradients and ZeRO-3 weight gathers travel in NVFP4, and a ZeRO-3 checkpoint is written."""
    from launch.plot import read_scalar

    model = {**TINY_MODEL, "num_hidden_layers": 8}  # the config keeps blocks 0-1 and 4-7 in BF16
    data = {"sources": [str(corpus)], "seq_len": 64, "seed": 7}
    overrides = [f"model.config.{k}={json.dumps(v)}" for k, v in model.items()] + [
        "train_batch_size=4", "train_micro_batch_size_per_gpu=2", f"data={json.dumps(data)}",
        f"trainer.out_dir={json.dumps(str(tmp_path / 'run'))}", "trainer.max_tokens=null", "trainer.max_steps=3",
        "trainer.save_interval=3",
        "trainer.eval_interval=0", "trainer.log_interval=1", "trainer.progress=false", "trainer.warmup_steps=1"]
    ranks = run(REPO / "configs" / "llama-8b-zero3.json", 2, overrides, log_dir=tmp_path)
    out = ranks.output()
    assert "fp4  model.layers.2.mlp.down_proj" in out and "on 2 ranks" in out, out[-3000:]
    rows = steps(tmp_path / "run")
    assert sorted(rows) == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows.values())
    assert min(read_scalar(tmp_path / "run", "comm/grad_bytes_sent")[1]) > 0
    assert min(read_scalar(tmp_path / "run", "comm/weight_bytes_sent")[1]) > 0
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_00000003"


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_2_and_3_checkpoints_resume_on_another_world_size(corpus, tmp_path, stage):
    """2 ranks to step 4, then 1 rank to step 6 through the universal checkpoint: same data, close losses."""
    (tmp_path / "ref").mkdir()
    ref = write_config(tmp_path / "ref" / "cfg.json", corpus, zero_optimization={"stage": stage},
                       trainer={"max_steps": 6, "save_interval": 4, "out_dir": str(tmp_path / "ref" / "run")})
    run(ref, 2)
    cfg = write_config(tmp_path / "cfg.json", corpus, zero_optimization={"stage": stage},
                       trainer={"max_steps": 6, "save_interval": 4})
    shutil.copytree(tmp_path / "ref" / "run" / "checkpoints" / "step_00000004",
                    tmp_path / "run" / "checkpoints" / "step_00000004")
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_00000004")
    resumed = run(cfg, 1)
    assert "universal checkpoint from 2 ranks" in resumed.output()
    ours, theirs = steps(tmp_path / "run"), steps(tmp_path / "ref" / "run")
    assert sorted(ours) == [5, 6]
    for s in (5, 6):
        assert ours[s]["digest"] == theirs[s]["digest"], s
        assert ours[s]["loss"] == pytest.approx(theirs[s]["loss"], rel=0.02)


def test_sigusr1_checkpoints_at_the_step_boundary_and_exits_75(corpus, tmp_path):
    cfg = write_config(tmp_path / "cfg.json", corpus, trainer={"max_steps": 40, "save_interval": 0})
    ranks = Ranks(cfg, 2)
    out = tmp_path / "run"
    wait_for(lambda: (out / "steps.jsonl").exists() and len((out / "steps.jsonl").read_text().splitlines()) >= 3,
             what="3 steps")
    os.kill(ranks.procs[1].pid, signal.SIGUSR1)  # one rank is enough: the flag is all-reduced
    assert ranks.wait(300) == [75, 75]
    latest = (out / "checkpoints" / "latest").read_text()
    meta = json.loads((out / "checkpoints" / latest / "meta.json").read_text())
    assert (out / "checkpoints" / latest / "COMPLETE").is_file()
    assert meta["step"] == max(steps(out)) < 40
    assert "preempted (SIGUSR1)" in ranks.output() or "preempted (signal on another rank)" in ranks.output()


def test_torchrun_with_max_restarts_survives_a_killed_worker(corpus, tmp_path):
    cfg = write_config(tmp_path / "cfg.json", corpus, trainer={"max_steps": 14, "save_interval": 3})
    out = tmp_path / "run"
    log = open(tmp_path / "torchrun.log", "w")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1:1", "--nproc_per_node=2", "--max-restarts=2",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", str(TRAIN),
           "--deepspeed_config", str(cfg)]
    agent = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: (out / "checkpoints" / "step_00000003" / "COMPLETE").exists(), what="a checkpoint")
        workers = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2, workers
        os.kill(int(workers[1]), signal.SIGKILL)
        assert agent.wait(400) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
        log.close()
    text = (tmp_path / "torchrun.log").read_text()
    assert "resumed from" in text
    assert sorted(steps(out)) == list(range(1, 15))


NAN_LOSS_SCRIPT = """
import math, sys
sys.path.insert(0, {repo!r})
from launch import trainer, train
BAD = set({bad!r})
original = trainer.Trainer._micro_loss
def poisoned(self, batch):
    loss = original(self, batch)
    return loss * math.nan if self.step in BAD else loss
trainer.Trainer._micro_loss = poisoned
sys.exit(train.main())
"""


def test_non_finite_steps_are_skipped_and_repeated_ones_stop_the_run(corpus, tmp_path):
    script = tmp_path / "nan_train.py"
    script.write_text(NAN_LOSS_SCRIPT.format(repo=str(REPO), bad=[2, 6, 7, 8, 9]))
    cfg = write_config(tmp_path / "cfg.json", corpus, trainer={"max_steps": 12, "max_consecutive_skips": 3})
    ranks = run(cfg, 2, script=script, expect=65)
    rows = steps(tmp_path / "run")
    assert rows[3]["applied"] is False and rows[4]["applied"] is True  # step index 2 is the 3rd step
    assert [rows[s]["applied"] for s in (7, 8, 9)] == [False, False, False]
    assert max(rows) == 9
    assert "stopping: 3 consecutive non-finite steps; the last good checkpoint is" in ranks.output()
    assert "step_00000008" in ranks.output()  # saved during the streak: skipped steps change no weights
    assert rows[9]["loss"] is None


INF_GRAD_SCRIPT = """
import math, sys
sys.path.insert(0, {repo!r})
import torch
from launch import trainer, train
BAD = set({bad!r})

class InfGrad(torch.autograd.Function):  # the loss stays finite, every gradient becomes inf or nan
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * math.inf

original = trainer.Trainer._micro_loss
def poisoned(self, batch):
    loss = original(self, batch)
    return InfGrad.apply(loss) if self.step in BAD and self.rank == 0 else loss
trainer.Trainer._micro_loss = poisoned
sys.exit(train.main())
"""


def test_a_finite_loss_with_non_finite_gradients_on_one_rank_is_skipped_and_changes_nothing(corpus, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    script = tmp_path / "inf_grad_train.py"
    script.write_text(INF_GRAD_SCRIPT.format(repo=str(REPO), bad=[2]))
    cfg = write_config(tmp_path / "cfg.json", corpus, trainer={"max_steps": 6, "save_interval": 1,
                                                                "keep_checkpoints": 6})
    run(cfg, 2, script=script)
    rows = steps(tmp_path / "run")
    assert [rows[s]["applied"] for s in (1, 2, 3, 4)] == [True, True, False, True]
    assert rows[3]["loss"] is not None  # the loss itself was finite
    ckpts = tmp_path / "run" / "checkpoints"
    before, after, later = (get_fp32_state_dict_from_zero_checkpoint(str(ckpts), tag=f"step_0000000{s}")
                            for s in (2, 3, 4))
    assert all(torch.equal(before[k], after[k]) for k in before)  # the skipped step applied nothing
    assert not all(torch.equal(after[k], later[k]) for k in after)  # and the next one trains again


def test_export_round_trip_matches_the_trainers_logits(baseline, tmp_path):
    """The exported HF model's logits equal those of the trainer's own model, resumed from the same
    checkpoint by the Trainer (2 ranks, as it was trained), with its NVFP4 layers in high precision."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, ref_cfg = baseline
    ckpt = out / "checkpoints" / "step_00000008"
    hf = tmp_path / "hf"
    subprocess.run([sys.executable, "-m", "launch.export", str(ckpt), str(hf)], cwd=REPO, check=True,
                   env=child_env(), capture_output=True)
    exported = AutoModelForCausalLM.from_pretrained(hf)
    tok = AutoTokenizer.from_pretrained(hf)
    assert exported.dtype == torch.bfloat16  # trained in bf16
    ids = tok.encode("def main():\n    return 0\n")

    # The trainer's model: a copy of the run, resumed by the Trainer itself.
    run_copy = tmp_path / "run"
    shutil.copytree(out / "checkpoints", run_copy / "checkpoints")
    cfg = json.loads(ref_cfg.read_text())
    cfg["trainer"]["out_dir"] = str(run_copy)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    probe = tmp_path / "logits.pt"
    os.environ.update(PROBE_IDS=json.dumps(ids), PROBE_OUT=str(probe))
    try:
        run(tmp_path / "cfg.json", 2, script=REPO / "tests" / "launch" / "trainer_logits.py")
    finally:
        del os.environ["PROBE_IDS"], os.environ["PROBE_OUT"]
    trainer = torch.load(probe)
    assert trainer["step"] == 8
    with torch.no_grad():
        logits = exported(torch.tensor([ids])).logits
    assert torch.equal(logits, trainer["high"])
    rel = (trainer["nvfp4"].float() - logits.float()).norm() / logits.float().norm()
    assert 0 < rel < 0.2  # the NVFP4 forward: close, not equal


def test_bf16_tail_switches_nvfp4_off_for_the_last_tokens_and_old_checkpoints_are_pruned(corpus, tmp_path):
    from launch.plot import read_scalar

    cfg = write_config(tmp_path / "cfg.json", corpus, trainer={"max_steps": 4, "bf16_tail_fraction": 0.5,
                                                                "save_interval": 1, "keep_checkpoints": 2})
    ranks = run(cfg, 2)
    assert "step 2: switching all NVFP4 layers and communication to high precision" in ranks.output()
    run_dir = tmp_path / "run"
    sent_steps, sent = read_scalar(run_dir, "comm/grad_bytes_sent")
    assert sent_steps == [1, 2] and min(sent) > 0  # steps 3 and 4 send nothing through NVFP4 collectives
    assert read_scalar(run_dir, "nvfp4/bf16_tail_started")[0] == [2]
    # save_interval 1: checkpoints at steps 1-4, of which the last 2 are kept.
    kept = sorted(d.name for d in (run_dir / "checkpoints").glob("step_*"))
    assert kept == ["step_00000003", "step_00000004"]

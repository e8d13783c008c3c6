"""Trainer: the loop behind launch/train.py, from config to checkpoints.

One optimizer step = one global batch (train_batch_size sequences) = gradient-accumulation micro-steps
on every rank; DeepSpeed derives the accumulation from the world size, so a run resumed on another
world size keeps its global batch, and the data loader (one sample counter) keeps its order.

Determinism: at the start of every step the torch RNG is reseeded from (trainer.seed, step, rank), so
stochastic rounding and dropout depend only on where the run is, not on its history; together with
the checkpointed loader counter, optimizer state and NVFP4 communication counter, a run resumed after a
kill -9 repeats the uninterrupted run's losses exactly (same world size, CPU).

Device syncs (docs/design.md §7.19): the loss and the non-finite guard stay on the device during the
micro-steps; a step reads its figures once, from the all-reduce that sums them over the ranks.

Exit codes (also used by slurm/train.sbatch):
    0   finished
    75  preempted (SIGUSR1/SIGTERM): a checkpoint was saved at the next step boundary; requeue me
    65  stopped after trainer.max_consecutive_skips non-finite steps; the message names the last good checkpoint
    78  a config error (launch/train.py): printed once, by rank 0
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import ds_fp4
from data_pipeline import BatchLoader, TokenDataset, prepare_embedded_corpus
from ds_fp4.stats import collect_stats

from .checkpoint import CheckpointManager
from .config import ConfigError, RunConfig
from .console import Console
from .cpu_numerics import cpu_model, is_pinned
from .evaluation import held_out_loss, open_eval_loader
from .export import write_run_files
from .metrics import RunLog, Throughput, model_flops_per_token, peak_flops, sample_digest, wrap_int64, wsd_lambda
from .resume import check_resume_config
from .runtime import fp32_buffers, install_signal_handlers, preemption_signal, restore_fp32_buffers, step_seed

EXIT_OK, EXIT_PREEMPTED, EXIT_DIVERGED = 0, 75, 65


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step reports."""

    loss: float
    """The global mean loss over every rank's micro-batches; NaN when a rank's loss was non-finite."""
    applied: bool
    """False: skipped for a non-finite loss or gradient on some rank; no weight changed."""
    digest: int
    """The global batch's sample digest (launch.metrics.sample_digest), the same whatever the world size."""
    figures: dict | None
    """NVFP4 health figures (ds_fp4.stats) of the step's first micro-batch, every nvfp4.stats_interval steps."""


class Trainer:
    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.out = Path(cfg.trainer.out_dir)
        self.ckpts = CheckpointManager(self.out / "checkpoints", cfg.trainer.keep_checkpoints)
        self.console = Console(self.rank, cfg.trainer.progress)  # rank 0's messages, bar or per-step lines
        # Where the run is; restored from the checkpoint by setup().
        self.step = 0
        self.tokens = 0
        self.skips_in_a_row = 0
        self.skips_total = 0
        # Built by setup().
        self.dataset: TokenDataset | None = None
        self.engine = None  # the DeepSpeed engine (ds_fp4.initialize)
        self.loader: BatchLoader | None = None
        self.eval_loader = None  # data_pipeline.EvalLoader when evaluating (launch/evaluation.py)
        self.total_steps = 0
        self.tail_step: int | None = None  # the first step of the BF16 tail (trainer.bf16_tail_fraction)
        self.run_log: RunLog | None = None  # steps.jsonl and TensorBoard

    # Setup -----------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg, t = self.cfg, self.cfg.trainer
        resume = self.ckpts.latest()
        if resume is not None:  # before anything is built: a refused config fails at once
            for line in check_resume_config(resume.meta.get("run_config"), cfg.raw,
                                            t.allow_config_change, str(resume.path)):
                self.console.say(line)
        self._prepare_embedded()
        try:  # a missing dataset, mixed tokenizers, a vocabulary or seq_len the data or model cannot hold
            self.dataset = TokenDataset(cfg.data)
            hf_config = cfg.model.hf_config(self.dataset.vocab_size)
        except (ValueError, FileNotFoundError) as e:  # alike on every rank: said once (launch/train.py)
            raise ConfigError(f"data / model: {e}") from e
        self.eval_loader = open_eval_loader(cfg, self.rank, self.world, self.console.say)
        universal = resume is not None and resume.zero_stage > 0 and resume.dp_world_size != self.world
        ds_config = self._deepspeed_config(universal)
        model = cfg.model.build(hf_config, ds_config)
        self.total_steps = cfg.total_steps(self.dataset.seq_len)
        schedule = wsd_lambda(self.total_steps, t.warmup_steps, t.decay_fraction, t.decay_shape, t.min_lr_ratio)
        buffers = fp32_buffers(model)
        self.engine, _, _, _ = ds_fp4.initialize(
            # The trainer seeds every rank from (seed, step, rank) itself: no second rank fold.
            model=model, config=ds_config, nvfp4=replace(cfg.nvfp4, sr_rank_seeds=False),
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        )
        restore_fp32_buffers(self.engine.module, buffers)
        self.loader = BatchLoader(self.dataset, cfg.global_batch, cfg.micro_batch, self.rank, self.world)
        if resume is not None:
            self._resume(resume, universal)
        if t.bf16_tail_fraction:
            self.tail_step = math.ceil((1 - t.bf16_tail_fraction) * self.total_steps)
        self.run_log = RunLog(self.out, self.rank, self.world, self.engine,
                              model_flops_per_token(self.engine.module, self.dataset.seq_len),
                              peak_flops(t.peak_tflops)[0], cfg.deepspeed.get("tensorboard"), self.step)
        if self.run_log.dropped:
            self.console.say(f"steps.jsonl: dropped {self.run_log.dropped} rows after step {self.step}, "
                             "logged by the run that stopped; they are redone")
        if self.rank == 0:
            write_run_files(self.out, cfg.raw, hf_config, self.dataset)
        self._announce()

    def _prepare_embedded(self) -> None:
        """Rank 0 prepares the embedded corpus on first use (data.embedded); the others wait."""
        emb = self.cfg.embedded
        if emb is not None:
            if self.rank == 0:
                prepare_embedded_corpus(emb.out_dir, vocab_size=emb.vocab_size, eval_fraction=emb.eval_fraction,
                                        max_files=emb.max_files, progress=self.cfg.trainer.progress)
            dist.barrier()

    def _deepspeed_config(self, universal: bool) -> dict:
        """A copy of DeepSpeed's keys without "tensorboard" (RunLog writes the events itself)
        and, to resume on another world size, universal checkpoint loading (read when the engine is built)."""
        ds_config = copy.deepcopy(self.cfg.deepspeed)
        ds_config.pop("tensorboard", None)
        if universal:
            ds_config.setdefault("checkpoint", {})["load_universal"] = True
        return ds_config

    def _resume(self, ckpt, universal: bool) -> None:
        tag = self.ckpts.universal(ckpt) if universal else ckpt.tag
        path, client = self.engine.load_checkpoint(str(self.ckpts.root), tag=tag)
        if path is None:
            raise RuntimeError(f"could not load checkpoint {self.ckpts.root / tag}")
        client = client or {}
        state = client.get("trainer") or ckpt.meta
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.skips_total = int(state.get("skips_total", 0))
        self.loader.load_state_dict(state["data"])
        if state.get("nvfp4_comm"):
            self.engine.nvfp4.comm.load_state_dict(state["nvfp4_comm"])
        how = f"universal checkpoint from {ckpt.dp_world_size} ranks" if universal else "checkpoint"
        self.console.say(f"resumed from {ckpt.path} ({how}) at step {self.step}")

    def _announce(self) -> None:
        report, say = self.engine.nvfp4.report, self.console.say
        say(str(report) if report is not None else "NVFP4 disabled: every layer in high precision")
        checked = self.engine.nvfp4.selftest
        say(str(checked) if checked is not None else "ds_fp4 self-test: off (nvfp4.selftest is false)")
        say(f"train: {self.total_steps} steps x {self.cfg.global_batch} x {self.dataset.seq_len} tokens on "
            f"{self.world} ranks ({self.engine.gradient_accumulation_steps()} micro-steps per step), "
            f"from step {self.step}")
        if self.engine.device.type == "cpu":
            how = "pinned (launch.cpu_numerics)" if is_pinned() else f"{cpu_model()}'s own"
            say(f"cpu numerics: {how}; other CPUs give other losses unless pinned (docs/trainer.md)")

    # One step --------------------------------------------------------------------------------------
    def _micro_loss(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.engine.device, non_blocking=True)
        logits = self.engine(input_ids=batch[:, :-1]).logits
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    def train_step(self) -> StepResult:
        """One optimizer step: forward and backward of this rank's micro-batches, the step's figures summed
        over the ranks (the step's one device sync), then DeepSpeed's optimizer step, which every rank
        skips when any rank had a non-finite loss or gradient."""
        engine = self.engine
        torch.manual_seed(step_seed(self.cfg.trainer.seed, self.step, self.rank))
        interval = self.cfg.nvfp4.stats_interval
        want_stats = bool(interval) and self.step % interval == 0 and bool(engine.nvfp4.layers)
        loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
        digest, figures = 0, None
        micro_steps = engine.gradient_accumulation_steps()
        for micro in range(micro_steps):
            batch = next(self.loader)
            digest = wrap_int64(digest + sample_digest(batch))  # the loader's batch is on the host: no sync
            if want_stats and micro == 0:
                with collect_stats(engine.module) as figures:
                    loss_sum += self._backward(batch)
            else:
                loss_sum += self._backward(batch)
            if micro < micro_steps - 1:
                engine.step()  # not a boundary yet: DeepSpeed only counts the micro-step
        result = self._sum_over_ranks(loss_sum, micro_steps, digest, figures)
        if not result.applied and self._plain_optimizer():
            for p in engine.module.parameters():
                p.grad = None  # a plain torch optimizer skips parameters without gradients
        engine.step()
        if self._plain_optimizer():
            return result
        if not result.applied and engine.was_step_applied():
            raise RuntimeError("a non-finite step was applied by DeepSpeed; refusing to continue")
        # A finite loss with a non-finite gradient: DeepSpeed's optimizers find it and skip the step.
        return replace(result, applied=engine.was_step_applied())

    def _backward(self, batch: torch.Tensor) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns its loss, detached, on the device."""
        loss = self._micro_loss(batch)
        # A non-finite loss is multiplied by NaN, which poisons every gradient, so that DeepSpeed's overflow
        # check skips the step on every rank. Decided on the device; x 1.0 changes no bit of a finite loss.
        self.engine.backward(loss * torch.where(torch.isfinite(loss), 1.0, math.nan))
        return loss.detach()

    def _sum_over_ranks(self, loss_sum: torch.Tensor, micro_steps: int, digest: int, figures) -> StepResult:
        """[finite loss sum, micro-steps, ranks with a bad step, ranks with a non-finite loss], all-reduced
        (float64, as the sum of the micro-batch losses is) and read once; the digest goes alongside as int64."""
        loss_ok = torch.isfinite(loss_sum)
        step_ok = loss_ok & self._grads_finite()
        totals = torch.stack([torch.where(loss_ok, loss_sum, 0.0), loss_sum.new_tensor(float(micro_steps)),
                              (~step_ok).double(), (~loss_ok).double()])
        digests = torch.tensor([digest], dtype=torch.int64, device=loss_sum.device)
        dist.all_reduce(totals)
        dist.all_reduce(digests)
        loss_total, count, bad_ranks, nonfinite_ranks = totals.tolist()
        return StepResult(loss=math.nan if nonfinite_ranks else loss_total / count, applied=not bad_ranks,
                          digest=int(digests.item()), figures=figures)

    def _plain_optimizer(self) -> bool:
        """Stage 0 in fp32: DeepSpeed runs the torch optimizer without an overflow check."""
        e = self.engine
        return e.zero_optimization_stage() == 0 and not e.bfloat16_enabled() and not e.fp16_enabled()

    def _grads_finite(self) -> torch.Tensor:
        """On the device: False when the plain optimizer (which has no overflow check) has a non-finite gradient."""
        ok = torch.ones((), dtype=torch.bool, device=self.engine.device)
        if self._plain_optimizer():
            for p in self.engine.module.parameters():
                if p.grad is not None:
                    ok &= torch.isfinite(p.grad).all()
        return ok

    def _any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank (every rank calls this)."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.engine.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def evaluate(self) -> float:
        """The mean loss over every rank's held-out batches."""
        return held_out_loss(self.engine, self.eval_loader, self._micro_loss)

    # The loop ----------------------------------------------------------------------------------------
    def fit(self) -> int:
        cfg, t = self.cfg, self.cfg.trainer
        install_signal_handlers()  # no-op if train.main already did; keeps Trainer usable on its own
        if self.step >= self.total_steps:
            self.console.say(f"nothing to do: the checkpoint is at step {self.step} of {self.total_steps}")
            return EXIT_OK
        loss = math.nan
        tokens_per_step = cfg.global_batch * self.dataset.seq_len
        self.console.start(self.step, self.total_steps)
        speed = Throughput()
        while self.step < self.total_steps:
            if self.tail_step is not None and self.step >= self.tail_step and self._tail_switch():
                self.run_log.events([("nvfp4/bf16_tail_started", 1.0, self.step)])
            result = self.train_step()
            loss = result.loss
            self.step += 1
            self.tokens += tokens_per_step
            speed.add(tokens_per_step)
            lr = self.engine.get_lr()[0]
            self.run_log.record({"step": self.step, "loss": loss if math.isfinite(loss) else None,
                                 "digest": result.digest, "applied": result.applied, "lr": lr, "tokens": self.tokens})
            if self._too_many_skips(result.applied):
                return EXIT_DIVERGED
            rate = None
            if self.step % t.log_interval == 0 or self.step == self.total_steps:
                rate = speed.report()
                self.run_log.step(self.step, loss, rate, self.tokens, self.skips_total, result.figures)
            elif result.figures:
                self.run_log.health(self.step, result.figures)
            self.console.step(self.step, self.total_steps, loss, lr, rate, speed.overall())
            if self.eval_loader is not None and self.step % t.eval_interval == 0:
                eval_loss = self.evaluate()
                self.run_log.events([("eval/loss", eval_loss, self.step)])
                self.console.say(f"eval at step {self.step}: loss {eval_loss:.4f}")
            if self._any_rank(preemption_signal() is not None):
                self.save()
                self.console.say(f"preempted ({preemption_signal() or 'signal on another rank'}): exiting with "
                                 f"{EXIT_PREEMPTED}; a restart resumes from step {self.step}")
                return EXIT_PREEMPTED
            if t.save_interval and self.step % t.save_interval == 0 and self.step < self.total_steps:
                self.save()
        self.save()
        self.console.close()
        self.console.say(f"done: {self.step} steps, {self.tokens:,} tokens, final loss {loss:.4f}")
        return EXIT_OK

    def _too_many_skips(self, applied: bool) -> bool:
        """Count a skipped step; True once trainer.max_consecutive_skips were skipped in a row."""
        if applied:
            self.skips_in_a_row = 0
            return False
        self.skips_in_a_row += 1
        self.skips_total += 1
        self.console.say(f"step {self.step}: non-finite loss or gradient, step skipped ({self.skips_in_a_row} "
                         "in a row)")
        if self.skips_in_a_row < self.cfg.trainer.max_consecutive_skips:
            return False
        last = self.ckpts.latest()
        self.console.say(f"stopping: {self.skips_in_a_row} consecutive non-finite steps; the last good "
                         f"checkpoint is {last.path if last else 'none (no checkpoint was saved)'}")
        return True

    def _tail_switch(self) -> bool:
        layers = self.engine.nvfp4.layers.values()
        if not any(m.nvfp4_active for m in layers):
            return False
        ds_fp4.set_nvfp4_active(self.engine.module, False)
        self.engine.nvfp4.set_comm_active(self.engine, False)
        self.console.say(f"step {self.step}: switching all NVFP4 layers and communication to high precision for "
                         f"the last {self.cfg.trainer.bf16_tail_fraction:.0%} of training")
        return True

    def save(self) -> None:
        state = {"step": self.step, "tokens": self.tokens, "skips_total": self.skips_total,
                 "data": self.loader.state_dict(), "nvfp4_comm": self.engine.nvfp4.comm.state_dict()}
        meta = {**state, "dp_world_size": self.world, "zero_stage": self.engine.zero_optimization_stage(),
                "run_config": self.cfg.raw}  # compared on resume (launch/resume.py)
        t0 = time.perf_counter()
        path = self.ckpts.save(self.engine, self.step, {"trainer": state}, meta)
        self.console.say(f"checkpoint saved at step {self.step} ({path}, {time.perf_counter() - t0:.1f} s)")

    def close(self) -> None:
        """Stop the loader's thread, then unmap the datasets (remote fetch threads too) and close the logs."""
        self.console.close()
        if self.loader is not None:
            self.loader.close()
        for dataset in (self.dataset, self.eval_loader and self.eval_loader.dataset):
            if dataset is not None:
                dataset.close()
        if self.run_log is not None:
            self.run_log.close()

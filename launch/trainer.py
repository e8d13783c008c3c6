"""Trainer: the loop behind launch/train.py, from config to checkpoints.

One optimizer step = one global batch (train_batch_size sequences) = gradient-accumulation micro-steps
on every rank; DeepSpeed derives the accumulation from the world size, so a run resumed on another
world size keeps its global batch, and the data loader (one sample counter) keeps its order.

Determinism: at the start of every step the torch RNG is reseeded from (trainer.seed, step, rank), so
stochastic rounding and dropout depend only on where the run is, not on its history; together with
the checkpointed loader counter, optimizer state and NVFP4 communication counter, a run resumed after a
kill -9 repeats the uninterrupted run's losses exactly (same world size, CPU).

Exit codes (also used by slurm/train.sbatch):
    0   finished
    75  preempted (SIGUSR1/SIGTERM): a checkpoint was saved at the next step boundary; requeue me
    65  stopped after trainer.max_consecutive_skips non-finite steps; the message names the last good checkpoint
"""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import ds_fp4
from data_pipeline import BatchLoader, TokenDataset, build_eval_loader, prepare_embedded_corpus
from ds_fp4.stats import collect_stats

from .checkpoint import CheckpointManager
from .config import RunConfig
from .cpu_numerics import cpu_model, is_pinned
from .metrics import Throughput, model_flops_per_token, peak_flops, wsd_lambda

EXIT_OK, EXIT_PREEMPTED, EXIT_DIVERGED = 0, 75, 65
MASK64 = (1 << 64) - 1
_received: list[str] = []  # names of the preemption signals received so far


def _on_signal(signum, frame) -> None:
    _received.append(signal.Signals(signum).name)


def install_signal_handlers() -> None:
    """SIGUSR1 / SIGTERM: checkpoint at the next step boundary and exit 75. Installed before anything
    slow starts (the process group, the data, the engine), so an early signal is not fatal."""
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, _on_signal)


_DIGEST_WEIGHTS: dict[int, torch.Tensor] = {}


def wrap_int64(x: int) -> int:
    """x modulo 2^64, as a signed int64 (what torch's int64 sums wrap to)."""
    return (x + 2**63) % 2**64 - 2**63


def sample_digest(batch: torch.Tensor) -> int:
    """Sum over samples of a position-weighted hash of their tokens (mod 2^64, order-independent)."""
    n = batch.shape[1]
    if n not in _DIGEST_WEIGHTS:
        _DIGEST_WEIGHTS[n] = torch.randint(1, 2**62, (n,), generator=torch.Generator().manual_seed(n))
    return int((batch.cpu() * _DIGEST_WEIGHTS[n]).sum().item())


def fp32_buffers(model: torch.nn.Module) -> dict[tuple[str, str], torch.Tensor]:
    """Copies of the non-persistent floating-point buffers (RoPE inverse frequencies): computed constants
    that no checkpoint stores. DeepSpeed's bf16 mode casts them with the module; Hugging Face's
    from_pretrained keeps them in fp32. Restoring them after ds_fp4.initialize makes the trainer's model
    compute exactly what the exported model computes (and keeps rotary angles precise)."""
    return {(m_name, b_name): buf.detach().float().clone()
            for m_name, mod in model.named_modules() for b_name, buf in mod._buffers.items()
            if buf is not None and buf.is_floating_point() and b_name in mod._non_persistent_buffers_set}


def restore_fp32_buffers(model: torch.nn.Module, saved: dict[tuple[str, str], torch.Tensor]) -> None:
    for (m_name, b_name), value in saved.items():
        mod = model.get_submodule(m_name)
        mod._buffers[b_name] = value.to(mod._buffers[b_name].device)


def step_seed(seed: int, step: int, rank: int) -> int:
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + rank * 0x94D049BB133111EB) & MASK64
    x ^= x >> 31
    return x & ((1 << 63) - 1)


class Trainer:
    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.out = Path(cfg.trainer.out_dir)
        self.ckpts = CheckpointManager(self.out / "checkpoints", cfg.trainer.keep_checkpoints)
        self.step = 0
        self.tokens = 0
        self.skips_in_a_row = 0
        self.skips_total = 0
        self.engine = None
        self.loader = None

    # Setup -----------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        self.dataset = self._open_data()
        resume = self.ckpts.latest()
        ds_config = cfg.ds_config()
        tb = ds_config.setdefault("tensorboard", {"enabled": True})
        tb.setdefault("output_path", str(self.out / "tensorboard"))
        tb.setdefault("job_name", "train")
        universal = resume is not None and resume.zero_stage > 0 and resume.dp_world_size != self.world
        if universal:
            ds_config.setdefault("checkpoint", {})["load_universal"] = True

        model = self._build_model(ds_config)
        self.total_steps = cfg.total_steps(self.dataset.seq_len)
        t = cfg.trainer
        schedule = wsd_lambda(self.total_steps, t.warmup_steps, t.decay_fraction, t.decay_shape, t.min_lr_ratio)
        buffers = fp32_buffers(model)
        self.engine, _, _, _ = ds_fp4.initialize(
            model=model, config=ds_config, model_parameters=[p for p in model.parameters() if p.requires_grad],
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        )
        restore_fp32_buffers(self.engine.module, buffers)
        self.loader = BatchLoader(self.dataset, cfg.global_batch, cfg.micro_batch, self.rank, self.world)
        if resume is not None:
            self._resume(resume, universal)
        self.tail_step = math.ceil((1 - t.bf16_tail_fraction) * self.total_steps) if t.bf16_tail_fraction else None
        self.eval_loader = None
        if t.eval_interval:
            self.eval_loader = build_eval_loader(cfg.data, cfg.global_batch, cfg.micro_batch, self.rank, self.world,
                                                 num_batches=t.eval_batches)
        self.flops_per_token = model_flops_per_token(self.engine.module, self.dataset.seq_len)
        self.peak, self.peak_source = peak_flops(t.peak_tflops)
        if self.rank == 0:
            self._write_run_files()
            report = self.engine.nvfp4.report
            print(str(report) if report is not None else "NVFP4 disabled: every layer in high precision", flush=True)
            print(f"train: {self.total_steps} steps x {cfg.global_batch} x {self.dataset.seq_len} tokens on "
                  f"{self.world} ranks ({self.engine.gradient_accumulation_steps()} micro-steps per step), "
                  f"from step {self.step}", flush=True)
            if self.engine.device.type == "cpu":
                how = "pinned (launch.cpu_numerics)" if is_pinned() else f"{cpu_model()}'s own"
                print(f"cpu numerics: {how}; other CPUs give other losses unless pinned (docs/trainer.md)", flush=True)

    def _open_data(self) -> TokenDataset:
        emb = self.cfg.embedded
        if emb is not None:
            if self.rank == 0:
                prepare_embedded_corpus(emb.out_dir, vocab_size=emb.vocab_size, eval_fraction=emb.eval_fraction,
                                        max_files=emb.max_files, progress=self.cfg.trainer.progress)
            dist.barrier()
        return TokenDataset(self.cfg.data)

    def _build_model(self, ds_config: dict) -> torch.nn.Module:
        import deepspeed
        from transformers import AutoModelForCausalLM
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        hf_config = self.cfg.model.hf_config(self.dataset.vocab_size)
        self.hf_config = hf_config
        # Resolve the class (importing its module) before zero.Init, as Hugging Face's from_pretrained
        # does: a module imported under zero.Init's patched tensor constructors is a hazard of its own.
        MODEL_FOR_CAUSAL_LM_MAPPING[type(hf_config)]
        torch.manual_seed(self.cfg.model.init_seed)
        if int((ds_config.get("zero_optimization") or {}).get("stage", 0)) == 3:
            with deepspeed.zero.Init(config_dict_or_path=ds_config):  # never materialise the full model
                return AutoModelForCausalLM.from_config(hf_config)
        return AutoModelForCausalLM.from_config(hf_config)

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
        if self.rank == 0:
            how = f"universal checkpoint from {ckpt.dp_world_size} ranks" if universal else "checkpoint"
            print(f"resumed from {ckpt.path} ({how}) at step {self.step}", flush=True)

    def _write_run_files(self) -> None:
        """What export needs later: the model config, the tokenizer and the parsed run config."""
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "run_config.json").write_text(json.dumps(self.cfg.raw, indent=1))
        self.hf_config.save_pretrained(self.out / "model")
        tok = self.dataset.tokenizer_path
        if tok:
            (self.out / "model" / "tokenizer.json").write_bytes(Path(tok).read_bytes())
        meta = {"eos_id": self.dataset.eos_id, "vocab_size": self.dataset.vocab_size, "seq_len": self.dataset.seq_len}
        (self.out / "model" / "data.json").write_text(json.dumps(meta, indent=1))

    # The loop ----------------------------------------------------------------------------------------
    def _anyone(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def _micro_loss(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.engine.device, non_blocking=True)
        logits = self.engine(input_ids=batch[:, :-1]).logits
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    def train_step(self) -> tuple[float, bool, dict | None, int]:
        """One optimizer step; returns (global mean loss, applied?, NVFP4 health figures or None, batch digest).

        The digest is a sum over the global batch's samples of a hash of each sample: it does not depend on
        how the batch was split over ranks, so it shows that a resized run reads the same data."""
        engine = self.engine
        torch.manual_seed(step_seed(self.cfg.trainer.seed, self.step, self.rank))
        interval = self.cfg.nvfp4_config.stats_interval
        want_stats = bool(interval) and self.step % interval == 0 and engine.nvfp4.layers
        loss_sum, bad, figures, digest = 0.0, False, None, 0
        micro_steps = engine.gradient_accumulation_steps()
        for micro in range(micro_steps):
            batch = next(self.loader)
            digest = wrap_int64(digest + sample_digest(batch))
            if want_stats and micro == 0:
                with collect_stats(engine.module) as figures:
                    loss = self._backward(batch)
            else:
                loss = self._backward(batch)
            bad |= not math.isfinite(loss)
            loss_sum += loss
            if micro == micro_steps - 1:
                bad |= self._plain_grads_nonfinite()
                totals = torch.tensor([loss_sum if math.isfinite(loss_sum) else 0.0, float(micro_steps),
                                       float(bad), float(not math.isfinite(loss_sum))], dtype=torch.float64)
                digests = torch.tensor([digest], dtype=torch.int64)
                dist.all_reduce(totals)
                dist.all_reduce(digests)
                bad = totals[2].item() > 0
                if bad and self._plain_optimizer():
                    for p in engine.module.parameters():
                        p.grad = None  # a plain torch optimizer skips parameters without gradients
            engine.step()
        if not self._plain_optimizer():
            if bad and engine.was_step_applied():
                raise RuntimeError("a non-finite step was applied by DeepSpeed; refusing to continue")
            # A finite loss with a non-finite gradient: DeepSpeed's optimizers find it and skip the step.
            bad = bad or not engine.was_step_applied()
        mean = float("nan") if totals[3] > 0 else (totals[0] / totals[1]).item()
        return mean, not bad, figures, int(digests.item())

    def _backward(self, batch: torch.Tensor) -> float:
        loss = self._micro_loss(batch)
        value = loss.item()
        # A non-finite loss poisons every gradient, so DeepSpeed's overflow check skips the step everywhere.
        self.engine.backward(loss if math.isfinite(value) else loss * float("nan"))
        return value

    def _plain_optimizer(self) -> bool:
        """Stage 0 in fp32: DeepSpeed runs the torch optimizer without an overflow check."""
        e = self.engine
        return e.zero_optimization_stage() == 0 and not e.bfloat16_enabled() and not e.fp16_enabled()

    def _plain_grads_nonfinite(self) -> bool:
        if not self._plain_optimizer():
            return False
        return any(p.grad is not None and not torch.isfinite(p.grad).all() for p in self.engine.module.parameters())

    def evaluate(self) -> float:
        self.engine.eval()
        total, n = torch.zeros(()), 0
        with torch.no_grad():
            for batch in self.eval_loader:
                total += self._micro_loss(batch).float().cpu()
                n += 1
        self.engine.train()
        t = torch.tensor([total.item(), float(n)])
        dist.all_reduce(t)
        return (t[0] / t[1]).item()

    def fit(self) -> int:
        cfg, t = self.cfg, self.cfg.trainer
        install_signal_handlers()  # no-op if train.main already did; keeps Trainer usable on its own
        if self.step >= self.total_steps:
            if self.rank == 0:
                print(f"nothing to do: the checkpoint is at step {self.step} of {self.total_steps}", flush=True)
            return EXIT_OK
        loss = float("nan")
        tokens_per_step = cfg.global_batch * self.dataset.seq_len
        bar = None
        if self.rank == 0 and t.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True)
        speed = Throughput()
        while self.step < self.total_steps:
            if self.tail_step is not None and self.step >= self.tail_step and self._tail_switch():
                self._log([("nvfp4/bf16_tail_started", 1.0, self.step)])
            loss, applied, figures, digest = self.train_step()
            self.step += 1
            self.tokens += tokens_per_step
            speed.add(tokens_per_step)
            self._record({"step": self.step, "loss": loss if math.isfinite(loss) else None, "digest": digest,
                          "applied": applied, "lr": self.engine.get_lr()[0], "tokens": self.tokens})
            if applied:
                self.skips_in_a_row = 0
            else:
                self.skips_in_a_row += 1
                self.skips_total += 1
                if self.rank == 0:
                    print(f"step {self.step}: non-finite loss or gradient, step skipped "
                          f"({self.skips_in_a_row} in a row)", flush=True)
                if self.skips_in_a_row >= t.max_consecutive_skips:
                    last = self.ckpts.latest()
                    if self.rank == 0:
                        print(f"stopping: {self.skips_in_a_row} consecutive non-finite steps; the last good "
                              f"checkpoint is {last.path if last else 'none (no checkpoint was saved)'}", flush=True)
                    return EXIT_DIVERGED
            if self.step % t.log_interval == 0 or self.step == self.total_steps:
                self._log_step(loss, speed.report(), figures)
            elif figures:
                self._log_health(figures)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{speed.overall():,.0f}")
                bar.update(1)
            if self.eval_loader is not None and self.step % t.eval_interval == 0:
                self._log([("eval/loss", self.evaluate(), self.step)])
            if self._anyone(bool(_received)):
                self.save()
                if self.rank == 0:
                    why = _received[0] if _received else "signal on another rank"
                    print(f"preempted ({why}): checkpoint saved at step "
                          f"{self.step}, exiting with {EXIT_PREEMPTED}", flush=True)
                return EXIT_PREEMPTED
            if t.save_interval and self.step % t.save_interval == 0 and self.step < self.total_steps:
                self.save()
        self.save()
        if bar is not None:
            bar.close()
        if self.rank == 0:
            print(f"done: {self.step} steps, {self.tokens:,} tokens, final loss {loss:.4f}", flush=True)
        return EXIT_OK

    def _tail_switch(self) -> bool:
        layers = self.engine.nvfp4.layers.values()
        if not any(m.nvfp4_active for m in layers):
            return False
        ds_fp4.set_nvfp4_active(self.engine.module, False)
        self.engine.nvfp4.set_comm_active(self.engine, False)
        if self.rank == 0:
            print(f"step {self.step}: switching all NVFP4 layers and communication to high precision for the "
                  f"last {self.cfg.trainer.bf16_tail_fraction:.0%} of training", flush=True)
        return True

    def save(self) -> None:
        state = {"step": self.step, "tokens": self.tokens, "skips_total": self.skips_total,
                 "data": self.loader.state_dict(), "nvfp4_comm": self.engine.nvfp4.comm.state_dict()}
        meta = {**state, "dp_world_size": self.world, "zero_stage": self.engine.zero_optimization_stage()}
        self.ckpts.save(self.engine, self.step, {"trainer": state}, meta)

    # Logging ---------------------------------------------------------------------------------------
    def _record(self, row: dict) -> None:
        """One JSON line per step in out_dir/steps.jsonl (rank 0): loss, lr, tokens, batch digest."""
        if self.rank == 0:
            with open(self.out / "steps.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def _log(self, events: list[tuple[str, float, int]]) -> None:
        monitor = getattr(self.engine, "monitor", None)
        if self.rank == 0 and monitor is not None and monitor.enabled:
            monitor.write_events(events)

    def _log_step(self, loss: float, tokens_per_s: float, figures: dict | None) -> None:
        s = self.step
        events = [("train/loss", loss, s)] if math.isfinite(loss) else []
        events += [
            ("train/lr", self.engine.get_lr()[0], s),
            ("train/tokens_per_s", tokens_per_s, s),
            ("train/mfu", tokens_per_s * self.flops_per_token / (self.world * self.peak), s),
            ("train/skipped_steps", float(self.skips_total), s),
            ("train/tokens", float(self.tokens), s),
        ]
        norm = self.engine.get_global_grad_norm()
        if norm is not None and math.isfinite(float(norm)):
            events.append(("train/grad_norm", float(norm), s))
        comm = self.engine.nvfp4.comm_stats(reset=True)
        for kind in ("grad", "weight"):
            if comm[f"{kind}_bytes_bf16"]:
                events += [(f"comm/{kind}_bytes_sent", float(comm[f"{kind}_bytes_sent"]), s),
                           (f"comm/{kind}_bytes_saved", float(comm[f"{kind}_bytes_saved"]), s),
                           (f"comm/{kind}_ratio_vs_bf16", comm[f"{kind}_bytes_sent"] / comm[f"{kind}_bytes_bf16"], s)]
        self._log(events)
        if figures:
            self._log_health(figures)

    def _log_health(self, figures: dict) -> None:
        events = [(f"nvfp4/{layer}/{tensor}/{name}", float(value), self.step)
                  for layer, tensors in figures.items() for tensor, values in tensors.items()
                  for name, value in values.items() if math.isfinite(value)]
        self._log(events)

    def close(self) -> None:
        if self.loader is not None:
            self.loader.close()
        monitor = getattr(self.engine, "monitor", None)
        if monitor is not None:
            for m in getattr(monitor, "monitors", []) or []:
                writer = getattr(m, "summary_writer", None)
                if writer is not None:
                    writer.flush()

"""Scenarios run by real DeepSpeed engines on 2 gloo ranks, launched by torchrun from test_engine.py.

Usage: torchrun --standalone --nproc_per_node 2 engine_worker.py SCENARIO OUT_DIR
Each rank writes OUT_DIR/<scenario>.rank<r>.json; the tests read and judge them.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64), torch.nn.GELU(), torch.nn.Linear(64, 16)
    )


def ds_config(stage: int, nvfp4: dict | None, optimizer=("Adam", 1e-2), **zero) -> dict:
    cfg = {
        "train_batch_size": 16,
        "train_micro_batch_size_per_gpu": 8,
        "optimizer": {"type": optimizer[0], "params": {"lr": optimizer[1]}},
        "zero_optimization": {"stage": stage, **zero},
    }
    if nvfp4 is not None:
        cfg["nvfp4"] = nvfp4
    return cfg


def task(rank: int, step: int):
    data = torch.randn(512, 64, generator=torch.Generator().manual_seed(5))
    idx = torch.randint(0, 512, (8,), generator=torch.Generator().manual_seed(1000 * step + rank))
    x = data[idx]
    return x, torch.tanh(x[:, :16] * 2)


def full_params(engine) -> list[torch.Tensor]:
    import deepspeed

    params = list(engine.module.parameters())
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(params):
            return [p.detach().clone().float() for p in params]
    return [p.detach().clone().float() for p in params]


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def train(engine, steps: int) -> list[float]:
    losses = []
    for step in range(steps):
        x, y = task(dist.get_rank(), step)
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def scenario_train() -> dict:
    """Stages 0-3 x grad_comm none/nvfp4, plus the other stage-1/2 reduction paths, plus ZeRO-3 weight_comm."""
    import ds_fp4

    runs = {}
    variants = [(s, gc, {}) for s in (0, 1, 2, 3) for gc in ("none", "nvfp4")]
    variants += [(2, "nvfp4", {"use_multi_rank_bucket_allreduce": False}),  # reduce-to-owner seam
                 (1, "nvfp4", {"reduce_scatter": False})]  # gradient_reduction_w_predivide seam
    for stage, grad_comm, zero in variants:
        nv = {"grad_comm": grad_comm, "keep_first_blocks": 0, "keep_last_blocks": 0}
        engine, *_ = ds_fp4.initialize(model=mlp(), config=ds_config(stage, nv, **zero))
        losses = train(engine, 16)
        stats = engine.nvfp4.comm_stats()
        runs[f"stage{stage}-{grad_comm}" + "".join(f"-{k}={v}" for k, v in zero.items())] = {
            "losses": losses, "digest": digest(full_params(engine)), "stats": stats,
            "converted": len(engine.nvfp4.report.converted),
        }
    nv = {"grad_comm": "nvfp4", "weight_comm": "nvfp4", "keep_first_blocks": 0, "keep_last_blocks": 0}
    engine, *_ = ds_fp4.initialize(model=mlp(), config=ds_config(3, nv, stage3_param_persistence_threshold=0))
    losses = train(engine, 16)
    runs["stage3-weight_comm"] = {"losses": losses, "digest": digest(full_params(engine)),
                                  "stats": engine.nvfp4.comm_stats(), "converted": 3}
    return runs


def scenario_plain() -> dict:
    """The recipe disabled and grad_comm none must be plain DeepSpeed, bit for bit. An NVFP4-communicating
    engine of the same stage is built (and stepped) first and kept alive, so the seams are installed:
    the engines built after it must not inherit its collectives."""
    import deepspeed

    import ds_fp4

    out, keep = {}, []
    for stage in (0, 1, 2, 3):
        nvfp4, *_ = ds_fp4.initialize(model=mlp(), config=ds_config(stage, {"grad_comm": "nvfp4"}))
        train(nvfp4, 1)
        keep.append(nvfp4)
        engine, *_ = deepspeed.initialize(model=mlp(), config=ds_config(stage, None))
        plain = train(engine, 8)
        engine, *_ = ds_fp4.initialize(model=mlp(), config=ds_config(stage, {"enabled": False, "grad_comm": "none"}))
        ours = train(engine, 8)
        out[f"stage{stage}"] = {"plain": plain, "ds_fp4": ours,
                                "nvfp4_layers": len(engine.nvfp4.layers)}
    return out


def scenario_weight_gather() -> dict:
    """ZeRO-3 with weight_comm: what the forward sees, what a checkpoint gather sees, per NVFP4 layer.
    Run on 3 ranks, so the shards (ceil(numel / 3) elements) do not line up with 16-element blocks."""
    import deepspeed

    import ds_fp4

    world, rank = dist.get_world_size(), dist.get_rank()
    nv = {"grad_comm": "nvfp4", "weight_comm": "nvfp4", "keep_first_blocks": 0, "keep_last_blocks": 0}
    cfg = ds_config(3, nv, stage3_param_persistence_threshold=0)
    cfg["train_batch_size"] = 8 * world
    engine, *_ = ds_fp4.initialize(model=mlp(), config=cfg)
    seen = {}

    def grab(name):
        def hook(module, args):
            seen[name] = module.weight.detach().clone().float()
        return hook

    for m in engine.nvfp4.layers.values():  # DeepSpeed leaves partition tails uninitialized (torch.empty):
        tail = m.weight.ds_tensor.view(-1)      # make them as bad as that can be, every time
        valid = min(max(m.weight.ds_numel - rank * tail.numel(), 0), tail.numel())
        tail[valid:] = 1e30
    handles = [m.register_forward_pre_hook(grab(n)) for n, m in engine.nvfp4.layers.items()]
    with torch.no_grad():
        engine(task(rank, 0)[0])
    for h in handles:
        h.remove()
    out = {}
    for name, m in engine.nvfp4.layers.items():
        shard = m.weight.ds_tensor.detach().float()
        parts = [torch.empty_like(shard) for _ in range(world)]
        dist.all_gather(parts, shard)  # plain fp32 all-gather of the partitions: the exact weight
        exact = torch.cat(parts)[: m.weight.ds_numel].view(m.weight.ds_shape)
        with deepspeed.zero.GatheredParameters([m.weight]):  # what save_checkpoint / export gather
            gathered = m.weight.detach().clone().float()
        out[name] = {"shard_numel": shard.numel(), "checkpoint_gather_exact": torch.equal(gathered, exact),
                     "forward_rel_error": ((seen[name] - exact).norm() / exact.norm()).item()}
    out["losses"] = train(engine, 4)
    out["stats"] = engine.nvfp4.comm_stats()
    out["digest"] = digest(full_params(engine))
    return out


def scenario_unbiased() -> dict:
    """Repeat one step many times (Adam with lr 0 keeps the weights fixed) and collect the reduced gradient."""
    from deepspeed.utils import safe_get_full_grad

    import ds_fp4

    out = {}
    reps = 64
    # all-reduce (stage 0), reduce-to-owner (stage 2 without multi-rank buckets), reduce-scatter (stage 3)
    for stage, zero in ((0, {}), (2, {"use_multi_rank_bucket_allreduce": False}), (3, {})):
        grads = {}
        for grad_comm in ("none", "nvfp4"):
            nv = {"enabled": False, "grad_comm": grad_comm}
            engine, *_ = ds_fp4.initialize(model=mlp(), config=ds_config(stage, nv, optimizer=("Adam", 0.0), **zero))
            samples = []
            for _ in range(reps if grad_comm == "nvfp4" else 1):
                x, y = task(dist.get_rank(), 0)
                engine.backward(torch.nn.functional.mse_loss(engine(x), y))
                if stage == 0:
                    g = torch.cat([p.grad.reshape(-1).float() for p in engine.module.parameters()])
                else:
                    g = torch.cat([safe_get_full_grad(p).reshape(-1).float() for p in engine.module.parameters()])
                samples.append(g)
                engine.step()
            grads[grad_comm] = torch.stack(samples)
        exact = grads["none"][0]
        draws = grads["nvfp4"]
        out[f"stage{stage}"] = {"exact": exact.tolist(), "mean": draws.mean(0).tolist(),
                                "first": draws[0].tolist(), "std": draws.std(0).tolist(), "reps": reps}
    return out


def scenario_collectives() -> dict:
    """comm.py's collectives by themselves on 3 ranks: what each reduces to, and the bytes it counts.
    Relative errors are against the exact fp32 results; the worker does not judge them."""
    from ds_fp4 import comm
    from ds_fp4.deepspeed_patches import comm_seams as deepspeed_patches

    world, rank = dist.get_world_size(), dist.get_rank()
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(1000, generator=gen)  # 3 shards of 334, the last one 332 + 2 padding
    exact = x.clone()
    dist.all_reduce(exact)
    state = comm.CommState(seed=1)
    out = {}

    def record(name, stats, result=None, ref=None):
        s = stats.snapshot_and_reset()
        out[name] = {"bytes": [s.bytes_sent, s.bytes_baseline, s.bytes_bf16, s.calls]}
        if result is not None:
            out[name].update(rel_error=((result - ref).norm() / ref.norm()).item(), numel=result.numel())

    n = comm.chunk_size(x.numel(), world)
    ref = exact[rank * n : (rank + 1) * n]
    mine = comm.reduce_scatter(x, None, state, itemsize=4)
    record("reduce_scatter", state.grad_stats, mine[: ref.numel()], ref)
    out["reduce_scatter"].update(numel=mine.numel(), padding=mine[ref.numel() :].tolist())
    all_reduced = comm.all_reduce_(x.clone().bfloat16(), None, state, itemsize=2)
    record("all_reduce", state.grad_stats, all_reduced.float(), exact)
    reduced = comm.reduce_(x.clone(), 1, None, state, itemsize=4)  # only rank 1's result is specified
    record("reduce", state.grad_stats, *((reduced, exact) if rank == 1 else ()))
    parts = [torch.empty(37) for _ in range(world)]
    dist.all_gather(parts, x[:37].contiguous())
    gathered = comm.all_gather(x[:37], None, state, state.weight_stats, "nearest", itemsize=2)
    record("all_gather", state.weight_stats, gathered, torch.stack(parts))
    # ZeRO-3's coalesced reduce-scatter: this rank's chunk of each tensor, averaged over ranks.
    tensors = [torch.randn(k, generator=gen) for k in (100, 5, 48, 1)]
    sums = [t.clone() for t in tensors]
    for t in sums:
        dist.all_reduce(t)
    deepspeed_patches._grad_scatter.state = state
    try:
        pieces = deepspeed_patches._reduce_scatter_coalesced(tensors, None)
    finally:
        deepspeed_patches._grad_scatter.state = None
    chunks = [comm.chunk_size(t.numel(), world) for t in tensors]
    ref = torch.cat([t[rank * c : (rank + 1) * c] / world for t, c in zip(sums, chunks, strict=True)])
    record("coalesced", state.grad_stats, torch.cat(pieces), ref)
    out["coalesced"]["numels"] = [p.numel() for p in pieces]
    out["seeds_drawn"] = state.calls
    return out


def scenario_zero3_memory() -> dict:
    """Under ZeRO-3 the forward must not keep the gathered weight alive for backward (docs/design.md §5)."""
    import deepspeed

    import ds_fp4
    from ds_fp4 import NVFP4Linear
    from ds_fp4.linear import NVFP4LinearFunction

    cfg = ds_config(3, {"grad_comm": "nvfp4", "keep_first_blocks": 0, "keep_last_blocks": 0},
                    stage3_param_persistence_threshold=0, stage3_max_reuse_distance=0,
                    stage3_prefetch_bucket_size=0, stage3_max_live_parameters=0)
    cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"] = 4, 2
    with deepspeed.zero.Init(config_dict_or_path=cfg):
        model = tiny_llama()
    local_numel_under_init = sorted({p.numel() for p in model.parameters()})
    engine, *_ = ds_fp4.initialize(model=model, config=cfg)
    fp4 = {n: m for n, m in engine.module.named_modules() if isinstance(m, NVFP4Linear)}
    gathered = {}  # id(param) -> (storage pointer, values) while DeepSpeed has it gathered

    def remember(module, args):
        w = module.weight
        gathered[id(w)] = (w, w.untyped_storage().data_ptr(), w.detach().clone())

    for m in fp4.values():
        m.register_forward_pre_hook(remember)
    violations, params_saved = [], 0

    def pack(t):
        nonlocal params_saved
        if isinstance(t, torch.nn.Parameter) and hasattr(t, "ds_id"):
            params_saved += 1  # the Parameter object itself: DeepSpeed frees its storage by swapping .data
            return t
        for w, ptr, values in gathered.values():
            # Compare storages only while that weight is still gathered: freed memory gets reused.
            live = w.ds_status.name != "NOT_AVAILABLE" and w.untyped_storage().data_ptr() == ptr
            if live and t.numel() and t.untyped_storage().data_ptr() == ptr:
                violations.append(f"a view of a gathered weight, shape {tuple(t.shape)}")
            elif t.is_floating_point() and t.numel() == values.numel() and (
                    torch.equal(t.reshape(values.shape).float(), values.float())
                    or (t.dim() == 2 and torch.equal(t.t().reshape(values.shape).float(), values.float()))):
                violations.append(f"a copy of a gathered weight, shape {tuple(t.shape)}, dtype {t.dtype}")
        return t

    data = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(dist.get_rank()))
    losses, released = [], []
    for _ in range(4):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = engine(input_ids=data, labels=data).loss
        released.append(all(m.weight.ds_status.name == "NOT_AVAILABLE" and m.weight.data.numel() == 0
                            for m in fp4.values()))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())

    # The Function's own backward gathers a released weight, and releases it again.
    lin = next(iter(fp4.values()))
    w = lin.weight
    x = torch.randn(5, w.ds_shape[1], requires_grad=True)
    with deepspeed.zero.GatheredParameters([w]):
        y = NVFP4LinearFunction.apply(x, w, None, lin.recipe)
        full_w = w.detach().clone()
    status_before_backward = w.ds_status.name
    (dx,) = torch.autograd.grad(y.square().sum(), x)
    ref = (2 * y.detach()) @ full_w
    return {
        "released_after_forward": released, "violations": violations, "params_saved": params_saved,
        "converted": len(engine.nvfp4.report.converted), "losses": losses,
        "local_numel_under_init": local_numel_under_init,
        "status_before_backward": status_before_backward, "status_after_backward": w.ds_status.name,
        "dgrad_rel_err": ((dx - ref).norm() / ref.norm()).item(),
    }


def tiny_llama():
    # transformers is imported at the top: importing it inside zero.Init's patched tensor constructors fails.
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64))


def main() -> None:
    import deepspeed

    from ds_fp4 import deepspeed_patches

    scenario, out_dir = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    deepspeed_patches.disable_cpu_shm_comm()
    deepspeed.init_distributed(dist_backend="gloo")
    result = globals()[f"scenario_{scenario}"]()
    with open(os.path.join(out_dir, f"{scenario}.rank{dist.get_rank()}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

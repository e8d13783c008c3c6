"""The communication seams: every DeepSpeed collective that NVFP4 communication replaces (docs/design.md §5).

DeepSpeed has no communication-hook API, so NVFP4 communication replaces the functions through which
each ZeRO stage moves gradients and ZeRO-3 weights:

  stage 0     DeepSpeedEngine.allreduce_bucket                      all-reduce of a gradient bucket
  stage 1/2   DeepSpeedZeroOptimizer.allreduce_bucket               reduce-to-owner (reduce_scatter=true)
                                                                    or all-reduce of a bucket
              DeepSpeedZeroOptimizer.gradient_reduction_w_predivide all-reduce (reduce_scatter=false)
  stage 3     DeepSpeedZeroOptimizer_Stage3.__avg_scatter_grads     marks the reduction as this optimizer's
              stage3.reduce_scatter_coalesced                       gradient reduce-scatter
              partition_parameters._dist_allgather_fn               weight all-gather (weight_comm), used
              PartitionedParameterCoordinator.__all_gather_params_  only for NVFP4Linear weights
  CPU         comm.torch.build_shm_op                               turned off (disable_cpu_shm_comm)

Each replacement keeps the original's scaling rules (gradient_average, predivide factors, dtype round
trips) and swaps only the collective. It is inert unless the engine or optimizer it runs for carries an
NVFP4 CommState (``_ds_fp4_comm``), so installing the patches changes nothing for other engines.
:func:`install` is idempotent, logs once, and checks every seam first: if DeepSpeed moved one, it fails
with the supported range instead of training silently uncompressed.
"""

from __future__ import annotations

import functools
import logging
import threading
from importlib import import_module

import torch
import torch.distributed as dist

from .. import comm

SUPPORTED_DEEPSPEED = ">=0.19,<0.20"
log = logging.getLogger("ds_fp4")

# (module, attribute path) of every seam.
SEAMS = (
    ("deepspeed.runtime.engine", "DeepSpeedEngine.allreduce_bucket"),
    ("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer.allreduce_bucket"),
    ("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer.gradient_reduction_w_predivide"),
    ("deepspeed.runtime.zero.stage3",
     "DeepSpeedZeroOptimizer_Stage3._DeepSpeedZeroOptimizer_Stage3__avg_scatter_grads"),
    ("deepspeed.runtime.zero.stage3", "reduce_scatter_coalesced"),
    ("deepspeed.runtime.zero.partition_parameters", "_dist_allgather_fn"),
    ("deepspeed.runtime.zero.partitioned_param_coordinator",
     "PartitionedParameterCoordinator._PartitionedParameterCoordinator__all_gather_params_"),
)

_originals: dict[str, object] = {}
_lock = threading.Lock()
# Stage 3's module-level collectives have no `self`: the optimizer (or coordinator) method that calls
# them puts its CommState here for the duration of the call, so other engines stay on plain DeepSpeed.
_grad_scatter = threading.local()
_weight_gather = threading.local()


class SeamError(RuntimeError):
    """A DeepSpeed internal that ds_fp4 patches is missing or changed."""


def _resolve(module_name: str, path: str):
    owner = import_module(module_name)
    *parents, leaf = path.split(".")
    for name in parents:
        owner = getattr(owner, name)
    return owner, leaf


def check_seams() -> list[str]:
    """Names of the seams that do not exist in the installed DeepSpeed (empty when all is well)."""
    missing = []
    for module_name, path in SEAMS:
        try:
            owner, leaf = _resolve(module_name, path)
            if not callable(getattr(owner, leaf)):
                missing.append(f"{module_name}.{path}")
        except (ImportError, AttributeError):
            missing.append(f"{module_name}.{path}")
    return missing


def _require_seams() -> None:
    missing = check_seams()
    if missing:
        import deepspeed

        raise SeamError(
            f"ds_fp4's NVFP4 communication patches DeepSpeed internals that DeepSpeed {deepspeed.__version__} "
            f"does not have: {missing}. Supported DeepSpeed: {SUPPORTED_DEEPSPEED} "
            f"(pip install 'deepspeed{SUPPORTED_DEEPSPEED}'), or set \"grad_comm\": \"none\" and "
            "\"weight_comm\": \"none\" in the nvfp4 section."
        )


# Replacements -----------------------------------------------------------------------------------------
def _averaged_reduce(tensor, dtype, group, state, *, average: bool, postscale: bool, predivide: float,
                     world: int, sequence_parallel: float | None, dst: int | None = None) -> torch.Tensor:
    """DeepSpeed's gradient scaling around an NVFP4 all-reduce (or reduce to ``dst``), sent as ``dtype``.

    One body for the three stage 0-2 functions replaced below; the ways they differ are kept bit for
    bit. DeepSpeedZeroOptimizer divides by world / sequence_parallel_size, DeepSpeedEngine (which passes
    ``sequence_parallel`` None) by world; without postscale the optimizer divides by its divisor where
    the engine multiplies by 1 / world (which rounds differently when world is not a power of 2); the
    optimizer's allreduce_bucket has no postscale and may reduce to one rank. Returns the tensor sent;
    ``tensor`` gets the result where it lands (every rank, or ``dst``), as DeepSpeed's dtype round trip.
    """
    work = tensor if dtype == tensor.dtype else tensor.to(dtype)
    divisor = world if sequence_parallel is None else world / sequence_parallel
    if average and postscale:
        if predivide != 1.0:
            work.mul_(1.0 / predivide)
    elif average and sequence_parallel is None:
        work.mul_(1.0 / world)
    elif average:
        work.div_(divisor)
    if dst is None:
        comm.all_reduce_(work, group, state, work.dtype.itemsize)
    else:
        comm.reduce_(work, dst, group, state, work.dtype.itemsize)
    if average and postscale and predivide != world:
        work.mul_(predivide / divisor)
    if work is not tensor and (dst is None or dst == dist.get_rank(group=group)):
        tensor.copy_(work)
    return work


def _engine_allreduce_bucket(self, bucket, dp_group, dp_world_size=None):
    state = getattr(self, "_ds_fp4_comm", None)
    if state is None:
        return _originals["DeepSpeedEngine.allreduce_bucket"](self, bucket, dp_group, dp_world_size)
    tensor = self.flatten(bucket)
    _averaged_reduce(
        tensor, self.communication_data_type, dp_group, state, average=self.gradient_average,
        postscale=self.postscale_gradients(), predivide=self.gradient_predivide_factor(),
        world=dp_world_size if dp_world_size is not None else dist.get_world_size(group=dp_group),
        sequence_parallel=None)
    return tensor


def _zero_allreduce_bucket(self, bucket, communication_data_type, rank=None, log=None, divide=True,
                           process_group=None):
    state = getattr(self, "_ds_fp4_comm", None)
    if state is None:
        return _originals["DeepSpeedZeroOptimizer.allreduce_bucket"](
            self, bucket, communication_data_type, rank=rank, log=log, divide=divide, process_group=process_group)
    group = self.dp_process_group if process_group is None else process_group
    sequence_parallel = getattr(self, "sequence_parallel_size", 1)
    return _averaged_reduce(
        self.flatten(bucket), torch.float32 if sequence_parallel > 1 else communication_data_type, group, state,
        average=divide and self.gradient_average, postscale=False, predivide=1.0,
        world=dist.get_world_size(group=group), sequence_parallel=float(sequence_parallel), dst=rank)


def _zero_reduction_w_predivide(self, tensor, communication_data_type):
    state = getattr(self, "_ds_fp4_comm", None)
    if state is None or tensor.numel() == 0:
        return _originals["DeepSpeedZeroOptimizer.gradient_reduction_w_predivide"](
            self, tensor, communication_data_type)
    return _averaged_reduce(
        tensor, communication_data_type, self.dp_process_group, state, average=self.gradient_average,
        postscale=self.postscale_gradients, predivide=self.gradient_predivide_factor,
        world=dist.get_world_size(group=self.dp_process_group),
        sequence_parallel=float(getattr(self, "sequence_parallel_size", 1)))


def _stage3_avg_scatter_grads(self, params_to_reduce, communication_data_type):
    original = _originals["DeepSpeedZeroOptimizer_Stage3._DeepSpeedZeroOptimizer_Stage3__avg_scatter_grads"]
    _grad_scatter.state = getattr(self, "_ds_fp4_comm", None)
    try:
        return original(self, params_to_reduce, communication_data_type)
    finally:
        _grad_scatter.state = None


@torch.no_grad()
def _reduce_scatter_coalesced(tensors, group=None):
    state = getattr(_grad_scatter, "state", None)
    if state is None:
        return _originals["reduce_scatter_coalesced"](tensors, group)
    world, me = dist.get_world_size(group), dist.get_rank(group)
    # comm lays the tensors out as DeepSpeed does: rank r's shard holds chunk r of every tensor.
    mine = comm.reduce_scatter(tensors, group, state, tensors[0].dtype.itemsize)
    mine = (mine / world).to(tensors[0].dtype)  # the original pre-divides by the world size
    out, offset = [], 0
    for t in tensors:
        chunk = comm.chunk_size(t.numel(), world)
        out.append(mine.narrow(0, offset, max(0, min(chunk, t.numel() - me * chunk))))
        offset += chunk
    return out


class _DoneHandle:
    """The async-work handle DeepSpeed expects from an all-gather that already completed."""

    def wait(self, *args, **kwargs) -> None:
        return None

    def is_completed(self) -> bool:
        return True


def _dist_allgather_fn(input_tensor, output_tensor, group=None):
    state = getattr(_weight_gather, "state", None)
    if state is None:
        return _originals["_dist_allgather_fn"](input_tensor, output_tensor, group=group)
    world = dist.get_world_size(group)
    n = input_tensor.numel()
    gathered = comm.all_gather(input_tensor, group, state, state.weight_stats, "nearest",
                               input_tensor.dtype.itemsize)
    output_tensor.view(world, n).copy_(gathered)
    return _DoneHandle()


def _zero_shard_padding(params) -> None:
    """Zero the tail of each partition that lies past the parameter's end.

    DeepSpeed allocates a partition with torch.empty and fills only the parameter's own elements, so the
    last ranks' tails hold garbage (and Adam keeps updating it). A plain all-gather drops the tail; an
    NVFP4 gather quantizes the whole shard under one amax, and a garbage tail would wreck the scale of the
    shard's real values (seen: 0.59 relative error on the last rank's shard with 3 ranks).
    """
    for p in params:
        part = p.ds_tensor
        size = part.numel()
        valid = min(max(p.ds_numel - dist.get_rank(group=p.ds_process_group) * size, 0), size)
        if valid < size:
            part.data.view(-1)[valid:].zero_()


def _coordinator_all_gather_params_(self, params, forward, quantize=False):
    original = _originals["PartitionedParameterCoordinator._PartitionedParameterCoordinator__all_gather_params_"]
    fp4 = [p for p in params if getattr(p, "_ds_fp4_weight_comm", None) is not None]
    if not fp4:
        return original(self, params, forward, quantize=quantize)
    rest = [p for p in params if getattr(p, "_ds_fp4_weight_comm", None) is None]
    if rest:
        original(self, rest, forward, quantize=quantize)
    _zero_shard_padding(fp4)
    _weight_gather.state = fp4[0]._ds_fp4_weight_comm
    try:
        original(self, fp4, forward, quantize=False)
    finally:
        _weight_gather.state = None


_REPLACEMENTS = {
    "DeepSpeedEngine.allreduce_bucket": _engine_allreduce_bucket,
    "DeepSpeedZeroOptimizer.allreduce_bucket": _zero_allreduce_bucket,
    "DeepSpeedZeroOptimizer.gradient_reduction_w_predivide": _zero_reduction_w_predivide,
    "DeepSpeedZeroOptimizer_Stage3._DeepSpeedZeroOptimizer_Stage3__avg_scatter_grads": _stage3_avg_scatter_grads,
    "reduce_scatter_coalesced": _reduce_scatter_coalesced,
    "_dist_allgather_fn": _dist_allgather_fn,
    "PartitionedParameterCoordinator._PartitionedParameterCoordinator__all_gather_params_":
        _coordinator_all_gather_params_,
}


def install() -> bool:
    """Patch every seam once (idempotent). Returns True if this call installed them."""
    with _lock:
        if _originals:
            return False
        _require_seams()
        for module_name, path in SEAMS:
            owner, leaf = _resolve(module_name, path)
            _originals[path] = getattr(owner, leaf)
            replacement = _REPLACEMENTS[path]
            functools.update_wrapper(replacement, _originals[path], updated=())
            setattr(owner, leaf, replacement)
        log.info("ds_fp4: installed NVFP4 communication seams in %d DeepSpeed functions", len(SEAMS))
        return True


def installed() -> bool:
    return bool(_originals)


def uninstall() -> None:
    """Restore DeepSpeed's originals (tests use this to compare against plain DeepSpeed)."""
    with _lock:
        for module_name, path in SEAMS:
            if path in _originals:
                owner, leaf = _resolve(module_name, path)
                setattr(owner, leaf, _originals.pop(path))


_SHM_SEAM = ("deepspeed.comm.torch", "build_shm_op")


def disable_cpu_shm_comm() -> None:
    """Stop DeepSpeed from building and starting its CPU shared-memory all-reduce op.

    DeepSpeed uses that op only for inference all-reduces, but starts it in every CPU process group,
    and a torchrun restart then fails: the new group's gloo ranks connect to the previous attempt's
    addresses (seen with DeepSpeed 0.19.8; plain torch.distributed restarts fine). Training never uses
    it, and skipping it also saves its ~60 s JIT build on a fresh machine. Call before init_distributed.
    """
    try:
        owner, leaf = _resolve(*_SHM_SEAM)
        getattr(owner, leaf)
    except (ImportError, AttributeError) as e:
        raise SeamError(f"deepspeed.comm.torch.build_shm_op is gone ({e}); supported DeepSpeed: "
                        f"{SUPPORTED_DEEPSPEED}") from e
    setattr(owner, leaf, lambda: None)  # DeepSpeed's own "op not available" answer


def activate_grad_comm(engine, state: comm.CommState | None) -> None:
    """Route this engine's gradient reduction through NVFP4 collectives (``state``), or not (None).

    With None nothing is patched (a DeepSpeed outside the supported range still trains uncompressed);
    an engine whose seams were installed for another engine stays on DeepSpeed's own collectives.
    """
    if state is not None:
        install()
    engine._ds_fp4_comm = state
    optimizer = getattr(engine, "optimizer", None)
    if optimizer is not None:
        optimizer._ds_fp4_comm = state


def activate_weight_comm(params, state: comm.CommState | None) -> int:
    """Gather these ZeRO-3 parameters (NVFP4Linear weights) as NVFP4 (``state``), or exactly (None).
    Returns how many ZeRO-3 parameters were set."""
    if state is not None:
        install()
    n = 0
    for p in params:
        if hasattr(p, "ds_id"):
            p._ds_fp4_weight_comm = state
            n += 1
    return n

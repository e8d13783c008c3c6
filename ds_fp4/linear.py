"""NVFP4Linear: an nn.Linear whose three GEMMs run in NVFP4 (paper §4, docs/design.md §3).

    fprop  Y  = X  W^T    X: input policy (1x16 nearest)     W:   weight policy (16x16 nearest)
    dgrad  dX = dY W      dY: grad policy (1x16 stochastic)  W^T: the same 16x16 quantization, transposed
    wgrad  dW = dY^T X    dY^T: grad policy + RHT            X^T: input policy + RHT

Each GEMM multiplies two NVFP4 tensors quantized along their shared (dot-product) dimension, with fp32
accumulation; the output comes back in the input's dtype (dW in the weight's). The bias and its
gradient stay in high precision.

Why one autograd.Function and not a tensor subclass: the three GEMMs need three different
quantizations of the same tensors (X along K for fprop, X^T along tokens for wgrad), and writing them
out in forward/backward keeps every choice visible (torchao's float8 authors made the same call).

Memory: forward saves the wgrad operand X^T already quantized (4.5 bits per element instead of 16),
and, unless the weight is ZeRO-3 partitioned, the quantized W^T, so backward quantizes only dY.
Under ZeRO-3 (docs/design.md §5) the Parameter itself goes into ``apply`` and nothing derived from the gathered
weight is saved: backward gathers it again if DeepSpeed released it, re-quantizes (round-to-nearest
is deterministic, so W^T is bit-identical to forward's), and re-partitions in a ``finally``.

Stochastic rounding seeds are drawn per call from torch's CPU generator, so ``torch.manual_seed`` and
a checkpointed RNG state reproduce a run exactly.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from . import nvfp4, rng
from .recipe import NVFP4Recipe


class StatsSink(Protocol):
    """Where a layer reports the tensors it quantized: ds_fp4.stats.LayerStats, installed by collect_stats.

    A protocol rather than an import, so that the layer does not depend on the statistics that observe it.
    """

    def record(self, role: str, x: torch.Tensor, q: nvfp4.NVFP4Tensor, *, replace: bool = True) -> None: ...


def _pack(t: nvfp4.NVFP4Tensor | None) -> tuple[list[torch.Tensor], tuple | None]:
    if t is None:
        return [], None
    return [t.data, t.scale, t.amax], (t.shape, t.tile, t.hadamard_signs)


def _unpack(tensors: list[torch.Tensor], meta: tuple | None) -> nvfp4.NVFP4Tensor | None:
    if meta is None:
        return None
    shape, tile, signs = meta
    return nvfp4.NVFP4Tensor(*tensors, shape=shape, tile=tile, hadamard_signs=signs)


def _pad_rows(t: torch.Tensor, multiple: int = nvfp4.BLOCK) -> torch.Tensor:
    """Zero rows up to a multiple of 16: the token dim is the wgrad dot dim; zeros add nothing."""
    pad = -t.shape[0] % multiple
    return F.pad(t, (0, 0, 0, pad)) if pad else t


def quantize_weight_operands(
    weight: torch.Tensor, recipe: NVFP4Recipe, need_transpose: bool
) -> tuple[nvfp4.NVFP4Tensor, nvfp4.NVFP4Tensor | None]:
    """W for fprop and, if asked, W^T for dgrad, following the weight policy."""
    policy = recipe.weight
    if policy.tile == (16, 16) and policy.rounding == "nearest" and need_transpose:
        return nvfp4.quantize_weight(weight, backend=recipe.backend)
    wq = nvfp4.quantize(weight, tile=policy.tile, rounding=policy.rounding, backend=recipe.backend)
    if not need_transpose:
        return wq, None
    if policy.tile == (16, 16):  # stochastic 16x16: transpose the very same draw
        return wq, wq.t()
    # 1x16 weights (the no_2d ablation): W^T needs its own blocks along N, so it decodes differently.
    wq_t = nvfp4.quantize(weight.t(), tile=policy.tile, rounding=policy.rounding, backend=recipe.backend)
    return wq, wq_t


@contextlib.contextmanager
def _gathered(weight: torch.Tensor):
    """Make a ZeRO-3 partitioned weight available for the duration of the block (docs/design.md §5)."""
    status = getattr(weight, "ds_status", None)
    if status is None or status.name != "NOT_AVAILABLE":
        yield weight
        return
    weight.all_gather()
    try:
        yield weight
    finally:
        weight.partition()


def fprop(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, recipe: NVFP4Recipe,
          need_dgrad: bool, need_wgrad: bool, keep_wt: bool, stats_sink: StatsSink | None = None):
    """Y = X W^T (+ b) in fp32 for a 2D input, and the backward operands: X^T quantized for wgrad (with
    the RHT) when ``need_wgrad``, W^T quantized for dgrad when ``need_dgrad and keep_wt``."""
    wq, wq_t = quantize_weight_operands(weight, recipe, need_transpose=need_dgrad and keep_wt)
    xq = nvfp4.quantize(x2, tile=recipe.input.tile, rounding=recipe.input.rounding, backend=recipe.backend)
    if stats_sink is not None:
        stats_sink.record("input", x2, xq)
        stats_sink.record("weight", weight, wq)
    y = nvfp4.matmul(xq, wq, out_dtype=torch.float32, backend=recipe.backend)
    if bias is not None:
        y = y + bias.to(torch.float32)
    xq_t = None
    if need_wgrad:
        policy = recipe.input
        xq_t = nvfp4.quantize(
            _pad_rows(x2).t(),
            tile=policy.tile,
            rounding=policy.rounding,
            hadamard=recipe.hadamard_signs if policy.hadamard else False,
            backend=recipe.backend,
        )
    return y, xq_t, wq_t


def dgrad(dy2: torch.Tensor, wq_t: nvfp4.NVFP4Tensor, recipe: NVFP4Recipe, out_dtype: torch.dtype,
          stats_sink: StatsSink | None = None) -> torch.Tensor:
    """dX = dY W for a 2D dY, with dY quantized by the grad policy (stochastic rounding)."""
    grad = recipe.grad
    dyq = nvfp4.quantize(dy2, tile=grad.tile, rounding=grad.rounding, seed=rng.draw_seed(), backend=recipe.backend)
    if stats_sink is not None:
        stats_sink.record("grad", dy2, dyq)
    return nvfp4.matmul(dyq, wq_t, out_dtype=out_dtype, backend=recipe.backend)


def wgrad(dy2: torch.Tensor, xq_t: nvfp4.NVFP4Tensor, recipe: NVFP4Recipe, out_dtype: torch.dtype,
          stats_sink: StatsSink | None = None) -> torch.Tensor:
    """dW = dY^T X, both operands quantized along the token dim (dY^T by the grad policy, with the RHT)."""
    grad = recipe.grad
    dy2_t = _pad_rows(dy2).t()
    dyq_t = nvfp4.quantize(
        dy2_t,
        tile=grad.tile,
        rounding=grad.rounding,
        hadamard=recipe.hadamard_signs if grad.hadamard else False,
        seed=rng.draw_seed(),
        backend=recipe.backend,
    )
    if stats_sink is not None:  # dgrad's dY, when there is one, stays the recorded figure
        stats_sink.record("grad", dy2_t, dyq_t, replace=False)
    return nvfp4.matmul(dyq_t, xq_t, out_dtype=out_dtype, backend=recipe.backend)


class NVFP4LinearFunction(torch.autograd.Function):
    """y = x W^T + b with NVFP4 fprop, dgrad and wgrad.

    ``grad_enabled`` is torch.is_grad_enabled() at the call: forward itself always runs without grad,
    and ``ctx.needs_input_grad`` says only which inputs require grad, so under torch.no_grad it would
    still quantize and save the backward operands (X^T with the RHT, W^T) for a backward that never runs.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, recipe: NVFP4Recipe,
                stats_sink: StatsSink | None = None, grad_enabled: bool = True):
        in_features = weight.shape[1]
        x2 = x.reshape(-1, in_features)
        need_dgrad = grad_enabled and ctx.needs_input_grad[0]
        need_wgrad = grad_enabled and ctx.needs_input_grad[1]
        zero3 = hasattr(weight, "ds_id")
        y, xq_t, wq_t = fprop(x2, weight, bias, recipe, need_dgrad, need_wgrad, not zero3, stats_sink)
        y = y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])
        x_parts, ctx.x_meta = _pack(xq_t)
        w_parts, ctx.w_meta = _pack(wq_t)
        ctx.n_x = len(x_parts)
        ctx.save_for_backward(*x_parts, *w_parts, weight if zero3 else None)
        ctx.recipe, ctx.zero3, ctx.has_bias, ctx.stats_sink = recipe, zero3, bias is not None, stats_sink
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        saved = ctx.saved_tensors
        recipe: NVFP4Recipe = ctx.recipe
        xq_t = _unpack(list(saved[: ctx.n_x]), ctx.x_meta)
        wq_t = _unpack(list(saved[ctx.n_x : -1]), ctx.w_meta)
        weight = saved[-1]
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            if wq_t is None:  # ZeRO-3: re-gather and re-quantize; nothing gathered was saved
                with _gathered(weight) as w:
                    _, wq_t = quantize_weight_operands(w, recipe, need_transpose=True)
            dx = dgrad(dy2, wq_t, recipe, ctx.x_dtype, ctx.stats_sink).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            dw = wgrad(dy2, xq_t, recipe, ctx.weight_dtype, ctx.stats_sink)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.to(torch.float32).sum(0).to(ctx.bias_dtype)
        return dx, dw, db, None, None, None


class NVFP4Linear(nn.Linear):
    """nn.Linear with NVFP4 GEMMs. ``nvfp4_active = False`` runs the plain high-precision layer
    (used to switch a model to BF16 for the end of training, paper App. D)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 recipe: NVFP4Recipe | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup_nvfp4(recipe)

    def _setup_nvfp4(self, recipe: NVFP4Recipe | None) -> None:
        recipe = recipe if recipe is not None else NVFP4Recipe()
        check_linear_dims(self.in_features, self.out_features, recipe)
        self.recipe = recipe
        self.nvfp4_active = True
        self.stats_sink: StatsSink | None = None  # set by ds_fp4.stats.collect_stats

    @classmethod
    def from_float(cls, mod: nn.Linear, recipe: NVFP4Recipe | None = None) -> NVFP4Linear:
        """Wrap ``mod`` without copying: the new module shares its Parameters (ZeRO-3 partitioned ones
        included, whose local shape is not the logical one) and keeps its hooks and training flag."""
        if not isinstance(mod, nn.Linear):
            raise TypeError(f"from_float expects an nn.Linear; got {type(mod).__name__}")
        new = cls.__new__(cls)
        new.__dict__.update(mod.__dict__)
        for name in ("_parameters", "_buffers", "_modules"):
            new.__dict__[name] = dict(mod.__dict__[name])
        new._setup_nvfp4(recipe)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.nvfp4_active:
            return F.linear(x, self.weight, self.bias)
        return NVFP4LinearFunction.apply(x, self.weight, self.bias, self.recipe, self.stats_sink,
                                         torch.is_grad_enabled())

    def extra_repr(self) -> str:
        r = self.recipe
        return (f"{super().extra_repr()}, nvfp4={'on' if self.nvfp4_active else 'off'}, "
                f"weight={r.weight.tile}, grad={r.grad.rounding}, rht={r.grad.hadamard}")


def check_linear_dims(in_features: int, out_features: int, recipe: NVFP4Recipe) -> None:
    """NVFP4 blocks run along both weight dims (fprop along K, dgrad along N): both must divide by 16."""
    for name, value in (("in_features", in_features), ("out_features", out_features)):
        if value % nvfp4.BLOCK:
            raise ValueError(
                f"NVFP4Linear needs {name} divisible by {nvfp4.BLOCK}; got {name}={value}. "
                "Keep this layer in high precision (convert_to_nvfp4 does so automatically)."
            )

"""NVFP4 for the fused MoE experts of transformers (Qwen3-MoE, Mixtral, DeepSeek-V3, gpt-oss, Nemotron-H...).

In transformers 5 the experts of a sparse MoE block are one module holding 3-D Parameters, not a list
of nn.Linear: ``gate_up_proj`` [E, 2I, H] (or ``up_proj`` [E, I, H] without a gate), ``down_proj``
[E, H, I], optional biases [E, out], or all of them stored transposed ([E, in, out], gpt-oss). Such a
module's forward dispatches, through ``transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS``, to the
implementation named by ``config._experts_implementation``. This module registers one more,
``"ds_fp4_nvfp4"``, and ``convert_to_nvfp4`` selects it; no model code is forked, and the model's own
gating (``_apply_gate``: SiLU-and-multiply, gpt-oss's clamped gate on interleaved columns...), activation
and post-expert norm are called as the model defines them.

Per expert, both projections follow NVFP4Linear's recipe exactly (linear.fprop / dgrad / wgrad): the
expert's weight is quantized on its own (its own amax, 16x16 blocks), its tokens 1x16, dY with
stochastic rounding, and the wgrad operands along the token dim with the RHT, zero-padded to a multiple
of 16 tokens. An expert that receives no token is skipped (its gradient is zero). The loop over experts
reuses the dense kernels; a grouped single-launch kernel is left for when a GPU shows what it is worth.

Under ZeRO-3 the 3-D Parameter itself is saved for backward, which gathers it again if DeepSpeed released
it and re-quantizes (nearest rounding: bit-identical to forward); nothing derived from it is kept.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .linear import _gathered, _pack, _unpack, dgrad, fprop, quantize_weight_operands, wgrad
from .nvfp4 import BLOCK
from .recipe import NVFP4Recipe

IMPLEMENTATION = "ds_fp4_nvfp4"
TOP_K_ATTRS = ("num_experts_per_tok", "top_k", "moe_top_k", "num_experts_per_token", "moe_k")


PREVIOUS_ATTR = "_ds_fp4_previous_experts_implementation"  # on the model config


@dataclass
class ExpertsState:
    """Attached to a converted experts module as ``_ds_fp4``."""

    recipe: NVFP4Recipe
    active: bool = True
    stats_sink: object | None = None


def is_fused_experts(mod: nn.Module) -> bool:
    """A transformers experts module routed through the experts-implementation registry."""
    forward = getattr(type(mod), "forward", None)
    down = getattr(mod, "down_proj", None)
    return (hasattr(forward, "__wrapped__") and hasattr(mod, "has_gate") and hasattr(mod, "is_transposed")
            and isinstance(down, nn.Parameter) and len(getattr(down, "ds_shape", None) or down.shape) == 3
            and hasattr(getattr(mod, "config", None), "_experts_implementation"))


def projections(mod: nn.Module) -> list[tuple[str, nn.Parameter, nn.Parameter | None]]:
    """(name, 3-D weight, bias or None) of the up (gate_up or up) and down projections, in call order."""
    up = "gate_up_proj" if mod.has_gate else "up_proj"
    has_bias = getattr(mod, "has_bias", False)
    return [(name, getattr(mod, name), getattr(mod, f"{name}_bias", None) if has_bias else None)
            for name in (up, "down_proj")]


def logical_shape(mod: nn.Module, weight: torch.Tensor) -> tuple[int, int, int]:
    """[E, out, in] of a (possibly transposed, possibly ZeRO-3 partitioned) expert weight."""
    shape = tuple(getattr(weight, "ds_shape", None) or weight.shape)
    e, a, b = shape
    return (e, b, a) if mod.is_transposed else (e, a, b)


def top_k(mod: nn.Module, default: int = 1) -> int:
    """Experts each token runs through, from the model config (num_experts_per_tok and its aliases)."""
    for attr in TOP_K_ATTRS:
        value = getattr(mod.config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def _expert_weight(weight: torch.Tensor, e: int, transposed: bool) -> torch.Tensor:
    w = weight[e]
    return w.t().contiguous() if transposed else w


class NVFP4ExpertsFunction(torch.autograd.Function):
    """y[rows of expert e] = x[rows of e] W_e^T (+ b_e) for tokens sorted by expert, in NVFP4.

    counts: tokens per expert (Python ints, summing to x.shape[0]); weight [E, out, in], or [E, in, out]
    when ``transposed``; bias [E, out] or None.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, counts: list[int],
                transposed: bool, recipe: NVFP4Recipe, stats_sink=None, grad_enabled: bool = True):
        out_features = weight.shape[2] if transposed else weight.shape[1]
        need_dgrad = grad_enabled and ctx.needs_input_grad[0]
        need_wgrad = grad_enabled and ctx.needs_input_grad[1]
        zero3 = hasattr(weight, "ds_id")
        y = x.new_empty((x.shape[0], out_features), dtype=torch.float32)
        saved, metas, start = [], [], 0
        for e, n in enumerate(counts):
            if n == 0:
                metas.append(None)
                continue
            w = _expert_weight(weight, e, transposed)
            b = bias[e] if bias is not None else None
            y_e, xq_t, wq_t = fprop(x[start:start + n], w, b, recipe, need_dgrad, need_wgrad, not zero3, stats_sink)
            y[start:start + n] = y_e
            x_parts, x_meta = _pack(xq_t)
            w_parts, w_meta = _pack(wq_t)
            metas.append((len(saved), len(x_parts), x_meta, len(w_parts), w_meta))
            saved += x_parts + w_parts
            start += n
        if start != x.shape[0]:
            raise ValueError(f"expert token counts sum to {start}, but the input has {x.shape[0]} rows")
        ctx.save_for_backward(*saved, weight if zero3 else None)
        ctx.metas, ctx.counts, ctx.transposed = metas, counts, transposed
        ctx.recipe, ctx.stats_sink = recipe, stats_sink
        ctx.x_dtype, ctx.weight_shape, ctx.weight_dtype = x.dtype, weight.shape, weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        saved = ctx.saved_tensors
        weight = saved[-1]
        recipe, transposed = ctx.recipe, ctx.transposed
        want_dx, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_db = ctx.bias_dtype is not None and ctx.needs_input_grad[2]
        in_features = ctx.weight_shape[1] if transposed else ctx.weight_shape[2]
        dx = dy.new_empty((dy.shape[0], in_features), dtype=ctx.x_dtype) if want_dx else None
        dw = torch.zeros(ctx.weight_shape, dtype=ctx.weight_dtype, device=dy.device) if want_dw else None
        db = torch.zeros((len(ctx.counts), dy.shape[1]), dtype=ctx.bias_dtype, device=dy.device) if want_db else None
        # ZeRO-3: only dgrad needs the weight again (wgrad uses the saved X^T)
        with _gathered(weight) if weight is not None and want_dx else contextlib.nullcontext():
            start = 0
            for e, n in enumerate(ctx.counts):
                if n == 0:
                    continue
                at, n_x, x_meta, n_w, w_meta = ctx.metas[e]
                dy_e = dy[start:start + n]
                if want_dx:
                    wq_t = _unpack(list(saved[at + n_x:at + n_x + n_w]), w_meta)
                    if wq_t is None:  # ZeRO-3: re-quantize the gathered weight
                        _, wq_t = quantize_weight_operands(_expert_weight(weight, e, transposed), recipe, True)
                    dx[start:start + n] = dgrad(dy_e, wq_t, recipe, ctx.x_dtype, ctx.stats_sink)
                if want_dw:
                    dw_e = wgrad(dy_e, _unpack(list(saved[at:at + n_x]), x_meta), recipe, ctx.weight_dtype,
                                 ctx.stats_sink)
                    dw[e] = dw_e.t() if transposed else dw_e
                if want_db:
                    db[e] = dy_e.to(torch.float32).sum(0).to(ctx.bias_dtype)
                start += n
        return dx, dw, db, None, None, None, None, None


def _route(top_k_index: torch.Tensor, num_experts: int):
    """Token-expert pairs sorted by expert: (order over the T*k pairs, the token of each sorted pair,
    tokens per expert). Pairs routed to an expert id outside [0, E) (expert-parallel sentinels) are
    dropped."""
    t, k = top_k_index.shape
    ids = top_k_index.reshape(-1)
    valid = (ids >= 0) & (ids < num_experts)
    order = torch.argsort(torch.where(valid, ids, num_experts), stable=True)
    counts = torch.bincount(ids[valid], minlength=num_experts).tolist()
    order = order[: sum(counts)]
    token = torch.div(order, k, rounding_mode="floor")
    return order, token, counts


def nvfp4_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
    """The ``"ds_fp4_nvfp4"`` experts implementation (registered with transformers on import of
    ds_fp4.convert). Modules not converted, or switched off, run the implementation they had before."""
    state: ExpertsState | None = getattr(self, "_ds_fp4", None)
    if state is None or not state.active:
        return _fallback(self)(self, hidden_states, top_k_index, top_k_weights)
    num_experts = logical_shape(self, self.down_proj)[0]
    t, hidden = hidden_states.shape
    k = top_k_index.shape[-1]
    order, token, counts = _route(top_k_index, num_experts)
    grad_enabled = torch.is_grad_enabled()
    (up_name, up_w, up_b), (_, down_w, down_b) = projections(self)
    x = hidden_states[token]
    h = NVFP4ExpertsFunction.apply(x, up_w, up_b, counts, self.is_transposed, state.recipe, state.stats_sink,
                                   grad_enabled)
    h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
    y = NVFP4ExpertsFunction.apply(h, down_w, down_b, counts, self.is_transposed, state.recipe, state.stats_sink,
                                   grad_enabled)
    if getattr(self, "has_post_expert_norm", False):
        y = self.post_expert_norm(y)
    y = y.to(torch.float32) * top_k_weights.reshape(-1)[order].unsqueeze(-1).to(torch.float32)
    # Back to (token, slot) order and a sum over the k slots in fp32: deterministic, unlike index_add_.
    pairs = y.new_zeros((t * k, hidden)).index_copy(0, order, y)
    return pairs.view(t, k, hidden).sum(dim=1).to(hidden_states.dtype)


def _fallback(mod: nn.Module):
    """What a module not in NVFP4 runs: the implementation the model was set to before conversion."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    previous = getattr(mod.config, PREVIOUS_ATTR, None)
    if previous not in (None, "eager", IMPLEMENTATION) and previous in ALL_EXPERTS_FUNCTIONS:
        return ALL_EXPERTS_FUNCTIONS[previous]
    return type(mod).forward.__wrapped__  # the model's own (eager) forward


def register() -> bool:
    """Register the implementation with transformers; False when transformers has no experts registry."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return False
    ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, nvfp4_experts_forward)
    return True


def experts_dims_reason(mod: nn.Module) -> str | None:
    """Why the experts cannot run in NVFP4 (a dim not divisible by 16), or None."""
    bad = []
    for name, weight, _ in projections(mod):
        _, out_f, in_f = logical_shape(mod, weight)
        bad += [f"{name} {d}={v}" for d, v in (("out", out_f), ("in", in_f)) if v % BLOCK]
    return f"{', '.join(bad)} not divisible by {BLOCK}" if bad else None


def convert_experts(mod: nn.Module, recipe: NVFP4Recipe) -> None:
    """Switch one experts module to NVFP4: the model config selects the ds_fp4 implementation, which
    runs converted modules in NVFP4 and the others as before."""
    if not register():
        raise RuntimeError("fused experts need transformers >= 5 (transformers.integrations.moe)")
    config = mod.config
    if config._experts_implementation != IMPLEMENTATION:
        setattr(config, PREVIOUS_ATTR, config._experts_implementation)
        config._experts_implementation = IMPLEMENTATION
    if getattr(mod, "_ds_fp4", None) is None:
        mod._ds_fp4 = ExpertsState(recipe)

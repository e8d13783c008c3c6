"""convert_to_nvfp4: swap eligible nn.Linear layers for NVFP4Linear and switch fused MoE experts to NVFP4,
in place, and say why not for the rest.

Which layers stay in high precision is part of the recipe (paper §4.1: keeping roughly the first and
last blocks in BF16 is what keeps a 12B run stable). "Blocks" are the entries of the model's longest
outermost nn.ModuleList whose entries share one class: ``model.layers`` for Hugging Face Llama-style,
MoE and Nemotron-H models (one mixer per layer), ``transformer.h`` for GPT-2. A list of experts lies
inside a block and is never taken for the blocks. That rule needs no per-architecture table.

Fused experts (transformers 5 modules with 3-D ``gate_up_proj``/``down_proj`` Parameters) run through
ds_fp4.experts; the report lists each projection as [E experts x out x in] with the experts active per
token, and gives the NVFP4 share by parameters and by weight FLOPs per token.

Never converted: the output projection (lm_head / the module ``get_output_embeddings()`` returns, or a
Linear whose weight is tied to an nn.Embedding) and layers whose dims do not divide by 16. Every other
matrix weight used in a matmul that is not an nn.Linear (routers, convolutions) is listed in the report
with its reason. Embeddings, norms and attention's batched GEMMs are left alone by construction.

The swap reuses the existing Parameters (see NVFP4Linear.from_float), so it works on models built
under ``deepspeed.zero.Init``, where a Linear's local weight is an empty partition. Convert before
``deepspeed.initialize``: DeepSpeed registers its ZeRO hooks on the modules it finds then.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from . import experts
from .linear import NVFP4Linear
from .nvfp4 import BLOCK
from .recipe import NVFP4Recipe


@dataclass
class LayerDecision:
    """What happened to one nn.Linear, or to one projection of a fused-experts module ([E, out, in])."""

    name: str
    in_features: int
    out_features: int
    converted: bool
    reason: str
    block: int | None = None
    experts: int = 0  # E for a fused-experts projection, 0 for an nn.Linear
    active: int = 1  # experts each token runs through (top-k); 1 for an nn.Linear

    @property
    def params(self) -> int:
        return self.in_features * self.out_features * max(self.experts, 1)

    @property
    def flops_per_token(self) -> int:
        """2 x in x out per token through the layer; a token runs through ``active`` of the experts."""
        return 2 * self.in_features * self.out_features * self.active

    @property
    def shape(self) -> str:
        dims = f"{self.out_features}x{self.in_features}"
        return f"{self.experts} experts x {dims}, {self.active} per token" if self.experts else dims


@dataclass
class HighPrecisionWeight:
    """A weight used in a matmul that is neither an nn.Linear nor a fused-experts projection (a router,
    a convolution...): it runs in high precision; counted in the FLOPs share as used once per token."""

    name: str
    shape: tuple[int, ...]
    reason: str

    @property
    def params(self) -> int:
        return math.prod(self.shape)

    @property
    def flops_per_token(self) -> int:
        return 2 * self.params


@dataclass
class ConversionReport:
    """Every nn.Linear of the model: converted to NVFP4, or kept in high precision and why."""

    layers: list[LayerDecision] = field(default_factory=list)
    blocks_path: str | None = None
    num_blocks: int = 0
    others: list[HighPrecisionWeight] = field(default_factory=list)

    @property
    def converted(self) -> list[str]:
        return [d.name for d in self.layers if d.converted]

    @property
    def kept(self) -> dict[str, str]:
        return {d.name: d.reason for d in self.layers if not d.converted}

    @property
    def converted_fraction(self) -> float:
        """Fraction of linear and expert weights (by parameter count) that run in NVFP4."""
        total = sum(d.params for d in self.layers)
        return sum(d.params for d in self.layers if d.converted) / total if total else 0.0

    @property
    def param_fraction(self) -> float:
        """Fraction of all matmul weights (linear, experts, routers, ...) by parameter count in NVFP4."""
        total = sum(d.params for d in self.layers) + sum(o.params for o in self.others)
        return sum(d.params for d in self.layers if d.converted) / total if total else 0.0

    @property
    def flops_fraction(self) -> float:
        """Fraction of the weight-GEMM FLOPs per token that run in NVFP4, counting ``active`` experts per
        token for MoE layers. Attention's score GEMMs and the Mamba scan (sequence-length dependent, not
        weight GEMMs) are not counted."""
        total = sum(d.flops_per_token for d in self.layers) + sum(o.flops_per_token for o in self.others)
        return sum(d.flops_per_token for d in self.layers if d.converted) / total if total else 0.0

    def __str__(self) -> str:
        n_experts = sum(1 for d in self.layers if d.experts)
        what = f"linear layers and expert projections ({n_experts} of them)" if n_experts else "linear layers"
        head = (f"NVFP4 conversion: {len(self.converted)}/{len(self.layers)} {what}; "
                f"NVFP4 share {100 * self.param_fraction:.1f}% of matmul weights, "
                f"{100 * self.flops_fraction:.1f}% of weight FLOPs per token "
                f"(blocks: {self.blocks_path or 'none found'}, {self.num_blocks})")
        rows = [f"  {'fp4 ' if d.converted else 'keep'} {d.name} [{d.shape}]"
                + ("" if d.converted else f": {d.reason}") for d in self.layers]
        rows += [f"  keep {o.name} [{'x'.join(map(str, o.shape))}]: {o.reason}" for o in self.others]
        return "\n".join([head, *rows])


def find_blocks(model: nn.Module) -> tuple[str | None, nn.ModuleList | None]:
    """The longest outermost nn.ModuleList whose entries all share one class (ties: the first found).

    Outermost: not inside another such list. A list of experts inside a block (DeepSpeed's
    ``deepspeed_experts``, older MoE code) is longer than the list of blocks, but lies inside it."""
    best_name, best = None, None
    outer: list[str] = []
    for name, mod in model.named_modules():
        if not (isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(m) for m in mod}) == 1):
            continue
        if any(name.startswith(f"{o}.") or not o for o in outer):
            continue
        outer.append(name)
        if best is None or len(mod) > len(best):
            best_name, best = name, mod
    return best_name, best


def _output_projections(model: nn.Module) -> set[int]:
    """ids of Linear modules that produce logits: get_output_embeddings(), *lm_head, or embedding-tied."""
    ids: set[int] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        out = get_out()
        if isinstance(out, nn.Linear):
            ids.add(id(out))
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and (
            name.split(".")[-1] == "lm_head" or id(mod.weight) in embedding_weights
        ):
            ids.add(id(mod))
    return ids


def _block_index(name: str, blocks_path: str | None, num_blocks: int) -> int | None:
    if blocks_path is None:
        return None
    prefix = f"{blocks_path}." if blocks_path else ""
    if not name.startswith(prefix):
        return None
    head = name[len(prefix):].split(".", 1)[0]
    return int(head) if head.isdigit() and int(head) < num_blocks else None


def _policy_reason(names: list[str], recipe: NVFP4Recipe, block: int | None, num_blocks: int) -> str | None:
    """The recipe's own reasons to keep a layer (any of ``names``) in high precision."""
    if not recipe.enabled:
        return "recipe disabled (enabled=false)"
    for pattern in recipe.exclude:
        if any(fnmatch.fnmatchcase(n, pattern) for n in names):
            return f"excluded by pattern {pattern!r}"
    if block is not None and block < recipe.keep_first_blocks:
        return f"block {block} is among the first {recipe.keep_first_blocks} (keep_first_blocks)"
    if block is not None and block >= num_blocks - recipe.keep_last_blocks:
        return f"block {block} is among the last {recipe.keep_last_blocks} (keep_last_blocks)"
    return None


def _decide(name, mod, recipe, block, num_blocks, output_ids, module_filter_fn) -> str | None:
    """None to convert, else the reason to keep the layer in high precision."""
    if isinstance(mod, NVFP4Linear):
        return None
    if id(mod) in output_ids:
        return "output projection (lm_head) stays in high precision"
    reason = _policy_reason([name], recipe, block, num_blocks)
    if reason:
        return reason
    bad = [f"{n}={v}" for n, v in (("in_features", mod.in_features), ("out_features", mod.out_features))
           if v % BLOCK]
    if bad:
        return f"{', '.join(bad)} not divisible by {BLOCK}"
    if module_filter_fn is not None and not module_filter_fn(mod, name):
        return "rejected by module_filter_fn"
    return None


def _decide_experts(name, mod, recipe, block, num_blocks, module_filter_fn) -> str | None:
    if getattr(mod, "_ds_fp4", None) is not None:
        return None
    names = [name] + [f"{name}.{proj}" for proj, _, _ in experts.projections(mod)]
    reason = _policy_reason(names, recipe, block, num_blocks) or experts.experts_dims_reason(mod)
    if reason:
        return reason
    if module_filter_fn is not None and not module_filter_fn(mod, name):
        return "rejected by module_filter_fn"
    return None


def _high_precision_weights(model: nn.Module) -> list[HighPrecisionWeight]:
    """Matrix weights outside nn.Linear and fused experts: routers, convolutions, custom projections."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Embedding)) or experts.is_fused_experts(mod):
            continue
        for pname, p in mod.named_parameters(recurse=False):
            shape = tuple(getattr(p, "ds_shape", None) or p.shape)
            if len(shape) < 2 or not p.is_floating_point():
                continue
            kind = type(mod).__name__
            if "router" in kind.lower() or "gate" in kind.lower() or "router" in name.split(".")[-1]:
                reason = f"router ({kind}): expert selection stays in high precision"
            elif isinstance(mod, nn.modules.conv._ConvNd):
                reason = f"convolution ({kind}): not a linear layer, stays in high precision"
            else:
                reason = f"{kind}.{pname} is not an nn.Linear or fused-experts weight: stays in high precision"
            out.append(HighPrecisionWeight(f"{name}.{pname}" if name else pname, shape, reason))
    return out


def convert_to_nvfp4(
    model: nn.Module,
    recipe: NVFP4Recipe | None = None,
    module_filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> ConversionReport:
    """Replace eligible nn.Linear modules of ``model`` by NVFP4Linear in place, switch eligible fused
    MoE experts (transformers 5 experts modules, ds_fp4.experts) to NVFP4; return the report.

    module_filter_fn(module, fqn) -> bool can veto further layers (an experts module is offered whole).
    Converting twice is harmless: layers already in NVFP4 are reported as converted and left as they
    are (their recipe included).
    """
    recipe = recipe if recipe is not None else NVFP4Recipe()
    if not isinstance(recipe, NVFP4Recipe):
        raise TypeError(f"recipe must be an NVFP4Recipe (e.g. NVFP4Recipe.paper()); got {recipe!r}")
    blocks_path, blocks = find_blocks(model)
    num_blocks = len(blocks) if blocks is not None else 0
    output_ids = _output_projections(model)
    report = ConversionReport(blocks_path=blocks_path, num_blocks=num_blocks)
    swaps: list[tuple[str, nn.Module]] = []
    fused: list[nn.Module] = []
    for name, mod in model.named_modules():
        block = _block_index(name, blocks_path, num_blocks)
        if experts.is_fused_experts(mod):
            reason = _decide_experts(name, mod, recipe, block, num_blocks, module_filter_fn)
            for proj, weight, _ in experts.projections(mod):
                e, out_f, in_f = experts.logical_shape(mod, weight)
                report.layers.append(LayerDecision(
                    f"{name}.{proj}", in_f, out_f, reason is None, reason or "converted", block,
                    experts=e, active=experts.top_k(mod)))
            if reason is None:
                fused.append(mod)
            continue
        if not isinstance(mod, nn.Linear):
            continue
        reason = _decide(name, mod, recipe, block, num_blocks, output_ids, module_filter_fn)
        report.layers.append(LayerDecision(name, mod.in_features, mod.out_features, reason is None,
                                           reason or ("already NVFP4" if isinstance(mod, NVFP4Linear)
                                                      else "converted"), block))
        if reason is None and not isinstance(mod, NVFP4Linear):
            swaps.append((name, mod))
    for name, mod in swaps:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, NVFP4Linear.from_float(mod, recipe))
    for mod in fused:
        experts.convert_experts(mod, recipe)
    report.others = _high_precision_weights(model)
    return report


def set_nvfp4_active(model: nn.Module, active: bool) -> int:
    """Switch every NVFP4Linear of ``model`` to NVFP4 (True) or plain high precision (False).

    Used for the paper's App. D: finishing the last tokens in BF16 recovers most of the loss gap.
    Returns the number of layers switched.
    """
    n = 0
    for mod in model.modules():
        if isinstance(mod, NVFP4Linear):
            mod.nvfp4_active = active
            n += 1
        elif getattr(mod, "_ds_fp4", None) is not None:
            mod._ds_fp4.active = active
            n += 1
    return n

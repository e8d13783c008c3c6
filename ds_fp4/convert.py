"""convert_to_nvfp4: swap eligible nn.Linear layers for NVFP4Linear, in place, and say why not for the rest.

Which layers stay in high precision is part of the recipe (paper §4.1: keeping roughly the first and
last blocks in BF16 is what keeps a 12B run stable). "Blocks" are the entries of the model's longest
nn.ModuleList whose entries share one class: ``model.layers`` for Hugging Face Llama-style models,
``transformer.h`` for GPT-2. That rule needs no per-architecture table.

Never converted: the output projection (lm_head / the module ``get_output_embeddings()`` returns, or a
Linear whose weight is tied to an nn.Embedding) and layers whose dims do not divide by 16. Embeddings,
norms and attention's batched GEMMs are not nn.Linear and are left alone by construction.

The swap reuses the existing Parameters (see NVFP4Linear.from_float), so it works on models built
under ``deepspeed.zero.Init``, where a Linear's local weight is an empty partition. Convert before
``deepspeed.initialize``: DeepSpeed registers its ZeRO hooks on the modules it finds then.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from .linear import NVFP4Linear
from .nvfp4 import BLOCK
from .recipe import NVFP4Recipe


@dataclass
class LayerDecision:
    """What happened to one nn.Linear."""

    name: str
    in_features: int
    out_features: int
    converted: bool
    reason: str
    block: int | None = None

    @property
    def params(self) -> int:
        return self.in_features * self.out_features


@dataclass
class ConversionReport:
    """Every nn.Linear of the model: converted to NVFP4, or kept in high precision and why."""

    layers: list[LayerDecision] = field(default_factory=list)
    blocks_path: str | None = None
    num_blocks: int = 0

    @property
    def converted(self) -> list[str]:
        return [d.name for d in self.layers if d.converted]

    @property
    def kept(self) -> dict[str, str]:
        return {d.name: d.reason for d in self.layers if not d.converted}

    @property
    def converted_fraction(self) -> float:
        """Fraction of linear-layer weights (by parameter count) that run in NVFP4."""
        total = sum(d.params for d in self.layers)
        return sum(d.params for d in self.layers if d.converted) / total if total else 0.0

    def __str__(self) -> str:
        head = (f"NVFP4 conversion: {len(self.converted)}/{len(self.layers)} linear layers, "
                f"{100 * self.converted_fraction:.1f}% of linear weights "
                f"(blocks: {self.blocks_path or 'none found'}, {self.num_blocks})")
        rows = [f"  {'fp4 ' if d.converted else 'keep'} {d.name} [{d.out_features}x{d.in_features}]"
                + ("" if d.converted else f": {d.reason}") for d in self.layers]
        return "\n".join([head, *rows])


def find_blocks(model: nn.Module) -> tuple[str | None, nn.ModuleList | None]:
    """The longest nn.ModuleList whose entries all share one class (ties: the first found)."""
    best_name, best = None, None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(m) for m in mod}) == 1:
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


def _decide(name, mod, recipe, block, num_blocks, output_ids, module_filter_fn) -> str | None:
    """None to convert, else the reason to keep the layer in high precision."""
    if isinstance(mod, NVFP4Linear):
        return None
    if id(mod) in output_ids:
        return "output projection (lm_head) stays in high precision"
    if not recipe.enabled:
        return "recipe disabled (enabled=false)"
    for pattern in recipe.exclude:
        if fnmatch.fnmatchcase(name, pattern):
            return f"excluded by pattern {pattern!r}"
    if block is not None and block < recipe.keep_first_blocks:
        return f"block {block} is among the first {recipe.keep_first_blocks} (keep_first_blocks)"
    if block is not None and block >= num_blocks - recipe.keep_last_blocks:
        return f"block {block} is among the last {recipe.keep_last_blocks} (keep_last_blocks)"
    bad = [f"{n}={v}" for n, v in (("in_features", mod.in_features), ("out_features", mod.out_features))
           if v % BLOCK]
    if bad:
        return f"{', '.join(bad)} not divisible by {BLOCK}"
    if module_filter_fn is not None and not module_filter_fn(mod, name):
        return "rejected by module_filter_fn"
    return None


def convert_to_nvfp4(
    model: nn.Module,
    recipe: NVFP4Recipe | None = None,
    module_filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> ConversionReport:
    """Replace eligible nn.Linear modules of ``model`` by NVFP4Linear in place; return the report.

    module_filter_fn(module, fqn) -> bool can veto further layers. Converting twice is harmless:
    layers that already are NVFP4Linear are reported as converted and left as they are (their recipe
    included).
    """
    recipe = recipe if recipe is not None else NVFP4Recipe()
    if not isinstance(recipe, NVFP4Recipe):
        raise TypeError(f"recipe must be an NVFP4Recipe (e.g. NVFP4Recipe.paper()); got {recipe!r}")
    blocks_path, blocks = find_blocks(model)
    num_blocks = len(blocks) if blocks is not None else 0
    output_ids = _output_projections(model)
    report = ConversionReport(blocks_path=blocks_path, num_blocks=num_blocks)
    swaps: list[tuple[str, nn.Module]] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        block = _block_index(name, blocks_path, num_blocks)
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
    return n

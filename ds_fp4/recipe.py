"""NVFP4Recipe: which tensor is quantized how, and which layers stay in high precision.

A recipe has one :class:`TensorPolicy` per tensor role, as in the paper's Table/§4 and Transformer
Engine's NVFP4BlockScaling, because each role needs different treatment:

* ``input``  (activations X): fprop operand and, transposed, wgrad operand. 1x16, nearest; the RHT is
  applied on its wgrad use.
* ``weight`` (W): fprop operand and, transposed, dgrad operand. 16x16 tiles so that W and W^T decode
  identically (the chain rule then differentiates the function that fprop computed).
* ``grad``   (dY): dgrad and wgrad operand. 1x16 with stochastic rounding (unbiased gradients); the RHT
  is applied on its wgrad use.

The Hadamard flag means "transform this tensor where it feeds the Wgrad GEMM"; the transform only
cancels when both Wgrad operands carry it, so ``input.hadamard`` and ``grad.hadamard`` must agree, and
the weight never carries it. Block selection (``keep_first_blocks``/``keep_last_blocks``/``exclude``)
is part of the recipe because the paper's stability result depends on it (about 15% of linear layers
kept in BF16). Configuration comes only through this dataclass: no environment variables.

Validation is pydantic's, with the project's conventions from :mod:`ds_fp4.config_errors`: each field's
type says what it accepts, unknown keys are forbidden, and only the rules between fields are written out,
in ``__post_init__``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, field, fields, replace
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, StrictBool
from pydantic.dataclasses import dataclass

from .config_errors import STRICT_FIELDS, NonNegInt
from .hadamard import DEFAULT_SIGNS, validate_signs
from .nvfp4 import BACKENDS, ROUNDINGS, normalize_tile

POLICY_ROLES = ("input", "weight", "grad")


@dataclass(frozen=True, config=STRICT_FIELDS)
class TensorPolicy:
    """How one tensor role is quantized."""

    tile: Annotated[tuple[int, int], BeforeValidator(normalize_tile)] = (1, 16)
    """(1, 16) blocks along the dot-product dim, or (16, 16) tiles; strings "1x16"/"16x16" accepted."""
    rounding: Literal[ROUNDINGS] = "nearest"
    """"nearest" (round to nearest, ties to even) or "stochastic" (unbiased)."""
    hadamard: StrictBool = False
    """Apply the 16x16 random Hadamard transform where this tensor feeds the Wgrad GEMM."""


PRESETS = ("paper", "no_rht", "no_sr", "no_2d", "all_fp4", "bf16")


@dataclass(frozen=True, config=STRICT_FIELDS)
class NVFP4Recipe:
    """The NVFP4 training recipe. The defaults are the paper's (docs/design.md §3); see the presets below."""

    input: TensorPolicy = field(default_factory=lambda: TensorPolicy(hadamard=True))
    """Activations X: fprop operand (1x16 nearest) and wgrad operand (with RHT)."""
    weight: TensorPolicy = field(default_factory=lambda: TensorPolicy(tile=(16, 16)))
    """Weights W: fprop and dgrad operand, 16x16 tiles so that W and W^T quantize identically."""
    grad: TensorPolicy = field(default_factory=lambda: TensorPolicy(rounding="stochastic", hadamard=True))
    """Output gradients dY: dgrad and wgrad operand, stochastic rounding, RHT on the wgrad use."""
    keep_first_blocks: NonNegInt = 1
    """Linear layers in the first N transformer blocks stay in high precision (paper 12B: 2)."""
    keep_last_blocks: NonNegInt = 1
    """Linear layers in the last N transformer blocks stay in high precision (paper 12B: 8)."""
    exclude: tuple[str, ...] = ()
    """fnmatch patterns of module names (e.g. "*.mlp.down_proj") kept in high precision."""
    enabled: StrictBool = True
    """False: convert nothing (the BF16 baseline with an identical config otherwise)."""
    hadamard_signs: Annotated[tuple[int, ...], BeforeValidator(validate_signs)] = DEFAULT_SIGNS
    """The RHT's 16 fixed +-1 signs."""
    backend: Literal[BACKENDS] = "auto"
    """"auto" (Triton on CUDA, torch elsewhere), "torch" (reference) or "triton"."""

    def __post_init__(self) -> None:
        if self.weight.hadamard:
            raise ValueError(
                "weight.hadamard must be false: the weight feeds fprop and dgrad, whose other operands "
                "are not transformed; the RHT applies to input and grad on the Wgrad GEMM only"
            )
        if self.input.hadamard != self.grad.hadamard:
            raise ValueError(
                "input.hadamard and grad.hadamard must be equal: the Hadamard transform cancels in the "
                f"Wgrad product only when both operands carry it; got input.hadamard={self.input.hadamard}, "
                f"grad.hadamard={self.grad.hadamard}"
            )

    # Presets -------------------------------------------------------------------------------------
    @classmethod
    def paper(cls, **overrides: Any) -> NVFP4Recipe:
        """The paper's recipe (docs/design.md §3): 2D weights, SR gradients, RHT on Wgrad, BF16 edge blocks."""
        return cls(**overrides)

    @classmethod
    def no_rht(cls, **overrides: Any) -> NVFP4Recipe:
        """Ablation: no Random Hadamard Transform on the Wgrad operands."""
        r = cls(**overrides)
        return replace(r, input=replace(r.input, hadamard=False), grad=replace(r.grad, hadamard=False))

    @classmethod
    def no_sr(cls, **overrides: Any) -> NVFP4Recipe:
        """Ablation: gradients rounded to nearest instead of stochastically."""
        r = cls(**overrides)
        return replace(r, grad=replace(r.grad, rounding="nearest"))

    @classmethod
    def no_2d(cls, **overrides: Any) -> NVFP4Recipe:
        """Ablation: 1x16 weight blocks (W and W^T then quantize differently)."""
        r = cls(**overrides)
        return replace(r, weight=replace(r.weight, tile=(1, 16)))

    @classmethod
    def all_fp4(cls, **overrides: Any) -> NVFP4Recipe:
        """Ablation: every eligible linear layer in NVFP4, no BF16 blocks."""
        return replace(cls(**overrides), keep_first_blocks=0, keep_last_blocks=0)

    @classmethod
    def bf16(cls, **overrides: Any) -> NVFP4Recipe:
        """Baseline: nothing converted."""
        return replace(cls(**overrides), enabled=False)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> NVFP4Recipe:
        if name not in PRESETS:
            raise ValueError(f"unknown recipe preset {name!r}; valid presets: {list(PRESETS)}")
        return getattr(cls, name)(**overrides)

    # Dict round trip (the "nvfp4" JSON section) ---------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NVFP4Recipe:
        """Recipe fields over an optional "preset" (default "paper"). A policy given in part, e.g.
        ``{"grad": {"rounding": "nearest"}}``, keeps the preset's other fields for that role. Errors are
        pydantic's; NVFP4Config.from_dict phrases them for the "nvfp4" JSON section."""
        d = dict(d)
        base = cls.preset(d.pop("preset", "paper"))
        for role in POLICY_ROLES:
            if isinstance(d.get(role), Mapping):
                d[role] = {**asdict(getattr(base, role)), **d[role]}
        return replace(base, **d)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for role in POLICY_ROLES:
            out[role]["tile"] = "x".join(map(str, out[role]["tile"]))
        out["exclude"] = list(self.exclude)
        out["hadamard_signs"] = list(self.hadamard_signs)
        return out

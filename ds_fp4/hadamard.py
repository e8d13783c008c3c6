"""The 16x16 random Hadamard transform (RHT) applied to Wgrad operands.

``H = diag(s) @ H16 / 4`` with ``H16`` the Sylvester Hadamard matrix and ``s`` a fixed +-1 sign vector.
H is orthogonal, so transforming both operands of ``dW = dY^T X`` along their shared (token) dimension
leaves the product unchanged while spreading block outliers over 16 elements before 4-bit quantization
(paper §4.2: it helps most at large scale and on Wgrad only).

The transform is defined by its arithmetic, not only by the matrix: a row vector x of 16 fp32 values
is mapped to ``(x * s) @ H16 * 0.25`` computed as a fast Walsh-Hadamard butterfly with stages
h = 1, 2, 4, 8, each stage replacing the pair (a, b) = (y[i], y[i + h]) by (a + b, a - b) in fp32.
Sign flips and the final multiplication by 0.25 are exact (barring subnormals, which are rounded the
same way everywhere). Fixing the order of the fp32 additions is what lets the Triton kernels be
bit-exact against this reference; a generic matmul would sum in a library-dependent order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

HADAMARD_SIZE = 16
DEFAULT_SIGNS: tuple[int, ...] = (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)


def validate_signs(signs: Sequence[int] | torch.Tensor | None) -> tuple[int, ...]:
    """Return the sign vector as a tuple of 16 ints, each +1 or -1; ValueError otherwise."""
    if signs is None:
        return DEFAULT_SIGNS
    values = signs.tolist() if isinstance(signs, torch.Tensor) else list(signs)
    if len(values) != HADAMARD_SIZE or any(v not in (1, -1) for v in values):
        raise ValueError(
            f"hadamard signs must be {HADAMARD_SIZE} values, each +1 or -1; got {values!r}"
        )
    return tuple(int(v) for v in values)


def sylvester(n: int = HADAMARD_SIZE, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The n x n Sylvester Hadamard matrix (entries +-1, n a power of two): H[i, j] = (-1)^popcount(i & j)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester Hadamard size must be a power of two; got {n}")
    h = torch.as_tensor([[1]], dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_matrix(
    signs: Sequence[int] | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The orthogonal matrix ``diag(s) @ H16 / 4`` that :func:`rht` applies to each 16-element group."""
    s = torch.as_tensor(validate_signs(signs), dtype=dtype)
    return s[:, None] * sylvester(HADAMARD_SIZE, dtype) / 4


def rht(x: torch.Tensor, signs: Sequence[int] | None = None) -> torch.Tensor:
    """Apply the RHT to consecutive 16-element groups of the last dim; returns fp32 of x's shape."""
    if x.shape[-1] % HADAMARD_SIZE:
        raise ValueError(
            f"the Hadamard transform needs the last dim divisible by {HADAMARD_SIZE}; got shape {tuple(x.shape)}"
        )
    s = torch.as_tensor(validate_signs(signs), dtype=torch.float32, device=x.device)
    y = x.to(torch.float32).reshape(-1, HADAMARD_SIZE) * s
    for h in (1, 2, 4, 8):
        pairs = y.view(-1, HADAMARD_SIZE // (2 * h), 2, h)
        a, b = pairs[:, :, 0, :], pairs[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2).view(-1, HADAMARD_SIZE)
    return (y * 0.25).view(x.shape)


def inverse_rht(y: torch.Tensor, signs: Sequence[int] | None = None) -> torch.Tensor:
    """Undo :func:`rht` (up to fp32 rounding): x = y @ H^T = ((y @ H16) / 4) * s."""
    s = torch.as_tensor(validate_signs(signs), dtype=torch.float32, device=y.device)
    plain = rht(y, signs=(1,) * HADAMARD_SIZE)  # H16 is symmetric, so y @ H16 / 4 undoes the mixing
    return (plain.reshape(-1, HADAMARD_SIZE) * s).view(y.shape)

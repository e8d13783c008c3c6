"""Counter-based random numbers for stochastic rounding: Philox4x32-10 in plain torch.

Why Philox: stochastic rounding must be reproducible (same seed, same bits) on every device, and the
Triton kernels draw their randomness with ``tl.randint4x`` (Philox4x32-10). Implementing the very same
generator here lets the torch reference and the kernels agree bit for bit, so a stochastic-rounding
kernel can be tested exactly, not only statistically.

Conventions (identical to ``triton.language.random``):
  * key = (seed & 0xFFFFFFFF, seed >> 32) for a 64-bit integer seed;
  * counter = (c0, c1, 0, 0) with c0/c1 the low/high 32 bits of the block index;
  * one Philox call yields four 32-bit words; element ``i`` of a tensor uses word ``i % 4`` of the
    call with block index ``i // 4`` (one call per four elements keeps the CPU cost down);
  * a word becomes a uniform float in [0, 1) exactly as ``tl.rand`` does: reinterpret as int32, map
    negative values ``x -> ~x``, convert to fp32 and multiply by the fp32 constant 4.6566127342e-10.

The arithmetic uses int64 tensors: 32x32-bit products fit in 64 bits modulo 2**64 (torch wraps), and
the high word is recovered with a shift and a mask.
"""

from __future__ import annotations

import operator

import torch

_MASK32 = 0xFFFFFFFF
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_ROUNDS = 10
# Largest fp32 below 2**-31 such that (2**31 - 1) * scale < 1.0 after rounding; Triton's constant.
_UNIFORM_SCALE = 4.6566127342e-10
MAX_SEED = 2**63 - 1


def check_seed(seed: int) -> int:
    """``seed`` as an int in [0, MAX_SEED] (numpy integers pass too); ValueError naming it otherwise."""
    if torch.compiler.is_compiling():
        # torch.compile traces draw_seed()'s .item() as a symbolic int, in range by construction; checking
        # it would need its runtime value (a graph break, an error under fullgraph=True).
        return seed
    try:
        value = operator.index(seed)
    except TypeError:
        value = None
    if value is None or not 0 <= value <= MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, 2**63 - 1]; got seed={seed!r}")
    return value


def philox4x32(counter_lo: torch.Tensor, counter_hi: torch.Tensor, seed: int) -> list[torch.Tensor]:
    """Philox4x32-10 of counters (counter_lo, counter_hi, 0, 0) under a 64-bit key; four int64 words."""
    seed = check_seed(seed)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    c0 = counter_lo.to(torch.int64) & _MASK32
    c1 = counter_hi.to(torch.int64) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(_ROUNDS):
        prod_b = c2 * _ROUND_B  # < 2**64: exact modulo 2**64 in int64
        prod_a = c0 * _ROUND_A
        c0, c1, c2, c3 = (
            ((prod_b >> 32) & _MASK32) ^ c1 ^ k0,
            prod_b & _MASK32,
            ((prod_a >> 32) & _MASK32) ^ c3 ^ k1,
            prod_a & _MASK32,
        )
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return [c0, c1, c2, c3]


def words_to_uniform(words: torch.Tensor) -> torch.Tensor:
    """Map uint32 words (held in int64) to fp32 uniforms in [0, 1), as ``tl.rand`` does."""
    # tl.rand reinterprets a word as int32 and maps a negative x to ~x; x ^ (x >> 31) does exactly that
    # (the arithmetic shift is -1 for negatives, 0 otherwise). Working in int32 halves the traffic.
    as_int32 = words.to(torch.int32)  # keeps the low 32 bits: the word's int32 bit pattern
    nonneg = as_int32 ^ (as_int32 >> 31)  # [0, 2**31 - 1]
    return nonneg.to(torch.float32) * torch.as_tensor(_UNIFORM_SCALE, dtype=torch.float32, device=words.device)


# Counters per Philox call on CPU: small enough that the ~40 int64 temporaries of the ten rounds stay in
# cache instead of being freshly allocated (and page-faulted) for the whole tensor.
_CPU_CHUNK = 32768


def uniform(numel: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``numel`` fp32 uniforms in [0, 1): element i uses Philox word i % 4 of block index i // 4."""
    device = torch.device(device)
    blocks = (numel + 3) // 4
    # empty_strided, not torch.empty: zero.Init's constructor wrappers would make the buffer bf16.
    out = torch.empty_strided((blocks * 4,), (1,), dtype=torch.float32, device=device)
    chunk = _CPU_CHUNK if device.type == "cpu" else max(blocks, 1)
    for start in range(0, blocks, chunk):
        index = torch.arange(start, min(start + chunk, blocks), dtype=torch.int64, device=device)
        words = philox4x32(index & _MASK32, index >> 32, seed)
        # [n, 4] row-major puts word w of block b at flat position 4*b + w.
        out[4 * start : 4 * (start + index.numel())] = words_to_uniform(torch.stack(words, dim=1).reshape(-1))
    return out[:numel]


# The data-parallel rank folded into every drawn seed (set_rank_fold), or 0: no fold.
_rank_fold = 0


def set_rank_fold(rank: int) -> int:
    """Fold ``rank`` into every seed :func:`draw_seed` returns from now on in this process (0: no fold).

    Ranks that seed torch alike (HF Trainer, most training scripts) would otherwise draw the same
    stochastic-rounding noise, which then does not average out in the data-parallel reduction. Rank 0's
    seeds stay as drawn, so a single-process run is unchanged. Returns the previous rank.
    """
    global _rank_fold
    if operator.index(rank) < 0:
        raise ValueError(f"rank must be >= 0; got {rank!r}")
    previous, _rank_fold = _rank_fold, operator.index(rank)
    return previous


def fold_rank(seed: int, rank: int) -> int:
    """``seed`` mixed with ``rank`` (splitmix64 of both) into [0, MAX_SEED]; ``seed`` itself for rank 0."""
    if rank == 0:
        return seed
    z = (seed + rank * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & MAX_SEED


def draw_seed(generator: torch.Generator | None = None) -> int:
    """A fresh 63-bit seed from torch's (seedable, checkpointable) CPU generator, with this process's
    data-parallel rank folded in (:func:`set_rank_fold`)."""
    seed = int(torch.randint(0, MAX_SEED, (), dtype=torch.int64, generator=generator).item())
    return fold_rank(seed, _rank_fold) if _rank_fold else seed

"""NVFP4 collectives: gradients and ZeRO-3 weights cross the wire as 4-bit codes + E4M3 scales.

A bf16 gradient element costs 16 bits on the wire; an NVFP4 one costs 4 bits of code plus 8 bits of
scale per 16 elements, 4.5 bits in all (0.28 of bf16). The collectives below move only those bytes:

* reduce-scatter (ZeRO-3 gradients, and the first half of an all-reduce): every rank quantizes the
  destination-ordered shards of its bucket with stochastic rounding (1x16 blocks never straddle a
  shard: each shard is padded to a multiple of 16), an ``all_to_all`` delivers shard r of every rank
  to rank r, which decodes the W pieces with their senders' amax and sums them in fp32. Each rank's
  rounding is unbiased and independent, so the sum is an unbiased estimate of the exact sum. (Block
  scales are rounded up here, unlike in the GEMM spec, so no block maximum is clamped at 6: clamping
  would shrink gradients by ~0.7% along their own direction, a bias SR cannot undo.)
* all-reduce (stage 0; stages 1/2 with reduce_scatter=false): reduce-scatter as above, then an
  all-gather of the reduced shards, quantized again with stochastic rounding (still unbiased).
* reduce to one rank (stages 1/2 with reduce_scatter=true, DeepSpeed's default): every other rank
  sends its quantized bucket to the destination, which decodes and sums.
* all-gather (ZeRO-3 weights, ``weight_comm``): each rank quantizes its own shard round-to-nearest
  and the packed shards are gathered. Each shard has its own amax, so the forward sees a weight
  quantized per shard, not per tensor (then re-quantized with 16x16 tiles by NVFP4Linear).

Every collective adds the bytes it sent to a :class:`CommStats`, next to what the same exchange costs
at the configured communication dtype and at bf16, so the trainer can log the saving.

Stochastic-rounding seeds come from a per-rank counter (splitmix64 of seed, rank, call), not from
torch's RNG, so turning NVFP4 communication on does not shift any other random stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace

import torch
import torch.distributed as dist

from . import nvfp4

BLOCK = nvfp4.BLOCK
_AMAX_BYTES = 4


@dataclass
class CommStats:
    """Bytes this rank put on the wire, and what the same exchanges cost uncompressed."""

    bytes_sent: int = 0
    """Bytes this rank sent through NVFP4 collectives (codes, scales, amax, padding)."""
    bytes_baseline: int = 0
    """Bytes the same exchanges would have sent at the configured communication dtype."""
    bytes_bf16: int = 0
    """Bytes the same exchanges would have sent in bf16."""
    calls: int = 0
    """Collectives counted since the last reset."""

    def add(self, sent: int, elements_on_wire: int, baseline_itemsize: int) -> None:
        """Count one collective: ``sent`` NVFP4 bytes standing for ``elements_on_wire`` elements."""
        self.bytes_sent += sent
        self.bytes_baseline += elements_on_wire * baseline_itemsize
        self.bytes_bf16 += elements_on_wire * 2
        self.calls += 1

    def snapshot_and_reset(self) -> CommStats:
        """A copy of the counters as they stand; then they restart from zero."""
        out = replace(self)
        for f in fields(self):
            setattr(self, f.name, 0)
        return out


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


@dataclass
class CommState:
    """What the NVFP4 collectives of one engine need: backend, seeds, and byte counters."""

    seed: int = 0
    backend: str = "auto"
    grad_stats: CommStats = field(default_factory=CommStats)
    weight_stats: CommStats = field(default_factory=CommStats)
    calls: int = 0

    def next_seed(self) -> int:
        """A fresh 63-bit seed, different on every rank and every call, reproducible from ``seed``."""
        self.calls += 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        return _splitmix64(_splitmix64(self.seed) ^ (rank << 40) ^ self.calls) >> 1

    def state_dict(self) -> dict:
        return {"seed": self.seed, "calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.calls = int(state["seed"]), int(state["calls"])


# Packing ----------------------------------------------------------------------------------------------
def _padded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def pack_rows(q: nvfp4.NVFP4Tensor) -> torch.Tensor:
    """uint8 [rows, k/2 + k/16 + 4]: each row carries its codes, its E4M3 scales and the tensor's fp32 amax."""
    rows = q.data.shape[0]
    amax = q.amax.reshape(1).view(torch.uint8).expand(rows, _AMAX_BYTES)
    return torch.cat([q.data, q.scale.view(torch.uint8), amax], dim=1)


def decode_rows(buf: torch.Tensor, k: int) -> torch.Tensor:
    """fp32 [rows, k] from packed rows, each decoded with the amax it carries."""
    codes = buf[:, : k // 2]
    scale = buf[:, k // 2 : k // 2 + k // BLOCK].contiguous().view(torch.float8_e4m3fn)
    amax = buf[:, k // 2 + k // BLOCK :].contiguous().view(torch.float32)  # [rows, 1]
    values = nvfp4.decode_e2m1(nvfp4.unpack_nibbles(codes.contiguous()))
    scaled = values * scale.to(torch.float32).repeat_interleave(BLOCK, dim=1)
    return scaled * nvfp4.global_decode_scale(amax)


def _quantize_rows(rows: torch.Tensor, rounding: str, state: CommState) -> nvfp4.NVFP4Tensor:
    if rounding == "stochastic":  # scales rounded up: nothing is clamped, so SR is exactly unbiased
        return nvfp4.quantize(rows, rounding=rounding, seed=state.next_seed(), backend=state.backend,
                              scale_rounding="up")
    return nvfp4.quantize(rows, backend=state.backend)


def chunk_size(numel: int, world: int) -> int:
    """Elements of a ``numel``-element tensor in each of ``world`` shards: ceil(numel / world), as DeepSpeed."""
    return -(-numel // world)


def _shards(tensors: torch.Tensor | Sequence[torch.Tensor], world: int) -> tuple[torch.Tensor, int]:
    """([world, k] fp32 rows, n): row r holds chunk r of each tensor, destination-major, zero-padded.

    Chunk r of a tensor is its elements [r*c, (r+1)*c), c = chunk_size(numel, world); the last ranks'
    chunks are padded to c, so every tensor takes the same c columns in every row, n = sum of the c's
    in all, and k = n padded to a multiple of 16 (no 1x16 block straddles two ranks). One tensor is the
    plain reduce-scatter; several are DeepSpeed's coalesced one (ZeRO-3 gradients), laid out as it does.
    """
    tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    chunks = [chunk_size(t.numel(), world) for t in tensors]
    n = sum(chunks)
    out = tensors[0].new_zeros((world, _padded(max(n, 1))), dtype=torch.float32)  # new_*: zero.Init, docs/design.md §5
    offset = 0
    for t, c in zip(tensors, chunks, strict=True):
        flat = t.reshape(-1)
        for r in range(world):
            piece = flat[r * c : (r + 1) * c]
            out[r, offset : offset + piece.numel()] = piece
        offset += c
    return out, n


# Collectives ------------------------------------------------------------------------------------------
def reduce_scatter(tensors: torch.Tensor | Sequence[torch.Tensor], group, state: CommState,
                   itemsize: int) -> torch.Tensor:
    """fp32 [n]: the sum over ranks of row ``rank`` of :func:`_shards` (this rank's chunk of each tensor)."""
    world = dist.get_world_size(group)
    rows, n = _shards(tensors, world)
    send = pack_rows(_quantize_rows(rows, "stochastic", state))
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    state.grad_stats.add((world - 1) * send.shape[1], (world - 1) * n, itemsize)
    return decode_rows(recv, rows.shape[1]).sum(dim=0)[:n]


def all_gather(shard: torch.Tensor, group, state: CommState, stats: CommStats, rounding: str,
               itemsize: int) -> torch.Tensor:
    """[W, n] fp32: every rank's ``shard`` (n elements), as decoded from its NVFP4 quantization."""
    world = dist.get_world_size(group)
    row, n = _shards(shard, 1)  # one row, padded to whole blocks
    send = pack_rows(_quantize_rows(row, rounding, state))
    recv = send.new_empty((world, send.shape[1]))
    dist.all_gather_into_tensor(recv, send, group=group)
    stats.add((world - 1) * send.shape[1], (world - 1) * n, itemsize)
    return decode_rows(recv, row.shape[1])[:, :n]


def all_reduce_(tensor: torch.Tensor, group, state: CommState, itemsize: int) -> torch.Tensor:
    """In-place NVFP4 all-reduce (sum): reduce-scatter, then all-gather of the reduced shards."""
    world = dist.get_world_size(group)
    if world == 1:
        return tensor
    mine = reduce_scatter(tensor, group, state, itemsize)
    full = all_gather(mine, group, state, state.grad_stats, "stochastic", itemsize)
    tensor.view(-1).copy_(full.reshape(-1)[: tensor.numel()])
    return tensor


def reduce_(tensor: torch.Tensor, dst: int, group, state: CommState, itemsize: int) -> torch.Tensor:
    """In-place NVFP4 reduce (sum) to group rank ``dst``; other ranks' tensors are left unspecified."""
    world = dist.get_world_size(group)
    if world == 1:
        return tensor
    row, n = _shards(tensor, 1)  # one row, padded to whole blocks
    send = pack_rows(_quantize_rows(row, "stochastic", state))
    me = dist.get_rank(group)
    dst_global = dist.get_global_rank(group, dst) if group is not None else dst
    gathered = [torch.empty_like(send) for _ in range(world)] if me == dst else None
    dist.gather(send, gathered, dst=dst_global, group=group)
    if me == dst:
        tensor.view(-1).copy_(decode_rows(torch.cat(gathered), row.shape[1]).sum(dim=0)[:n])
        state.grad_stats.add(0, 0, itemsize)  # the destination sends nothing; it counts the call
    else:
        state.grad_stats.add(send.numel(), n, itemsize)
    return tensor

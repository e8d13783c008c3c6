"""NVFP4 Triton kernels benchmark: each number is a ratio against a baseline measured in the same run.

What it measures (issue 3):
- quantize: effective bandwidth = (bytes read + bytes written) / time, as a ratio of a plain torch
  device-to-device copy (x.clone(): one read + one write). Reported per kernel (pass 1 = tensor amax,
  pass 2 = block scales + codes) and for the whole two-pass op. "whole (logical)" counts the input
  once: the two-pass design reads it twice, which caps that ratio near 2.56 / 4.56 = 0.56 for bf16
  input; "whole (moved)" counts both reads.
- GEMM: TFLOP/s (2MNK / time) of each strategy (fused decode-in-loop, dequant + cuBLAS, native
  dot_scaled on sm_100+) as a ratio of bf16 torch.matmul at the same shape.
- NVFP4Linear forward + backward (backend="triton", the paper's recipe) vs nn.Linear in bf16.

Targets (H100): 1x16 quantize pass >= 0.80 of copy; fused RHT + stochastic quantize >= 0.70;
emulated GEMM >= 0.70 of bf16 matmul at 8192^3. The native sm_100 path cannot be measured on Hopper.

GPU timing: CUDA events around each call, L2 flushed before every call (a 256 MiB memset), median of
the repetitions after warm-up (which also runs the autotuner). Without CUDA the script runs the same
table under TRITON_INTERPRET=1 with tiny shapes (``--smoke``, automatic): the numbers then only show
that every path runs end to end.

    python bench/kernels.py            # GPU: full shapes; CPU: smoke
    python bench/kernels.py --smoke    # tiny shapes anywhere
Writes bench/results/kernels_<device>_<date>.json (``--no-save`` to skip).
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import platform
import re
import statistics
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit function is created

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import triton  # noqa: E402

from ds_fp4 import kernels  # noqa: E402
from ds_fp4.hadamard import DEFAULT_SIGNS  # noqa: E402
from ds_fp4.kernels import amax as amax_kernel  # noqa: E402
from ds_fp4.kernels import gemm, quantize_1x16, quantize_16x16  # noqa: E402
from ds_fp4.kernels.nvfp4_math import signs_mask  # noqa: E402
from ds_fp4.nvfp4 import QuantizeArgs  # noqa: E402

SIGNS = signs_mask(DEFAULT_SIGNS)


class Timer:
    """Median time of fn() in seconds: CUDA events with an L2 flush, or wall clock on CPU."""

    def __init__(self, device: torch.device, reps: int, warmup: int):
        self.device, self.reps, self.warmup = device, reps, warmup
        self.flush = torch.empty(256 << 20, dtype=torch.uint8, device=device) if device.type == "cuda" else None

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.reps):
            if self.flush is not None:
                self.flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)


def _row(table, group, name, shape, seconds, value, unit, baseline, target=None):
    ratio = value / baseline if baseline else float("nan")
    table.append({"group": group, "name": name, "shape": shape, "ms": seconds * 1e3, "value": value,
                  "unit": unit, "baseline": baseline, "ratio": ratio, "target": target})


def bench_quantize(timer, device, shapes, table):
    copy_src = torch.randn(shapes["copy"], device=device)
    t = timer(lambda: copy_src.clone())
    copy_bw = 2 * copy_src.numel() * 4 / t
    _row(table, "copy", "torch clone (fp32)", list(copy_src.shape), t, copy_bw / 1e9, "GB/s", copy_bw / 1e9)
    gbs = copy_bw / 1e9

    m, k = shapes["act"]
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    dy_t = torch.randn(m, k, device=device, dtype=torch.bfloat16).t().contiguous().t()  # wgrad: a transposed view
    w = torch.randn(shapes["weight"], device=device, dtype=torch.float32)
    n_el = m * k
    out_bytes = n_el // 2 + n_el // 16

    cases = [
        ("1x16 nearest, bf16", x, dict(stochastic=False, signs_mask=None), 0.80),
        ("1x16 RHT + stochastic, bf16 transposed", dy_t, dict(stochastic=True, signs_mask=SIGNS, seed=1), 0.70),
    ]
    for name, inp, kw, target in cases:
        in_bytes = inp.numel() * inp.element_size()
        bits = amax_kernel.tensor_amax_bits(inp, kw["signs_mask"])
        t1 = timer(functools.partial(amax_kernel.tensor_amax_bits, inp, kw["signs_mask"]))
        t2 = timer(functools.partial(quantize_1x16.quantize_1x16, inp, _amax_bits=bits, **kw))
        tt = timer(functools.partial(quantize_1x16.quantize_1x16, inp, **kw))
        shape = list(inp.shape)
        _row(table, "quantize", f"{name}: pass 1 (amax)", shape, t1, in_bytes / t1 / 1e9, "GB/s", gbs)
        _row(table, "quantize", f"{name}: pass 2 (scales+codes)", shape, t2, (in_bytes + out_bytes) / t2 / 1e9,
             "GB/s", gbs, target)
        _row(table, "quantize", f"{name}: whole (moved)", shape, tt, (2 * in_bytes + out_bytes) / tt / 1e9,
             "GB/s", gbs)
        _row(table, "quantize", f"{name}: whole (logical)", shape, tt, (in_bytes + out_bytes) / tt / 1e9, "GB/s", gbs)

    in_bytes = w.numel() * 4
    t = timer(lambda: quantize_16x16.quantize_weight(w))
    moved = 2 * in_bytes + 2 * (w.numel() // 2 + w.numel() // 16)
    _row(table, "quantize", "16x16 weight -> W and W^T, fp32: whole (moved)", list(w.shape), t, moved / t / 1e9,
         "GB/s", gbs)


def _operand(rows, k, device, tile=(1, 16)):
    x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
    d, s, a = kernels.quantize(x, QuantizeArgs(tile=tile))
    return d, s, a


def bench_gemm(timer, device, shapes, table):
    strategies = ["fused", "dequant"]
    if device.type == "cuda" and not gemm.INTERPRET and torch.cuda.get_device_capability(device)[0] >= 10:
        strategies.append("native")
    for m, n, k in shapes["gemm"]:
        a16 = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        b16 = torch.randn(n, k, device=device, dtype=torch.bfloat16)
        flops = 2 * m * n * k
        t = timer(functools.partial(torch.matmul, a16, b16.t()))
        base = flops / t / 1e12
        _row(table, "gemm", "bf16 torch.matmul", [m, n, k], t, base, "TFLOP/s", base)
        a, b = _operand(m, k, device), _operand(n, k, device, tile=(16, 16) if n % 16 == 0 else (1, 16))
        for strategy in strategies:
            t = timer(functools.partial(gemm.nvfp4_gemm, *a, *b, torch.bfloat16, strategy=strategy))
            target = 0.70 if (m, n, k) == (8192, 8192, 8192) and strategy != "native" else None
            _row(table, "gemm", f"nvfp4 {strategy}", [m, n, k], t, flops / t / 1e12, "TFLOP/s", base, target)


def _train_step(layer, x, dy):
    x.grad = None
    layer.zero_grad(set_to_none=True)
    layer(x).backward(dy)


def bench_linear(timer, device, shapes, table):
    try:
        from ds_fp4.linear import NVFP4Linear
        from ds_fp4.recipe import NVFP4Recipe
    except ImportError as exc:
        print(f"[linear] skipped: {exc}")
        return
    from torch import nn

    for tokens, fin, fout in shapes["linear"]:
        torch.manual_seed(0)
        ref = nn.Linear(fin, fout, device=device, dtype=torch.bfloat16)
        q = NVFP4Linear.from_float(nn.Linear(fin, fout, device=device, dtype=torch.bfloat16),
                                   recipe=NVFP4Recipe(backend="triton"))
        x = torch.randn(tokens, fin, device=device, dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(tokens, fout, device=device, dtype=torch.bfloat16)

        flops = 3 * 2 * tokens * fin * fout
        t_ref = timer(functools.partial(_train_step, ref, x, dy))
        t_q = timer(functools.partial(_train_step, q, x, dy))
        base = flops / t_ref / 1e12
        _row(table, "linear", "nn.Linear bf16 fwd+bwd", [tokens, fin, fout], t_ref, base, "TFLOP/s", base)
        _row(table, "linear", "NVFP4Linear triton fwd+bwd", [tokens, fin, fout], t_q, flops / t_q / 1e12,
             "TFLOP/s", base)


def full_shapes():
    return {
        "copy": (1 << 28,),  # 1 GiB of fp32
        "act": (8192, 8192),
        "weight": (8192, 8192),
        "gemm": [(2048, 2048, 2048), (4096, 4096, 4096), (8192, 8192, 8192), (8192, 4096, 14336),
                 (8192, 14336, 4096), (8192, 6144, 4096)],
        "linear": [(8192, 4096, 14336), (8192, 4096, 4096)],
    }


def smoke_shapes():
    return {"copy": (1 << 20,), "act": (128, 256), "weight": (128, 256),
            "gemm": [(128, 128, 128), (64, 96, 256)], "linear": [(64, 128, 96)]}


def print_table(table):
    print(f"{'group':9} {'name':64} {'shape':20} {'ms':>10} {'value':>12} {'unit':8} {'ratio':>7} {'target':>6}")
    for r in table:
        target = "" if r["target"] is None else f"{r['target']:.2f}"
        shape = "x".join(map(str, r["shape"]))
        print(f"{r['group']:9} {r['name']:64} {shape:20} {r['ms']:10.3f} {r['value']:12.2f} {r['unit']:8} "
              f"{r['ratio']:7.3f} {target:>6}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (automatic without CUDA)")
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/*.json")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--only", choices=["quantize", "gemm", "linear"], nargs="*", default=None)
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    smoke = args.smoke or device.type != "cuda"
    ok, reason = kernels.available(device)
    if not ok:
        raise SystemExit(f"Triton kernels unavailable on {device}: {reason}")
    shapes = smoke_shapes() if smoke else full_shapes()
    reps = args.reps or (2 if smoke else 20)
    timer = Timer(device, reps=reps, warmup=1 if smoke else 3)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"
    mode = "interpreter" if gemm.INTERPRET else "compiled"
    print(f"device: {name} | torch {torch.__version__} | triton {triton.__version__} | {mode} | "
          f"{'smoke' if smoke else 'full'} shapes | {reason}")

    table: list[dict] = []
    parts = args.only or ["quantize", "gemm", "linear"]
    if "quantize" in parts:
        bench_quantize(timer, device, shapes, table)
    if "gemm" in parts:
        bench_gemm(timer, device, shapes, table)
    if "linear" in parts:
        bench_linear(timer, device, shapes, table)
    print_table(table)
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 10:
        print("note: no FP4 tensor cores on this GPU; the native tl.dot_scaled path was not measured")

    if not args.no_save:
        now = dt.datetime.now()
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        out = os.path.join(ROOT, "bench", "results",
                           f"kernels_{slug}{'_smoke' if smoke else ''}_{now:%Y%m%d}.json")
        meta = {"device": name, "torch": torch.__version__, "triton": triton.__version__, "mode": mode,
                "smoke": smoke, "date": now.isoformat(timespec="seconds"), "reps": reps,
                "capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None}
        with open(out, "w") as f:
            json.dump({**meta, "results": table}, f, indent=1)
        print(f"wrote {os.path.relpath(out, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

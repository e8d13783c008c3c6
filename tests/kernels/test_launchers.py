"""Launcher input checks, availability, the custom ops (opcheck, torch.compile), NVFP4Linear on Triton."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from ds_fp4 import kernels, nvfp4
from ds_fp4.kernels import decode, gemm, gemm_epilogue, quantize_1x16, quantize_16x16

from .conftest import DEVICE, reference

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def test_available_says_how_or_why():
    ok, reason = kernels.available(DEVICE)
    assert ok and reason
    ok, reason = kernels.available(torch.device("meta"))
    assert not ok and "meta" in reason


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.zeros(4, 20), r"divisible by 16; got shape \(4, 20\)"),
        (torch.zeros(2, 4, 16), r"2D tensor; got shape \(2, 4, 16\)"),
        (torch.zeros(4, 16, dtype=torch.float64), "got dtype torch.float64"),
        (torch.zeros(4, 16, dtype=torch.int32), "got dtype torch.int32"),
    ],
)
def test_quantize_launchers_reject_bad_inputs(x, match):
    with pytest.raises(ValueError, match=match):
        quantize_1x16.quantize_1x16(x)
    with pytest.raises(ValueError, match=match):
        quantize_16x16.quantize_weight(x)


def test_16x16_needs_rows_divisible_by_16():
    with pytest.raises(ValueError, match=r"both dims divisible by 16.*\(20, 32\)"):
        quantize_16x16.quantize_16x16(torch.zeros(20, 32))
    with pytest.raises(ValueError, match=r"\(8, 16\)"):
        kernels.quantize_weight(torch.zeros(8, 16))


def _operands(m=16, n=8, k=32):
    a = reference(torch.randn(m, k))
    b = reference(torch.randn(n, k))
    return [a.data, a.scale, a.amax, b.data, b.scale, b.amax]


@pytest.mark.parametrize(
    "index, bad, match",
    [
        (0, torch.zeros(16, 16, dtype=torch.int8), r"a.data must be 2D uint8; got torch.int8 \(16, 16\)"),
        (1, torch.zeros(16, 3, dtype=torch.float8_e4m3fn), r"a.scale must be float8_e4m3fn \[16, 2\]; got .*\(16, 3\)"),
        (1, torch.zeros(16, 2), r"a.scale must be float8_e4m3fn \[16, 2\]; got torch.float32"),
        (5, torch.zeros(2), r"b.amax must be one fp32 value; got torch.float32 \(2,\)"),
        (3, torch.zeros(8, 32, dtype=torch.uint8)[:, ::2], r"b.data and b.scale need unit stride"),
    ],
)
def test_gemm_launcher_rejects_bad_operands(index, bad, match):
    args = _operands()
    args[index] = bad
    with pytest.raises(ValueError, match=match):
        gemm.nvfp4_gemm(*args)


def test_gemm_launcher_rejects_bad_options():
    args = _operands()
    k_mismatch = [torch.zeros(16, 8, dtype=torch.uint8), torch.zeros(16, 1, dtype=torch.float8_e4m3fn)] + args[2:]
    with pytest.raises(ValueError, match=r"K mismatch, a is \[16, 16\] and b is \[8, 32\]"):
        gemm.nvfp4_gemm(*k_mismatch)
    with pytest.raises(ValueError, match="out_dtype must be one of .*got torch.int32"):
        gemm.nvfp4_gemm(*args, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="strategy must be one of .*got 'fast'"):
        gemm.nvfp4_gemm(*args, strategy="fast")
    with pytest.raises(ValueError, match=r"dequantize: scale must be float8_e4m3fn \[16, 2\]"):
        decode.dequantize(args[0], args[4], args[2])
    with pytest.raises(ValueError, match="acc must be contiguous fp32; got torch.bfloat16"):
        gemm_epilogue.gemm_epilogue(torch.zeros(4, 4, dtype=torch.bfloat16), args[2], args[5], torch.float32)


def test_custom_ops_pass_opcheck():
    x = torch.randn(32, 48, device=DEVICE)
    q = reference(x)
    u8 = torch.uint8
    d, s, a = q.data.to(DEVICE), q.scale.view(u8).to(DEVICE), q.amax.to(DEVICE)
    cases = [
        (torch.ops.ds_fp4.quantize.default, (x, 1, True, 0x1234, 5)),
        (torch.ops.ds_fp4.quantize.default, (x.t().contiguous().t(), 16, False, -1, 0)),
        (torch.ops.ds_fp4.quantize_weight.default, (x,)),
        (torch.ops.ds_fp4.matmul.default, (d, s, a, d, s, a, torch.bfloat16, "fused")),
        (torch.ops.ds_fp4.dequantize.default, (d, s, a, torch.float32, True)),
    ]
    for op, args in cases:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


def test_layer_path_compiles_with_torch_compile():
    """Quantize + weight quantize + GEMM in one fullgraph torch.compile (fake impls give the shapes)."""

    def fn(x, w):
        xq = nvfp4.quantize(x, backend="triton")
        wq, _ = nvfp4.quantize_weight(w, backend="triton")
        return nvfp4.matmul(xq, wq, out_dtype=torch.bfloat16, backend="triton")

    x, w = torch.randn(24, 64, device=DEVICE), torch.randn(32, 64, device=DEVICE)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, w), fn(x, w), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nvfp4_linear_triton_matches_torch(dtype):
    """Same seeds, so every quantization is bit-identical; outputs differ only by fp32 summation order."""
    from ds_fp4.linear import NVFP4Linear
    from ds_fp4.recipe import NVFP4Recipe

    results = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        lin = nn.Linear(64, 48, dtype=dtype)
        layer = NVFP4Linear.from_float(lin, recipe=NVFP4Recipe(backend=backend)).to(DEVICE)
        x = torch.randn(3, 16, 64, dtype=dtype, device=DEVICE, requires_grad=True)
        y = layer(x)
        y.backward(torch.randn_like(y))
        results[backend] = (y.detach(), x.grad, layer.weight.grad, layer.bias.grad)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-3)
    for got, ref in zip(results["triton"], results["torch"], strict=True):
        assert got.dtype == ref.dtype and got.shape == ref.shape
        torch.testing.assert_close(got, ref, **tol)


def test_nvfp4_linear_forward_and_backward_compile_with_torch_compile():
    """The whole layer (its autograd Function, the three quantized GEMMs) in one fullgraph graph."""
    from ds_fp4.linear import NVFP4Linear
    from ds_fp4.recipe import NVFP4Recipe

    torch.manual_seed(0)
    layer = NVFP4Linear.from_float(nn.Linear(64, 48), recipe=NVFP4Recipe(backend="triton")).to(DEVICE)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 16, 64, device=DEVICE)
    dy = torch.randn(2, 16, 48, device=DEVICE)
    results = []
    for module in (layer, compiled):
        torch.manual_seed(1)  # the stochastic-rounding seeds of this step
        xi = x.clone().requires_grad_(True)
        layer.zero_grad()
        y = module(xi)
        y.backward(dy)
        results.append((y.detach(), xi.grad, layer.weight.grad.clone(), layer.bias.grad.clone()))
    for got, ref in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_backend_dispatch_auto_is_torch_on_cpu_and_triton_needs_the_interpreter():
    import subprocess
    import sys

    from ds_fp4.nvfp4 import resolve_backend

    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "torch"  # the reference on CPU, even under the interpreter
    if kernels.available(cpu)[0]:  # CI: this process runs with TRITON_INTERPRET=1 (a GPU run does not)
        assert resolve_backend("triton", cpu) == "triton"
    probe = (
        "import torch\n"
        "from ds_fp4.nvfp4 import resolve_backend\n"
        "assert resolve_backend('auto', torch.device('cpu')) == 'torch'\n"
        "try:\n"
        "    resolve_backend('triton', torch.device('cpu'))\n"
        "except ValueError as e:\n"
        "    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    assert "backend='triton' cannot run on cpu" in out and "TRITON_INTERPRET=1" in out

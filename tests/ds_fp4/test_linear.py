"""NVFP4Linear against a float64 nn.Linear: forward and all three gradients within SQNR thresholds."""

import pytest
import torch
from torch import nn

from ds_fp4 import hadamard, nvfp4
from ds_fp4.linear import NVFP4Linear
from ds_fp4.recipe import NVFP4Recipe


def sqnr_db(approx: torch.Tensor, exact: torch.Tensor) -> float:
    exact = exact.double()
    return (10 * torch.log10(exact.pow(2).sum() / (approx.double() - exact).pow(2).sum())).item()


def _pair(in_f=128, out_f=96, bias=True, seed=0, recipe=None, dtype=torch.float32):
    torch.manual_seed(seed)
    ref = nn.Linear(in_f, out_f, bias=bias, dtype=torch.float64)
    lin = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    lin.load_state_dict({k: v.to(dtype) for k, v in ref.state_dict().items()})
    return ref, NVFP4Linear.from_float(lin, recipe)


# Thresholds: one 4-bit operand alone gives ~20 dB on Gaussian data; a product of two ~17 dB; stochastic
# rounding of the gradient costs ~2-3 dB more. The bounds leave ~2 dB of margin over the measured values.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 33, 128), (256, 128)])
def test_forward_and_three_gradients_against_float64(dtype, shape):
    ref, q = _pair(dtype=dtype)
    g = torch.Generator().manual_seed(1)
    x64 = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    y64 = ref(x64)
    dy = torch.randn(y64.shape, generator=g, dtype=torch.float64)
    y64.backward(dy)
    x = x64.detach().to(dtype).requires_grad_()
    y = q(x)
    y.backward(dy.to(dtype))
    assert y.dtype == dtype and x.grad.dtype == dtype and q.weight.grad.dtype == dtype
    assert y.shape == y64.shape and x.grad.shape == x64.shape
    assert sqnr_db(y, y64) > 15
    assert sqnr_db(x.grad, x64.grad) > 12
    assert sqnr_db(q.weight.grad, ref.weight.grad) > 12
    assert sqnr_db(q.bias.grad, ref.bias.grad) > (40 if dtype == torch.bfloat16 else 100)  # high precision


def test_forward_matches_dequantize_matmul_exactly_in_structure():
    """fprop is exactly: quantize X (1x16) and W (16x16), decode, multiply, add the bias."""
    _, q = _pair()
    x = torch.randn(10, 128)
    expected = nvfp4.matmul(nvfp4.quantize(x), nvfp4.quantize(q.weight.detach(), tile=(16, 16))) + q.bias
    torch.testing.assert_close(q(x), expected, rtol=0, atol=0)


def test_wgrad_uses_rht_and_dgrad_does_not():
    """Run the three GEMMs by hand following docs/design.md §3 and compare with the layer, bit for bit."""
    _, q = _pair(in_f=64, out_f=48, bias=False)
    x = torch.randn(32, 64, requires_grad=True)
    dy = torch.randn(32, 48)
    torch.manual_seed(123)
    q(x).backward(dy)
    torch.manual_seed(123)
    from ds_fp4 import rng

    s_dgrad, s_wgrad = rng.draw_seed(), rng.draw_seed()
    w = q.weight.detach()
    dyq = nvfp4.quantize(dy, rounding="stochastic", seed=s_dgrad)
    dx = nvfp4.matmul(dyq, nvfp4.quantize(w.t().contiguous(), tile=(16, 16)))
    dyq_t = nvfp4.quantize(dy.t(), rounding="stochastic", hadamard=hadamard.DEFAULT_SIGNS, seed=s_wgrad)
    xq_t = nvfp4.quantize(x.detach().t(), hadamard=True)
    dw = nvfp4.matmul(dyq_t, xq_t)
    assert torch.equal(x.grad, dx) and torch.equal(q.weight.grad, dw)


def test_token_count_not_divisible_by_16_is_padded_for_wgrad():
    ref, q = _pair(in_f=32, out_f=32)
    x64 = torch.randn(3, 7, 32, dtype=torch.float64, requires_grad=True)  # 21 tokens
    ref(x64).sum().backward()
    x = x64.detach().float().requires_grad_()
    q(x).sum().backward()
    assert sqnr_db(q.weight.grad, ref.weight.grad) > 12


def test_same_seed_reproduces_gradients_bit_for_bit():
    grads = []
    for _ in range(2):
        _, q = _pair()
        torch.manual_seed(5)
        x = torch.randn(64, 128, requires_grad=True)
        q(x).square().sum().backward()
        grads.append((x.grad, q.weight.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_inactive_layer_is_plain_linear():
    _, q = _pair()
    x = torch.randn(8, 128)
    q.nvfp4_active = False
    torch.testing.assert_close(q(x), nn.functional.linear(x, q.weight, q.bias), rtol=0, atol=0)


@pytest.mark.parametrize("recipe", [NVFP4Recipe.no_2d(), NVFP4Recipe.no_rht(), NVFP4Recipe.no_sr()])
def test_ablation_recipes_run(recipe):
    ref, q = _pair(recipe=recipe)
    x64 = torch.randn(64, 128, dtype=torch.float64, requires_grad=True)
    ref(x64).sum().backward()
    x = x64.detach().float().requires_grad_()
    q(x).sum().backward()
    assert sqnr_db(x.grad, x64.grad) > 12 and sqnr_db(q.weight.grad, ref.weight.grad) > 12


def test_from_float_shares_parameters_and_keeps_hooks():
    lin = nn.Linear(32, 16)
    calls = []
    lin.register_forward_hook(lambda *a: calls.append(1))
    q = NVFP4Linear.from_float(lin)
    assert q.weight is lin.weight and q.bias is lin.bias
    q(torch.randn(2, 32))
    assert calls == [1]


@pytest.mark.parametrize("in_f, out_f, name", [(30, 16, "in_features=30"), (32, 20, "out_features=20")])
def test_dims_not_divisible_by_16_raise(in_f, out_f, name):
    with pytest.raises(ValueError, match=name):
        NVFP4Linear(in_f, out_f)


def test_no_grad_inference_saves_nothing_and_works(monkeypatch):
    """Under no_grad the layer builds no graph, saves no tensor for backward and does not even quantize
    the backward operands (X^T with the RHT, W^T); its output equals the training forward's bit for bit."""
    _, q = _pair()
    x = torch.randn(4, 128)
    quantized = []  # (what, hadamard) of every quantization the layer runs
    real_quantize, real_quantize_weight = nvfp4.quantize, nvfp4.quantize_weight
    monkeypatch.setattr(nvfp4, "quantize", lambda t, **kw: quantized.append(("quantize", kw.get("hadamard")))
                        or real_quantize(t, **kw))
    monkeypatch.setattr(nvfp4, "quantize_weight", lambda w, **kw: quantized.append(("quantize_weight", None))
                        or real_quantize_weight(w, **kw))
    saved = []

    def run(grad: bool) -> torch.Tensor:
        quantized.clear()
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            with torch.set_grad_enabled(grad):
                return q(x.clone().requires_grad_())  # an input that requires grad: dgrad would be wanted

    y_train = run(grad=True)
    assert y_train.grad_fn is not None and len(saved) == 6  # X^T and W^T, each data, scale and amax
    assert quantized == [("quantize_weight", None), ("quantize", None), ("quantize", hadamard.DEFAULT_SIGNS)]
    y = run(grad=False)
    assert y.grad_fn is None and not y.requires_grad
    assert saved == [], "nothing may be kept for a backward that cannot run"
    assert quantized == [("quantize", None), ("quantize", None)]  # W for fprop, X for fprop: nothing else
    assert y.shape == (4, 96) and torch.equal(y, y_train.detach())


def test_collect_stats_reports_health_of_input_weight_and_grad():
    from ds_fp4.stats import collect_stats

    _, q = _pair()
    model = nn.Sequential(q)
    x = torch.randn(64, 128)
    with collect_stats(model) as figures:
        model(x).square().sum().backward()
    layer = figures["0"]
    assert set(layer) == {"input", "weight", "grad"}
    for tensor in layer.values():
        assert set(tensor) == {"amax", "underflow", "saturated", "sqnr_db"}
        assert 12 < tensor["sqnr_db"] < 30  # 4-bit Gaussian-ish data
        assert 0 < tensor["saturated"] <= 1 and tensor["underflow"] == 0
    assert layer["input"]["amax"] == x.abs().max().item()
    assert q.stats_sink is None  # switched off again
    # x needs no grad above, so "grad" is wgrad's RHT operand; with dgrad it is dgrad's plain dY.
    xg = x.clone().requires_grad_()
    with collect_stats(model) as figures:
        y = model(xg)
        y.backward(2 * y.detach())
    assert figures["0"]["grad"]["amax"] == (2 * y.detach()).abs().max().item() != layer["grad"]["amax"]
    # Outside the block nothing is collected.
    model(x).sum().backward()
    assert q.stats_sink is None


def test_stats_see_underflow_when_dynamic_range_exceeds_e4m3():
    from ds_fp4.nvfp4 import quantize
    from ds_fp4.stats import health

    x = torch.randn(16, 64)
    x[:, :16] *= 1e-9  # these blocks' scales fall below E4M3's smallest subnormal
    figures = health(x, quantize(x))
    assert figures["underflow"] == pytest.approx(16 / 64)

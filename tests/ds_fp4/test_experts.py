"""NVFP4 fused MoE experts (ds_fp4.experts) on tiny transformers models built from AutoConfig (no download).

Each model's experts module is run through transformers' experts-implementation registry; these tests
check the conversion report, the block's output against BF16, that every expert is exactly an
NVFP4Linear of its own (weights quantized per expert), the Triton path bit for bit against the torch
reference under the interpreter, and the edge cases of routing (experts with no token, token counts
not divisible by 16).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ds_fp4 import NVFP4Recipe, convert_to_nvfp4, experts, set_nvfp4_active
from ds_fp4.convert import find_blocks
from ds_fp4.linear import NVFP4LinearFunction

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.integrations.moe")
from tiny_runs import TINY_MOE, TINY_MOE_COMMON  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

COMMON = {**TINY_MOE_COMMON, "vocab_size": 256, "max_position_embeddings": 128}
MODELS = TINY_MOE


def tiny(name: str, **overrides) -> nn.Module:
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(name, **{**COMMON, **MODELS[name], **overrides})
    return AutoModelForCausalLM.from_config(cfg).eval()


def experts_modules(model):
    return [(n, m) for n, m in model.named_modules() if experts.is_fused_experts(m)]


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.double().pow(2).sum() / (out.double() - ref.double()).pow(2).sum()))


@pytest.mark.parametrize("name", list(MODELS))
def test_the_report_lists_every_expert_projection_and_both_nvfp4_shares(name):
    model = tiny(name)
    found = experts_modules(model)
    assert found, f"{name}: no fused experts module"
    report = convert_to_nvfp4(model, NVFP4Recipe.paper(keep_first_blocks=0, keep_last_blocks=0))
    rows = {d.name: d for d in report.layers if d.experts}
    for mod_name, mod in found:
        for proj, weight, _ in experts.projections(mod):
            d = rows[f"{mod_name}.{proj}"]
            assert d.converted and d.experts == 8 and d.active == 2
            assert (d.experts, d.out_features, d.in_features) == experts.logical_shape(mod, weight)
            assert f"[8 experts x {d.out_features}x{d.in_features}, 2 per token]" in str(report)
        assert mod.config._experts_implementation == experts.IMPLEMENTATION
    # Both shares; the FLOPs share counts 2 of 8 experts per token, so it is below the parameter share.
    assert 0.3 < report.flops_fraction < report.param_fraction < 1, str(report)
    # Nothing stays in high precision silently: every matrix weight is in the report.
    listed = {f"{d.name}.weight" for d in report.layers if not d.experts} | set(rows) | {o.name for o in report.others}
    embeddings = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    for pname, p in model.named_parameters():
        if p.dim() >= 2 and pname not in embeddings and not pname.endswith("bias"):  # [E, out] expert biases
            assert pname in listed or pname.removesuffix(".weight") in listed, f"{pname} is not in the report"
    routers = [o for o in report.others if o.reason.startswith("router")]
    assert len(routers) == len(found), str(report)


def _moe_block(model):
    name, _ = experts_modules(model)[0]
    return model.get_submodule(name.rpartition(".")[0])


@pytest.mark.parametrize("name", list(MODELS))
def test_the_sparse_moe_block_differs_from_bf16_by_nvfp4_error(name):
    model = tiny(name)
    block = _moe_block(model)
    torch.manual_seed(1)
    x = torch.randn(2, 37, COMMON["hidden_size"])  # 74 tokens: no expert count is a multiple of 16 by design
    with torch.no_grad():
        ref = block(x)
        ref = ref[0] if isinstance(ref, tuple) else ref
        convert_to_nvfp4(model, NVFP4Recipe.paper(keep_first_blocks=0, keep_last_blocks=0))
        out = block(x)
        out = out[0] if isinstance(out, tuple) else out
    db = sqnr_db(ref, out)
    assert not torch.equal(ref, out)
    assert 9.0 < db < 30.0, f"{name}: SQNR {db:.1f} dB"


def _expert_inputs(transposed: bool, bias: bool, dtype=torch.float32):
    torch.manual_seed(3)
    e, out_f, in_f = 4, 48, 32
    counts = [5, 0, 17, 16]  # an expert without tokens, counts not divisible by 16
    x = torch.randn(sum(counts), in_f, dtype=dtype, requires_grad=True)
    shape = (e, in_f, out_f) if transposed else (e, out_f, in_f)
    w = (torch.randn(shape) * torch.tensor([1.0, 3.0, 0.01, 100.0]).view(-1, 1, 1)).to(dtype).requires_grad_(True)
    b = torch.randn(e, out_f, dtype=dtype, requires_grad=True) if bias else None
    dy = torch.randn(sum(counts), out_f, dtype=dtype)
    return x, w, b, counts, dy


class Recorder:
    """A stats sink that keeps every quantized operand (role, codes, block scales, amax), in call order."""

    def __init__(self):
        self.seen = []

    def record(self, role, x, q, *, replace=True):
        self.seen.append((role, q.data.clone(), q.scale.clone(), q.amax.clone()))


def _run_experts(recipe, transposed, bias, sink=None):
    x, w, b, counts, dy = _expert_inputs(transposed, bias)
    torch.manual_seed(11)  # the stochastic-rounding seeds
    y = experts.NVFP4ExpertsFunction.apply(x, w, b, counts, transposed, recipe, sink, True)
    y.backward(dy)
    return y, x.grad, w.grad, (b.grad if b is not None else None), counts


@pytest.mark.parametrize("transposed,bias", [(False, False), (True, True)])
def test_each_expert_is_exactly_an_nvfp4_linear_of_its_own(transposed, bias):
    recipe = NVFP4Recipe.paper(backend="torch")
    y, dx, dw, db, counts = _run_experts(recipe, transposed, bias)
    x, w, b, counts, dy = _expert_inputs(transposed, bias)
    torch.manual_seed(11)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            assert not dw[e].any() and (db is None or not db[e].any())
            continue
        x_e = x.detach()[start:start + n].clone().requires_grad_(True)
        w_e = (w.detach()[e].t() if transposed else w.detach()[e]).contiguous().requires_grad_(True)
        b_e = b.detach()[e].clone().requires_grad_(True) if b is not None else None
        y_e = NVFP4LinearFunction.apply(x_e, w_e, b_e, recipe, None, True)
        y_e.backward(dy[start:start + n])
        assert torch.equal(y[start:start + n], y_e)
        assert torch.equal(dx[start:start + n], x_e.grad)
        assert torch.equal(dw[e].t() if transposed else dw[e], w_e.grad)
        if b is not None:
            assert torch.equal(db[e], b_e.grad)
        start += n


@pytest.mark.parametrize("transposed,bias", [(False, False), (True, True)])
def test_the_triton_expert_path_is_bit_exact_with_the_reference(transposed, bias):
    """Every quantization of every expert (X, W, dY for dgrad, dY^T with the RHT and stochastic rounding
    for wgrad) is bit-exact; the GEMM outputs agree to fp32 accumulation order."""
    from ds_fp4 import kernels

    ok, why = kernels.available(torch.device("cpu"))
    if not ok:
        pytest.skip(why)
    ref_sink, tri_sink = Recorder(), Recorder()
    ref = _run_experts(NVFP4Recipe.paper(backend="torch"), transposed, bias, ref_sink)
    tri = _run_experts(NVFP4Recipe.paper(backend="triton"), transposed, bias, tri_sink)
    # 3 experts with tokens: X and W in forward, dY for dgrad and dY^T for wgrad in backward.
    assert [r[0] for r in ref_sink.seen] == [r[0] for r in tri_sink.seen] and len(ref_sink.seen) == 12
    for (role, *r), (_, *t) in zip(ref_sink.seen, tri_sink.seen, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(r, t, strict=True)), role
    for r, t, what in zip(ref[:4], tri[:4], ("y", "dx", "dw", "db"), strict=True):
        if r is not None:
            assert torch.allclose(t, r, rtol=1e-5, atol=1e-6 * float(r.abs().max())), what


def test_experts_not_converted_run_the_models_previous_implementation_bit_for_bit():
    model = tiny("qwen3_moe")
    before = model.config._experts_implementation
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))
    first = model.model.layers[0].mlp
    x = torch.randn(1, 19, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref_block, ref_logits = first(x), model(ids).logits
        report = convert_to_nvfp4(model, NVFP4Recipe.paper(keep_first_blocks=1, keep_last_blocks=1))
        kept = report.kept["model.layers.0.mlp.experts.gate_up_proj"]
        assert "block 0 is among the first 1 (keep_first_blocks)" in kept
        assert torch.equal(first(x), ref_block)  # still the model's own implementation
        assert not torch.equal(model(ids).logits, ref_logits)
        assert set_nvfp4_active(model, False) > 0
        assert torch.equal(model(ids).logits, ref_logits)
    assert getattr(model.config, experts.PREVIOUS_ATTR) == before


def test_experts_with_a_dim_not_divisible_by_16_stay_in_high_precision_with_the_reason():
    model = tiny("qwen3_moe", moe_intermediate_size=24)
    report = convert_to_nvfp4(model, NVFP4Recipe.paper(keep_first_blocks=0, keep_last_blocks=0))
    reason = report.kept["model.layers.1.mlp.experts.down_proj"]
    assert "in=24" in reason and "not divisible by 16" in reason
    assert getattr(model.model.layers[1].mlp.experts, "_ds_fp4", None) is None


def test_a_list_of_experts_inside_a_block_is_not_taken_for_the_blocks():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList(nn.Linear(16, 16) for _ in range(32))

    model = nn.Module()
    model.layers = nn.ModuleList(Block() for _ in range(4))
    path, blocks = find_blocks(model)
    assert path == "layers" and len(blocks) == 4


def test_a_converted_moe_model_trains_a_step_with_finite_gradients_for_every_used_expert():
    model = tiny("mixtral").train()
    convert_to_nvfp4(model, NVFP4Recipe.paper(keep_first_blocks=0, keep_last_blocks=0))
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(7))
    out = model(ids, labels=ids)
    out.loss.backward()
    for name, mod in experts_modules(model):
        grads = [w.grad for _, w, _ in experts.projections(mod)]
        assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads), name
    assert type(model.model.layers[0].mlp.experts).__name__ == "MixtralExperts"  # no model code forked


# Published config values (no download): Qwen3-30B-A3B, Mixtral-8x7B, DeepSeek-V3, gpt-oss-120b and the
# 56-layer Nemotron-H of Nemotron-Nano-9B-v2. The parameter counts check the transcription.
PUBLISHED = {
    "qwen3_moe": (30.5e9, {"hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
                           "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
                           "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8, "vocab_size": 151936}),
    "mixtral": (46.7e9, {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                         "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
                         "num_experts_per_tok": 2, "vocab_size": 32000}),
    "deepseek_v3": (671e9, {"hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
                            "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
                            "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8,
                            "first_k_dense_replace": 3, "n_group": 8, "topk_group": 4, "q_lora_rank": 1536,
                            "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
                            "v_head_dim": 128, "vocab_size": 129280}),
    "gpt_oss": (116.8e9, {"hidden_size": 2880, "intermediate_size": 2880, "num_hidden_layers": 36,
                          "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64,
                          "num_local_experts": 128, "num_experts_per_tok": 4, "vocab_size": 201088,
                          "sliding_window": 128}),
    "nemotron_h": (8.89e9, {"num_hidden_layers": 56, "hidden_size": 4480, "intermediate_size": 15680,
                            "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
                            "vocab_size": 131072, "ssm_state_size": 128, "conv_kernel": 4, "n_groups": 8,
                            "mamba_num_heads": 128, "mamba_head_dim": 80,
                            "hybrid_override_pattern": "M-M-M-MM-M-M-M*-M-M-M*-M-M-M-M*-M-M-M-M*-M-MM-M-M-M-M-M-"}),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_at_the_published_size_nvfp4_runs_at_least_80_percent_of_weight_flops_per_token(name):
    """Built on the meta device; the paper recipe without kept blocks (the kept blocks aside)."""
    params, values = PUBLISHED[name]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(name, **values))
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=0.01)
    report = convert_to_nvfp4(model, NVFP4Recipe.paper(keep_first_blocks=0, keep_last_blocks=0))
    assert report.flops_fraction >= 0.80, str(report).splitlines()[0]
    assert [d.name for d in report.layers if not d.converted] == ["lm_head"]

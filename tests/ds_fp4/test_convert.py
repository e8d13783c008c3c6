"""convert_to_nvfp4 on real Hugging Face models built from configs (no downloads)."""

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from ds_fp4 import NVFP4Linear, NVFP4Recipe, convert_to_nvfp4, set_nvfp4_active


def tiny_llama(layers=4, hidden=64, inter=176, vocab=256, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def test_report_on_llama_with_paper_recipe():
    model = tiny_llama(layers=5)
    report = convert_to_nvfp4(model, NVFP4Recipe.paper(keep_first_blocks=1, keep_last_blocks=2))
    assert report.blocks_path == "model.layers" and report.num_blocks == 5
    assert len(report.layers) == 5 * 7 + 1  # q k v o gate up down per block, plus lm_head
    converted = set(report.converted)
    for i in range(5):
        names = {f"model.layers.{i}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
        names |= {f"model.layers.{i}.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
        assert (names <= converted) == (i in (1, 2)), i
        assert (names & converted) == (names if i in (1, 2) else set())
    assert "keep_first_blocks" in report.kept["model.layers.0.mlp.up_proj"]
    assert "keep_last_blocks" in report.kept["model.layers.4.self_attn.q_proj"]
    assert "lm_head" in report.kept["lm_head"]
    assert isinstance(model.model.layers[1].mlp.down_proj, NVFP4Linear)
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert type(model.lm_head) is nn.Linear
    assert 0 < report.converted_fraction < 1
    assert "NVFP4 conversion: 14/36" in str(report)


def test_exclude_filter_and_indivisible_dims():
    model = tiny_llama(layers=3, inter=168)  # 168 is not a multiple of 16
    report = convert_to_nvfp4(
        model,
        NVFP4Recipe.all_fp4(exclude=["*.v_proj"]),
        module_filter_fn=lambda mod, name: not name.endswith("o_proj"),
    )
    assert "excluded by pattern '*.v_proj'" in report.kept["model.layers.1.self_attn.v_proj"]
    assert report.kept["model.layers.2.self_attn.o_proj"] == "rejected by module_filter_fn"
    assert "out_features=168 not divisible by 16" in report.kept["model.layers.0.mlp.up_proj"]
    assert "in_features=168 not divisible by 16" in report.kept["model.layers.0.mlp.down_proj"]
    assert "model.layers.0.self_attn.q_proj" in report.converted


def test_converting_twice_is_harmless():
    model = tiny_llama()
    first = convert_to_nvfp4(model, NVFP4Recipe.all_fp4())
    modules = {n: id(m) for n, m in model.named_modules()}
    second = convert_to_nvfp4(model, NVFP4Recipe.all_fp4())
    assert second.converted == first.converted
    assert {n: id(m) for n, m in model.named_modules()} == modules
    assert all(second.kept[n] == first.kept[n] for n in first.kept)


def test_disabled_recipe_converts_nothing():
    model = tiny_llama()
    report = convert_to_nvfp4(model, NVFP4Recipe.bf16())
    assert report.converted == []
    assert not any(isinstance(m, NVFP4Linear) for m in model.modules())


def test_gpt2_blocks_and_tied_head():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=3, n_head=4, n_positions=32))
    report = convert_to_nvfp4(model, NVFP4Recipe.all_fp4())
    assert report.blocks_path == "transformer.h" and report.num_blocks == 3
    # GPT-2 uses Conv1D, not nn.Linear, for its projections: only the (tied) lm_head is an nn.Linear.
    assert report.converted == [] and "lm_head" in report.kept


def _train(recipe, steps=30):
    model = tiny_llama(layers=4)
    report = convert_to_nvfp4(model, recipe)
    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 256, (64, 8), generator=g)
    data = base.repeat(1, 4)  # a learnable task: sequences with period 8
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(1)
    losses = []
    for _ in range(steps):
        batch = data[torch.randint(0, 64, (16,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return model, report, losses


def test_converted_llama_trains_and_loss_falls():
    model, report, losses = _train(NVFP4Recipe.paper())
    assert len(report.converted) == 14
    _, _, bf16 = _train(NVFP4Recipe.bf16())
    assert all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.85 * first
    assert abs(last - sum(bf16[-5:]) / 5) < 0.05 * last  # the BF16 twin lands within 5%
    assert set_nvfp4_active(model, False) == 14
    assert not model.model.layers[1].mlp.up_proj.nvfp4_active


def test_layers_outside_blocks_are_converted_unless_excluded():
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
    report = convert_to_nvfp4(model, NVFP4Recipe())
    assert report.blocks_path is None and report.converted == ["0", "2"]
    out = model(torch.randn(4, 32))
    assert out.shape == (4, 16)


@pytest.mark.parametrize("bad", ["paper", 3])
def test_bad_recipe_type_is_reported(bad):
    with pytest.raises(TypeError, match="NVFP4Recipe"):
        convert_to_nvfp4(tiny_llama(), bad)

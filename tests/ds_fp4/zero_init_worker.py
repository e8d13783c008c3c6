"""What a process sees inside ``deepspeed.zero.Init``, run as one gloo rank by test_zero_init.py.

Usage: python zero_init_worker.py OUT_DIR

zero.Init patches ``torch.Tensor.__new__`` and the float constructors (torch.tensor, empty, zeros, ...):
every floating-point tensor created inside it is cast to the engine's dtype. Two things went wrong there:
  * transformers 5 imports torch._dynamo from the first model module it loads, and dynamo's polyfill
    check rejects the patched ``__new__`` (TypeError "Signature mismatch ... tensor_pynew");
  * ds_fp4's fp32 constants and lazily built lookup tables came out bf16, so a quantization run inside
    zero.Init (and every one after it, through the cached tables) gave other bytes.
The worker imports ds_fp4 first, as any script that uses it does, then inside zero.Init builds a model
whose module was never imported, resolves every causal-LM class of transformers, and runs
:func:`battery` with cold caches. It writes OUT_DIR/imports.json and OUT_DIR/battery.pt.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch


def inputs() -> dict[str, torch.Tensor]:
    """Fixed operands, made outside zero.Init (inside it they would be cast to bf16)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 64, generator=g)
    x[0, :16] *= 1e3  # one loud block
    x[1, 16:32] = 0.0  # one zero block
    return {"x": x, "x_bf16": torch.randn(48, 64, generator=g).to(torch.bfloat16),
            "w": torch.randn(32, 64, generator=g) * 0.1, "dy": torch.randn(48, 32, generator=g)}


def nvfp4_layer(w: torch.Tensor) -> torch.nn.Module:
    """An NVFP4Linear holding ``w``, built outside zero.Init (inside, its weight would be partitioned)."""
    import ds_fp4
    from ds_fp4.linear import NVFP4Linear

    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    linear.weight.data.copy_(w)
    return NVFP4Linear.from_float(linear, ds_fp4.NVFP4Recipe.paper(backend="torch"))


def _q(q) -> list[torch.Tensor]:
    return [q.data, q.scale.view(torch.uint8), q.amax, q.dequantize()]


def battery(t: dict[str, torch.Tensor], layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every ds_fp4 computation that allocates: both backends, the layer, health figures, comm packing."""
    import ds_fp4
    from ds_fp4 import comm, nvfp4, stats

    out: dict[str, torch.Tensor] = {}
    for backend in ("torch", "triton"):
        cases = {"nearest": {}, "stochastic": {"rounding": "stochastic", "seed": 5}, "tile16": {"tile": (16, 16)},
                 "rht_sr_up": {"hadamard": True, "rounding": "stochastic", "seed": 6, "scale_rounding": "up"}}
        for name, kw in cases.items():
            for i, v in enumerate(_q(ds_fp4.quantize(t["x"], backend=backend, **kw))):
                out[f"{backend}.{name}.{i}"] = v
        a = ds_fp4.quantize(t["x_bf16"], backend=backend)
        wq, wq_t = nvfp4.quantize_weight(t["w"], backend=backend)
        out[f"{backend}.matmul"] = ds_fp4.matmul(a, wq, out_dtype=torch.bfloat16, backend=backend)
        out[f"{backend}.weight_t"] = wq_t.dequantize()

    x = t["x_bf16"].clone().requires_grad_(True)
    torch.manual_seed(11)  # the stochastic-rounding seeds of backward come from torch's CPU generator
    y = layer(x)
    y.backward(t["dy"].to(y.dtype))
    out.update({"layer.y": y.detach(), "layer.dx": x.grad, "layer.dw": layer.weight.grad})
    health = stats.health(t["x"], ds_fp4.quantize(t["x"], hadamard=True))
    out["health"] = torch.as_tensor([health[k] for k in sorted(health)], dtype=torch.float64)
    rows, _ = comm._shards(t["x"][:3].reshape(-1), 2)  # what a reduce-scatter puts on the wire, and back
    packed = comm.pack_rows(comm._quantize_rows(rows, "stochastic", comm.CommState(seed=3)))
    out["comm.packed"], out["comm.decoded"] = packed, comm.decode_rows(packed, rows.shape[1])
    return out


def trainer_builds(ds: dict) -> dict:
    """The trainer's ZeRO-3 build (launch.config.ModelConfig.build): tied embeddings stay tied, and every
    weight gets the model's own init (std of a tiny Llama's Linear and of Qwen3-MoE's torch.empty experts)."""
    import deepspeed

    from launch.config import ModelConfig

    out = {}
    for name, cfg in {
        "llama_tied": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "vocab_size": 256, "tie_word_embeddings": True},
        "qwen3_moe": {"model_type": "qwen3_moe", "hidden_size": 64, "intermediate_size": 128,
                      "moe_intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "num_key_value_heads": 2, "head_dim": 16, "num_experts": 8, "num_experts_per_tok": 2,
                      "vocab_size": 256},
    }.items():
        mc = ModelConfig(config=cfg)
        model = mc.build(mc.hf_config(256), ds)
        tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        stds = {}
        for pname, p in model.named_parameters():
            if len(getattr(p, "ds_shape", None) or p.shape) < 2:
                continue
            with deepspeed.zero.GatheredParameters([p]):
                stds[pname] = float(p.float().std()) if torch.isfinite(p.float()).all() else float("nan")
        out[name] = {"tied": tied, "std": stds}
    return out


def main(out_dir: Path) -> None:
    import deepspeed
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    import ds_fp4  # noqa: F401  (first, as in any script that uses ds_fp4)

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    deepspeed.init_distributed(dist_backend="gloo")
    fixed = inputs()
    layer = nvfp4_layer(fixed["w"])
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                      num_attention_heads=4, vocab_size=256)
    ds = {"train_batch_size": 1, "zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}
    failures = {}
    with deepspeed.zero.Init(config_dict_or_path=ds):
        built = type(transformers.AutoModelForCausalLM.from_config(config)).__name__
        for model_type, class_name in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()):
            try:
                getattr(transformers, class_name)
            except Exception as e:  # noqa: BLE001  (the test lists every failure)
                failures[model_type] = f"{class_name}: {type(e).__name__}: {str(e)[:300]}"
        results = battery(fixed, layer)
    (out_dir / "imports.json").write_text(json.dumps(
        {"built": built, "classes": len(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES), "failures": failures,
         "trainer_builds": trainer_builds(ds)}))
    torch.save(results, out_dir / "battery.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))

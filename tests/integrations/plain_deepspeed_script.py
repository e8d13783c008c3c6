"""A GPT-NeoX-style script: it parses DeepSpeed's own arguments and calls deepspeed.initialize itself.

    deepspeed --num_gpus 2 [--module ds_fp4.run] plain_deepspeed_script.py --deepspeed_config ds.json --out OUT

It never imports ds_fp4 to train. It trains a tiny Llama for --steps steps, and rank 0 writes
OUT/result.json: the losses, every parameter's bytes hashed, and the class of every Linear. Where ds_fp4
set the engine up it also records the engine's NVFP4 byte counters and, as a probe of the seeding, the
stochastic-rounding codes each rank draws for one fixed tensor right after torch.manual_seed(0).
"""

import argparse
import hashlib
import json
import os

import deepspeed
import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB, SEQ = 256, 32


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--local_rank", type=int, default=-1)
    args = deepspeed.add_config_arguments(parser).parse_args()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=SEQ))
    engine, _, _, _ = deepspeed.initialize(args=args, model=model, model_parameters=model.parameters())
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(100 + rank)
    losses = []
    for _ in range(args.steps):
        start = torch.randint(0, VOCAB, (8, 1), generator=g)
        ids = (start + torch.randint(1, 8, (8, 1), generator=g) * torch.arange(SEQ)) % VOCAB
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / dist.get_world_size())
    result = {"losses": losses, "world": dist.get_world_size(),
              "linears": {n: type(m).__name__ for n, m in engine.module.named_modules()
                          if isinstance(m, torch.nn.Linear)}}
    digest = hashlib.sha256()
    for name, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            digest.update(name.encode() + p.detach().float().numpy().tobytes())
    result["params_sha256"] = digest.hexdigest()
    if hasattr(engine, "nvfp4"):  # set by ds_fp4 when it built the engine
        result["comm"] = engine.nvfp4.comm_stats(reset=False)
        result["sr_codes"] = sr_probe()
    if rank == 0:
        with open(os.path.join(args.out, "result.json"), "w") as f:
            json.dump(result, f, indent=1)


def sr_probe() -> list[str]:
    """Every rank's stochastic-rounding codes for the same tensor after the same torch.manual_seed."""
    from ds_fp4 import quantize  # test instrumentation only

    torch.manual_seed(0)
    x = torch.linspace(-3, 3, 4096).reshape(16, 256)
    codes = hashlib.sha256(quantize(x, rounding="stochastic").data.numpy().tobytes()).hexdigest()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, codes)
    return gathered


if __name__ == "__main__":
    main()

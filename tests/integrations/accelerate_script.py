"""A plain Accelerate training loop, as a user has one: it never imports ds_fp4.

    accelerate launch --config_file acc.yaml -m ds_fp4.run accelerate_script.py OUT STEPS

The model and its optimizer are built before ``accelerator.prepare``, which calls deepspeed.initialize
with both. Rank 0 writes OUT/result.json: the losses, the class of every Linear, whether the prepared
model still holds the very Parameter objects the optimizer was built over, and (where ds_fp4 set the
engine up) its communication byte counters.
"""

import json
import os
import sys

import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB, SEQ = 256, 32


def sequences(n: int, seed: int) -> torch.Tensor:
    """Arithmetic progressions mod VOCAB: the next token follows from the previous two."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    step = torch.randint(1, 8, (n, 1), generator=g)
    return (start + step * torch.arange(SEQ)) % VOCAB


def main() -> None:
    out, steps = sys.argv[1], int(sys.argv[2])
    accelerator = Accelerator()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=SEQ))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    # The loader's batch size fills the config's "auto" micro-batch size.
    loader = torch.utils.data.DataLoader(sequences(8 * steps, seed=int(os.environ.get("RANK", "0"))), batch_size=8)
    engine, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    same_parameters = {id(p) for p in engine.module.parameters()} == optimized
    losses = []
    for ids in loader:
        loss = engine(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())  # this rank's loss
    if accelerator.is_main_process:
        state = getattr(engine, "nvfp4", None)  # set by ds_fp4 when it built the engine
        result = {
            "losses": losses,
            "linears": {n: type(m).__name__ for n, m in engine.module.named_modules()
                        if isinstance(m, torch.nn.Linear)},
            "same_parameters": same_parameters,
            "world": torch.distributed.get_world_size(),
            "comm": state.comm_stats(reset=False) if state is not None else None,
        }
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

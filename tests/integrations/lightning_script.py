"""PyTorch Lightning with DeepSpeedStrategy(config=...) after the one line ``ds_fp4.patch_deepspeed()``.

    python lightning_script.py OUT fit      Trainer.fit on the GPUs (Lightning's DeepSpeed strategy
                                            refuses any accelerator but CUDA); on CPU it records the refusal
    python lightning_script.py OUT setup    what runs without a GPU: the strategy's own model-and-optimizer
                                            setup (it calls deepspeed.initialize), then a few steps with the
                                            engine it returns, on one gloo rank

Writes OUT/result.json: the losses, the class of every Linear, the engine's NVFP4 byte counters, or the
error Lightning raised.
"""

import json
import os
import sys

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from transformers import LlamaConfig, LlamaForCausalLM

import ds_fp4

ds_fp4.patch_deepspeed()  # the one line

VOCAB, SEQ, BATCH = 256, 32, 8
CONFIG = {"train_micro_batch_size_per_gpu": BATCH, "zero_optimization": {"stage": 2},
          "nvfp4": {"grad_comm": "nvfp4", "keep_first_blocks": 0, "keep_last_blocks": 0}}


def sequences(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    step = torch.randint(1, 8, (n, 1), generator=g)
    return (start + step * torch.arange(SEQ)) % VOCAB


class TinyLlama(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                                  num_hidden_layers=4, num_attention_heads=4,
                                                  num_key_value_heads=2, max_position_embeddings=SEQ))
        self.losses = []

    def forward(self, ids):
        loss = self.model(input_ids=ids, labels=ids).loss
        self.losses.append(loss.item())
        return loss

    def training_step(self, ids, _):
        return self(ids)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(sequences(BATCH * 30, seed=self.global_rank), batch_size=BATCH)


def linears(module) -> dict:
    return {n: type(m).__name__ for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}


def fit(out: str) -> dict:
    module = TinyLlama()
    trainer = L.Trainer(accelerator="auto", devices="auto", strategy=DeepSpeedStrategy(config=CONFIG), max_steps=30,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False)
    try:
        trainer.fit(module)
    except RuntimeError as e:
        return {"error": str(e)}
    engine = trainer.strategy.deepspeed_engine
    return {"losses": module.losses, "linears": linears(engine.module), "comm": engine.nvfp4.comm_stats(reset=False)}


def setup(out: str) -> dict:
    import deepspeed

    from ds_fp4.deepspeed_patches import disable_cpu_shm_comm

    disable_cpu_shm_comm()  # an inference-only op: skips its ~60 s JIT build on a fresh machine
    deepspeed.init_distributed(dist_backend="gloo")
    module = TinyLlama()
    strategy = DeepSpeedStrategy(config=CONFIG)
    strategy.parallel_devices = [torch.device("cpu", 0)]  # DeepSpeed reads the device index as the local rank
    engine, _ = strategy._setup_model_and_optimizers(module, [module.configure_optimizers()])
    rank = int(os.environ.get("RANK", "0"))
    for ids in torch.utils.data.DataLoader(sequences(BATCH * 20, seed=rank), batch_size=BATCH):
        loss = engine(ids)
        engine.backward(loss)
        engine.step()
    return {"losses": module.losses, "linears": linears(engine.module), "comm": engine.nvfp4.comm_stats(reset=False)}


if __name__ == "__main__":
    out, mode = sys.argv[1], sys.argv[2]
    result = {"fit": fit, "setup": setup}[mode](out)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(result, f, indent=1)

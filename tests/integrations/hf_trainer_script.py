"""A plain Hugging Face Trainer script, as a user has one: it never imports ds_fp4.

    deepspeed --num_gpus 2 --module ds_fp4.run hf_trainer_script.py --deepspeed ds.json --output_dir OUT ...

It trains a tiny Llama built from a config (ZeRO-3 builds it partitioned: TrainingArguments with a
DeepSpeed config comes first) on a learnable synthetic sequence task, and rank 0 writes OUT/result.json:
the Trainer's log_history and the class of every Linear module of the trained model.
"""

import json
import os

import torch
from transformers import AutoModelForCausalLM, HfArgumentParser, LlamaConfig, Trainer, TrainingArguments

VOCAB, SEQ, SAMPLES = 256, 32, 256


class Sequences(torch.utils.data.Dataset):
    """Arithmetic progressions mod VOCAB: the next token follows from the previous two."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        step = torch.randint(1, 8, (n, 1), generator=g)
        self.ids = (start + step * torch.arange(SEQ)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses()
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config)  # under ZeRO-3: built partitioned (zero.Init)
    trainer = Trainer(model=model, args=args, train_dataset=Sequences(SAMPLES, args.seed))
    trainer.train(resume_from_checkpoint=os.environ.get("RESUME_FROM") or None)
    if trainer.is_world_process_zero():
        linears = {name: type(m).__name__ for name, m in trainer.model.named_modules()
                   if isinstance(m, torch.nn.Linear)}
        result = {"log_history": trainer.state.log_history, "linears": linears}
        with open(os.path.join(args.output_dir, "result.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

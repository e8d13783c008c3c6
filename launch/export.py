"""Export a training checkpoint as a Hugging Face model directory.

    python -m launch.export runs/demo-cpu/checkpoints/step_00000200 runs/demo-cpu/hf
    AutoModelForCausalLM.from_pretrained("runs/demo-cpu/hf")

Writes model.safetensors, config.json, generation_config.json, and the run's tokenizer (tokenizer.json,
wrapped as a PreTrainedTokenizerFast with its end-of-document token). The weights are DeepSpeed's FP32
master weights consolidated from any ZeRO stage (zero_to_fp32), cast to the dtype the model trained in
(bf16 when the config enabled it), i.e. exactly the weights the engine's module held.

The exported model is a plain high-precision model: NVFP4 is a training format here, so its logits are
the trainer's logits with the NVFP4 layers switched off (nvfp4_active = False), not with them on.

The files it reads besides the checkpoint are written by the trainer at the start of a run, through
:func:`write_run_files` below, so that writer and reader of that layout live together.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def write_run_files(run_dir: Path, raw_config: dict, hf_config, dataset) -> None:
    """What export needs later, under ``run_dir``: the run config as given (run_config.json), the model
    config (model/config.json), the tokenizer and the data's eos id, vocab size and seq_len (model/)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run_config.json").write_text(json.dumps(raw_config, indent=1))
    hf_config.save_pretrained(run_dir / "model")
    if dataset.tokenizer_path:
        (run_dir / "model" / "tokenizer.json").write_bytes(Path(dataset.tokenizer_path).read_bytes())
    meta = {"eos_id": dataset.eos_id, "vocab_size": dataset.vocab_size, "seq_len": dataset.seq_len}
    (run_dir / "model" / "data.json").write_text(json.dumps(meta, indent=1))


def _checkpoint_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """FP32 weights from a DeepSpeed checkpoint directory (one tag) of any ZeRO stage."""
    meta = json.loads((checkpoint / "meta.json").read_text()) if (checkpoint / "meta.json").is_file() else {}
    if int(meta.get("zero_stage", 1)) > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    states = torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in states["module"].items()}


def _training_dtype(run_dir: Path) -> torch.dtype:
    cfg_path = run_dir / "run_config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        if (cfg.get("bf16") or {}).get("enabled"):
            return torch.bfloat16
        if (cfg.get("fp16") or {}).get("enabled"):
            return torch.float16
    return torch.float32


def export(checkpoint: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write the HF directory for ``checkpoint`` (…/checkpoints/step_N) into ``out_dir``."""
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if not (checkpoint / "COMPLETE").is_file():
        raise ValueError(f"{checkpoint} is not a complete checkpoint (no COMPLETE marker); pick one listed in "
                         f"{checkpoint.parent / 'latest'}")
    run_dir = checkpoint.parent.parent
    model_dir = run_dir / "model"
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir}/config.json is missing: the trainer writes it at the start of a run")
    dtype = dtype or _training_dtype(run_dir)
    config = AutoConfig.from_pretrained(model_dir)
    config.torch_dtype = dtype
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    state = _checkpoint_state(checkpoint)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"checkpoint {checkpoint} does not match the model config: missing {missing}, "
                         f"unexpected {unexpected}")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok_file = model_dir / "tokenizer.json"
    if tok_file.is_file():
        data = json.loads((model_dir / "data.json").read_text()) if (model_dir / "data.json").is_file() else {}
        tok = PreTrainedTokenizerFast(tokenizer_file=str(tok_file))
        eos_id = data.get("eos_id")
        if eos_id is not None:
            tok.eos_token = tok.convert_ids_to_tokens(int(eos_id))
        tok.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a checkpoint directory, e.g. runs/x/checkpoints/step_00000200")
    p.add_argument("out_dir")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weights dtype (default: the dtype the run trained in)")
    args = p.parse_args(argv)
    out = export(args.checkpoint, args.out_dir, getattr(torch, args.dtype) if args.dtype else None)
    print(f"exported {args.checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Export a training checkpoint as a Hugging Face model directory.

    python -m launch.export runs/demo-cpu/checkpoints/step_00000200 runs/demo-cpu/hf
    AutoModelForCausalLM.from_pretrained("runs/demo-cpu/hf")

Writes model.safetensors, config.json, generation_config.json, and the run's tokenizer (tokenizer.json,
wrapped as a PreTrainedTokenizerFast). The weights are DeepSpeed's FP32 master weights consolidated from
any ZeRO stage (zero_to_fp32), cast to the dtype the model trained in (bf16 when the config enabled it),
i.e. exactly the weights the engine's module held.

The exported model is a plain high-precision model: NVFP4 is a training format here, so its logits are
the trainer's logits with the NVFP4 layers switched off (nvfp4_active = False), not with them on.

Special tokens come from the run's tokenizer and data, never from the model config's defaults (Llama's
bos 1 / eos 2 name ordinary tokens of a trained BPE, so generate would never stop):
- EOS is the token that separated the documents in training (model/data.json eos_id, which prepare took
  from the tokenizer). config.json and generation_config.json name it, so generate stops there.
- BOS is the EOS as well (as in GPT-2): the data pipeline adds no BOS, so in training every document
  began right after an EOS, and generate without a prompt starts where a document starts.
- PAD is the tokenizer's own pad token (tokenizer.json's padding), else the EOS. generation_config.json
  and the tokenizer name it either way; config.json names it only when it is a token of its own, because
  config.json's pad_token_id becomes the embedding's padding_idx, whose row gets no gradient: an EOS pad
  there would freeze the EOS embedding in any fine-tune of the export. Padding is masked, so the choice
  does not change what the model computes.
- The tokenizer adds no special tokens when it encodes (training encoded with add_special_tokens=False);
  a tokenizer.json whose post-processor adds some (a BOS, say) gets it replaced, and export says so.
- model_max_length is the run's seq_len, the longest context the model trained on.

Positions: a run that trained at seq_len > max_position_embeddings (the trainer refuses that now, but
older runs exist) is exported with max_position_embeddings = seq_len when its rotary embedding does not
depend on that number (rope_type "default" or "linear": the exported model computes what the trainer
computed). Otherwise raising it would change the trained model's numbers, so the config's value is kept
and export prints a warning that says why.

File modes: safetensors (0.8) writes through a temporary file that it renames into place, and such files
are created 0600; the export gives them the mode open() gives any new file (0666 less the umask), so a
model exported for others can be read by them. The run files below are written the same way, whole or
not at all (a temporary file, fsynced, then renamed), with open()'s mode.

The files it reads besides the checkpoint are written by the trainer at the start of a run, through
:func:`write_run_files` below, so that writer and reader of that layout live together.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from .checkpoint import atomic_file, atomic_write

RUN_CONFIG = "run_config.json"
ROPE_INDEPENDENT_OF_LENGTH = ("default", "linear")  # rope types whose frequencies ignore max_position_embeddings


def _keep_previous_run_config(run_dir: Path, raw_config: dict) -> Path | None:
    """Before run_config.json is replaced by a different config, keep it as run_config.<n>.json, n one more
    than the highest kept so far (1, 2, ...): run_config.json is the config of the latest start, and the
    numbers count the earlier configs up in the order they were replaced. Returns the kept path."""
    current = run_dir / RUN_CONFIG
    if not current.is_file():
        return None
    text = current.read_text()
    try:
        if json.loads(text) == raw_config:
            return None
    except ValueError:
        pass  # unreadable: different from anything we would write, so keep it as it is
    numbers = [int(n) for p in run_dir.glob("run_config.*.json") if (n := p.name.split(".")[1]).isdigit()]
    kept = run_dir / f"run_config.{max(numbers, default=0) + 1}.json"
    atomic_write(kept, text)
    return kept


def write_run_files(run_dir: Path, raw_config: dict, hf_config, dataset) -> None:
    """What export needs later, under ``run_dir``: the run config as given (run_config.json), the model
    config (model/config.json), the tokenizer and the data's eos id, vocab size and seq_len (model/).

    Called at every start of a run, resumes included. A resume with a different config keeps the previous
    run_config.json as run_config.<n>.json (n = 1, 2, ... in the order they were replaced), so no config a
    run ever trained with is lost; the same config again writes nothing new."""
    model_dir = run_dir / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    kept = _keep_previous_run_config(run_dir, raw_config)
    if kept is not None or not (run_dir / RUN_CONFIG).is_file():
        atomic_write(run_dir / RUN_CONFIG, json.dumps(raw_config, indent=1))
    if kept is not None:
        print(f"the run config changed: the previous one is kept as {kept}", flush=True)
    atomic_write(model_dir / "config.json", hf_config.to_json_string(use_diff=True))
    if dataset.tokenizer_path:
        # Byte for byte (checked against the manifest's SHA-256), from wherever the data lives (s3:// too),
        # whole or not at all.
        with atomic_file(model_dir / "tokenizer.json", binary=True) as f:
            f.write(dataset.tokenizer_bytes())
    meta = {"eos_id": dataset.eos_id, "vocab_size": dataset.vocab_size, "seq_len": dataset.seq_len}
    atomic_write(model_dir / "data.json", json.dumps(meta, indent=1))


def _checkpoint_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """FP32 weights from a DeepSpeed checkpoint directory (one tag) of any ZeRO stage."""
    meta = json.loads((checkpoint / "meta.json").read_text()) if (checkpoint / "meta.json").is_file() else {}
    if int(meta.get("zero_stage", 1)) > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    states = torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in states["module"].items()}


def _training_dtype(run_dir: Path) -> torch.dtype:
    cfg_path = run_dir / RUN_CONFIG
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        if (cfg.get("bf16") or {}).get("enabled"):
            return torch.bfloat16
        if (cfg.get("fp16") or {}).get("enabled"):
            return torch.float16
    return torch.float32


def hf_tokenizer(tokenizer_file: Path, eos_id: int, seq_len: int | None):
    """(the run's tokenizer as a PreTrainedTokenizerFast with the special tokens of the module docstring,
    whether its pad token is its own rather than the EOS)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_file(str(tokenizer_file))
    eos = backend.id_to_token(eos_id)
    if eos is None:
        raise ValueError(f"the run's eos_id {eos_id} (model/data.json) is not an id of {tokenizer_file} "
                         f"({backend.get_vocab_size()} ids): the run files do not belong together")
    own_pad = (backend.padding or {}).get("pad_token")
    kwargs = {"eos_token": eos, "bos_token": eos, "pad_token": own_pad or eos}
    if seq_len:
        kwargs["model_max_length"] = seq_len
    if backend.num_special_tokens_to_add(False) or backend.num_special_tokens_to_add(True):
        # Training never saw tokens a post-processor adds; an explicit add_*_token replaces the post-processor.
        kwargs.update(add_bos_token=False, add_eos_token=False)
        print(f"note: {tokenizer_file}'s post-processor adds special tokens, which training never saw (the data "
              "was encoded with add_special_tokens=False); the exported tokenizer adds none", flush=True)
    return PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), **kwargs), own_pad is not None


def _fit_positions(config, seq_len: int | None) -> None:
    """max_position_embeddings >= the trained seq_len where that keeps the trained numbers (module docstring)."""
    mpe = getattr(config, "max_position_embeddings", None)
    if not seq_len or mpe is None or mpe >= seq_len:
        return
    rope = getattr(config, "rope_parameters", None)
    rope_type = rope.get("rope_type") if isinstance(rope, dict) else None
    said = (f"the model config (model/config.json) has max_position_embeddings {mpe} < the run's seq_len "
            f"{seq_len} (model/data.json), so the run trained on positions the config does not cover")
    if rope_type in ROPE_INDEPENDENT_OF_LENGTH:
        config.max_position_embeddings = seq_len
        print(f"note: {said}; exported with max_position_embeddings {seq_len} (rope_type {rope_type!r} does not "
              "depend on it, so the exported model computes what the trainer computed)", flush=True)
    else:
        why = (f"rope_type {rope_type!r} derives its frequencies from it, so raising it would change the "
               "trained model's numbers" if rope_type else "the model has no single rotary position embedding "
               "whose numbers are known not to depend on it")
        print(f"warning: {said}; kept max_position_embeddings {mpe}, because {why}", file=sys.stderr, flush=True)


def _set_special_ids(model, tok, has_own_pad: bool, eos_id: int) -> None:
    """config.json and generation_config.json name the tokenizer's bos/eos/pad ids (module docstring)."""
    bos, eos, pad = (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) if tok else (eos_id, eos_id, eos_id)
    model.config.bos_token_id, model.config.eos_token_id = bos, eos
    model.config.pad_token_id = pad if has_own_pad else None
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = bos, eos, pad


def _umask() -> int:
    """The process umask, read from /proc where Linux offers it (changing it, even for a moment, would
    race with other threads creating files), else by setting and restoring it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def export(checkpoint: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write the HF directory for ``checkpoint`` (…/checkpoints/step_N) into ``out_dir``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if not (checkpoint / "COMPLETE").is_file():
        raise ValueError(f"{checkpoint} is not a complete checkpoint (no COMPLETE marker); pick one listed in "
                         f"{checkpoint.parent / 'latest'}")
    run_dir = checkpoint.parent.parent
    model_dir = run_dir / "model"
    for name in ("config.json", "data.json"):
        if not (model_dir / name).is_file():
            raise ValueError(f"{model_dir / name} is missing: the trainer writes it at the start of a run")
    data = json.loads((model_dir / "data.json").read_text())
    eos_id, seq_len = int(data["eos_id"]), data.get("seq_len")
    tok_file = model_dir / "tokenizer.json"
    tok, has_own_pad = hf_tokenizer(tok_file, eos_id, seq_len) if tok_file.is_file() else (None, False)
    if tok is None:
        print(f"note: the run has no tokenizer ({tok_file} is missing), so none is exported", flush=True)
    dtype = dtype or _training_dtype(run_dir)
    config = AutoConfig.from_pretrained(model_dir)
    config.dtype = dtype
    _fit_positions(config, seq_len)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    state = _checkpoint_state(checkpoint)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"checkpoint {checkpoint} does not match the model config: missing {missing}, "
                         f"unexpected {unexpected}")
    _set_special_ids(model, tok, has_own_pad, eos_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    if tok is not None:
        tok.save_pretrained(out_dir)
    mode = 0o666 & ~_umask()
    for weights in out_dir.glob("*.safetensors"):  # safetensors' own writer made them 0600 (module docstring)
        weights.chmod(mode)
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

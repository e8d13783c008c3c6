"""Tokenizers for prepare: load a Hugging Face tokenizer.json, or train a byte-level BPE on the input.

Why byte-level BPE as the embedded default: it needs no download (nothing outside the package
registries is reachable here, and none is needed on a cluster), it can encode any byte string, and
training it on the corpus itself gives a sensible vocabulary for whatever the user brings. The trained
tokenizer is saved next to the data, and its SHA-256 goes into the manifest, so a dataset always names
the exact tokenizer that produced it.

The worker half (`init_worker`, `encode_task`) lives here too because spawned processes must import
it by module path: tokenization runs in a process pool so that encoding scales past one core, while
the parent stays the single, ordered writer that makes the output independent of the worker count.
Traded off: texts travel to workers through pipes (a copy), which is simpler and deterministic; the
tokenizer's own thread pool is switched off inside workers so processes do not oversubscribe cores.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

import numpy as np

__all__ = ["DEFAULT_EOS", "MIN_TRAINED_VOCAB", "train_bpe", "load_tokenizer", "eos_id_of", "sha256_text"]

DEFAULT_EOS = "<|endoftext|>"
EOS_CANDIDATES = (DEFAULT_EOS, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[SEP]")
MIN_TRAINED_VOCAB = 257  # 256 byte symbols + the EOS token


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def train_bpe(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE with `vocab_size` ids (the EOS token is id 0), trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not isinstance(vocab_size, int) or vocab_size < MIN_TRAINED_VOCAB:
        raise ValueError(
            f"vocab_size={vocab_size!r} is too small for a byte-level BPE; use >= {MIN_TRAINED_VOCAB} "
            "(256 byte symbols + the EOS token), e.g. 8192"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[DEFAULT_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(json_text: str, where: str):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_str(json_text)
    except Exception as exc:  # tokenizers raises a bare Exception for bad JSON
        raise ValueError(f"{where} is not a Hugging Face tokenizers tokenizer.json ({exc})") from exc


def eos_id_of(tok, eos_token: str | None, where: str) -> tuple[int, str]:
    """(id, token) of the document separator; the named one, or the first common EOS the vocab has."""
    names = (eos_token,) if eos_token else EOS_CANDIDATES
    for name in names:
        tid = tok.token_to_id(name)
        if tid is not None:
            return int(tid), name
    if eos_token:
        raise ValueError(f"eos_token {eos_token!r} is not in the vocabulary of {where}; name a token it has")
    raise ValueError(
        f"{where} has none of the usual EOS tokens {EOS_CANDIDATES}; pass eos_token= (CLI --eos-token) "
        "naming the token that separates documents"
    )


# --- worker side (runs in spawned processes, or in-process when workers <= 1) ---------------------

_WORKER: dict = {}


def init_worker(tokenizer_json: str, eos_id: int) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER["tok"] = load_tokenizer(tokenizer_json, "the tokenizer")
    _WORKER["eos"] = eos_id


def encode_task(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Encode documents; returns (uint32 ids with EOS after each document, per-document lengths)."""
    tok, eos = _WORKER["tok"], _WORKER["eos"]
    encodings = tok.encode_batch_fast(texts, add_special_tokens=False) if hasattr(
        tok, "encode_batch_fast"
    ) else tok.encode_batch(texts, add_special_tokens=False)
    parts, lengths = [], np.empty(len(texts), dtype=np.int64)
    eos_arr = np.array([eos], dtype=np.uint32)
    for i, enc in enumerate(encodings):
        ids = np.asarray(enc.ids, dtype=np.uint32)
        parts.append(ids)
        parts.append(eos_arr)
        lengths[i] = ids.size + 1
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)
    return tokens, lengths

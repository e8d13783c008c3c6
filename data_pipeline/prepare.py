"""prepare: documents -> tokens -> Arrow shards + manifest.json (and an optional held-out eval split).

Why it is built this way:
- Determinism. The parent process reads documents in a fixed order and is the only writer; worker
  processes only encode batches of texts, and `imap` returns their results in submission order. So
  the shards, the manifest and its content hash are byte-identical for any worker count, and the
  global sample order (keyed by the content hash) is reproducible from the inputs alone.
- Held-out data by content, not position. With `eval_fraction` > 0, a document goes to `<out>/eval/`
  when a keyed BLAKE2b hash of its text falls below the fraction. The choice survives reordering or
  appending inputs, and the trainer evaluates on text it never trains on. A trained tokenizer sees
  only the training documents.
- Crash safety. The old manifest is deleted before anything is written and the new one is written
  last, so a crashed prepare leaves no manifest that points at half-written shards.

Traded off: texts are copied to workers through pipes, and documents are routed to shards one by one
in the parent; that keeps the ordering argument trivial, and tokenization dominates anyway.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from .manifest import EVAL_DIR, MANIFEST_NAME, Manifest, write_manifest
from .shards import ShardWriter, token_dtype
from .sources import InputFile, iter_documents, list_inputs
from .storage import Location, resolve
from .tokenizer import encode_task, eos_id_of, init_worker, load_tokenizer, sha256_text, train_bpe

__all__ = ["prepare", "DEFAULT_SHARD_TOKENS", "is_eval_document"]

DEFAULT_SHARD_TOKENS = 1 << 26  # 64M tokens: 128 MiB uint16 shards
TOKENIZER_NAME = "tokenizer.json"
_TASK_CHARS = 1 << 20


def is_eval_document(text: str, eval_fraction: float) -> bool:
    """Whether `text` belongs to the held-out split: a keyed hash of its content, below the fraction."""
    if eval_fraction <= 0.0:
        return False
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, person=b"ds_fp4-eval")
    return int.from_bytes(digest.digest(), "little") < eval_fraction * 2.0**64


def _tasks(files: list[InputFile], text_column: str, eval_fraction: float, bar) -> Iterator[tuple]:
    """Batches of (texts, held-out flags) of about _TASK_CHARS characters, in document order."""
    texts, flags, chars = [], [], 0
    for text in iter_documents(files, text_column):
        texts.append(text)
        flags.append(is_eval_document(text, eval_fraction))
        chars += len(text)
        if chars >= _TASK_CHARS:
            bar.update(chars)
            yield texts, flags
            texts, flags, chars = [], [], 0
    if texts:
        bar.update(chars)
        yield texts, flags


def _encode(args: tuple) -> tuple:
    texts, flags = args
    tokens, lengths = encode_task(texts)
    return tokens, lengths, flags


def _encode_all(tasks: Iterator[tuple], workers: int, tok_json: str, eos_id: int) -> Iterator[tuple]:
    """Encoded tasks in submission order; at most 2 x workers tasks in flight (bounded memory)."""
    if workers <= 1:
        init_worker(tok_json, eos_id)
        yield from map(_encode, tasks)
        return
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=init_worker, initargs=(tok_json, eos_id)) as ex:
        window: deque = deque()
        try:
            for task in tasks:
                window.append(ex.submit(_encode, task))
                if len(window) >= 2 * workers:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
        finally:
            for f in window:
                f.cancel()


def _check_args(vocab_size, tokenizer, eval_fraction, shard_tokens, workers) -> None:
    if (tokenizer is None) == (vocab_size is None):
        raise ValueError(
            f"pass exactly one of tokenizer= (a tokenizer.json) or vocab_size= (train a byte-level BPE); "
            f"got tokenizer={tokenizer!r}, vocab_size={vocab_size!r}"
        )
    if not 0.0 <= float(eval_fraction) < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise ValueError(f"shard_tokens must be a positive int, got {shard_tokens!r}")
    if workers is not None and (not isinstance(workers, int) or workers < 0):
        raise ValueError(f"workers must be an int >= 0 (0 or 1 = in this process), got {workers!r}")


def prepare(
    inputs: list[str] | str,
    out: str | os.PathLike,
    *,
    tokenizer: str | None = None,
    vocab_size: int | None = None,
    text_column: str = "text",
    pattern: str | None = None,
    eos_token: str | None = None,
    eval_fraction: float = 0.0,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    workers: int | None = None,
    progress: bool = True,
) -> str:
    """Tokenize `inputs` into shards under `out`; returns the path/URI of `out`/manifest.json.

    inputs: files, directories or pyarrow URIs (text, .jsonl, .parquet; compressed ok).
    tokenizer: a tokenizer.json path/URI; or vocab_size: train a byte-level BPE of that size.
    eval_fraction: share of documents (chosen by content hash) written to `out`/eval/ instead.
    workers: tokenization processes (None = one per core; 0/1 = in this process).
    """
    _check_args(vocab_size, tokenizer, eval_fraction, shard_tokens, workers)
    from tqdm import tqdm

    t0 = time.perf_counter()
    loc = resolve(out)
    files = list_inputs(inputs, pattern)
    eval_loc = loc.child(EVAL_DIR)
    for where in (loc, eval_loc):
        where.delete(MANIFEST_NAME)

    if tokenizer is not None:
        tok_loc = resolve(tokenizer)
        tok_json = tok_loc.fs.open_input_stream(tok_loc.root).read().decode()
        tok = load_tokenizer(tok_json, str(tokenizer))
    else:
        train_docs = (t for t in iter_documents(files, text_column) if not is_eval_document(t, eval_fraction))
        tok = train_bpe(train_docs, vocab_size)
        tok_json = tok.to_str()
    eos_id, eos_name = eos_id_of(tok, eos_token, str(tokenizer or "the trained tokenizer"))
    vocab = int(tok.get_vocab_size(with_added_tokens=True))
    token_dtype(vocab)

    writers = {False: ShardWriter(loc, vocab, shard_tokens), True: ShardWriter(eval_loc, vocab, shard_tokens)}
    counts = {False: 0, True: 0}
    total = sum(f.size for f in files)
    if workers is None:
        workers = os.cpu_count() or 1
    with tqdm(total=total, unit="B", unit_scale=True, desc="tokenize", disable=not progress) as bar:
        tasks = _tasks(files, text_column, eval_fraction, bar)
        for tokens, lengths, flags in _encode_all(tasks, workers, tok_json, eos_id):
            ends = np.cumsum(lengths)
            for flag, end, length in zip(flags, ends.tolist(), lengths.tolist(), strict=True):
                writers[flag].add(tokens[end - length : end])
                counts[flag] += 1

    if counts[False] == 0:
        raise ValueError(
            f"no training documents in {[f.name for f in files][:5]}: the inputs are empty"
            + (f" or eval_fraction={eval_fraction} took them all" if counts[True] else "")
        )
    if eval_fraction > 0 and counts[True] == 0:
        raise ValueError(
            f"eval_fraction={eval_fraction} selected none of the {counts[False]} documents; raise it "
            f"(to about {min(0.5, 4 / counts[False]):.3g} or more) or set it to 0"
        )
    manifest_path = _finish(loc, writers[False], tok_json, vocab, eos_id, eos_name, "train", eval_fraction)
    if counts[True]:
        _finish(eval_loc, writers[True], tok_json, vocab, eos_id, eos_name, "eval", eval_fraction)
    if progress:
        n = sum(e.tokens for w in writers.values() for e in w.entries)
        dt = time.perf_counter() - t0
        print(
            f"prepared {n:,} tokens from {counts[False]:,} train + {counts[True]:,} eval documents into "
            f"{len(writers[False].entries)} shards at {loc.uri} in {dt:.1f}s ({n / dt:,.0f} tokens/s)"
        )
    return manifest_path


def _finish(loc: Location, writer: ShardWriter, tok_json, vocab, eos_id, eos_name, split, eval_fraction) -> str:
    entries = writer.close()
    loc.write_bytes(TOKENIZER_NAME, tok_json.encode())
    manifest = Manifest(
        dtype=token_dtype(vocab).name,
        vocab_size=vocab,
        eos_id=eos_id,
        eos_token=eos_name,
        tokenizer_path=TOKENIZER_NAME,
        tokenizer_sha256=sha256_text(tok_json),
        num_tokens=sum(e.tokens for e in entries),
        num_documents=sum(e.documents for e in entries),
        shards=tuple(entries),
        split=split,
        eval_fraction=float(eval_fraction),
    )
    write_manifest(loc, manifest)
    keep = {e.path for e in entries}
    for stale in loc.list_files("shards"):
        if stale not in keep and stale.endswith(".arrow"):
            loc.delete(stale)
    return loc.uri_of(MANIFEST_NAME)

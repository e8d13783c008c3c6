"""`ds-fp4-data`: prepare, inspect and verify token datasets from the shell.

Subcommands: `prepare`, `embedded` (the stdlib corpus), `info` (a manifest summary) and `verify` (full
SHA-256 check); `python -m data_pipeline` runs the same (__main__.py). Argument parsing lives here
only; the work is done by the same functions the Python API exposes, so the two can never drift
apart. The imports go one way, from this module to the ones that do the work, never back.
"""

from __future__ import annotations

import argparse
import sys

from .embedded import prepare_embedded_corpus
from .manifest import load_manifest
from .prepare import DEFAULT_SHARD_TOKENS, prepare
from .storage import resolve
from .verify import verify_dataset

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ds-fp4-data", description="Token datasets for ds_fp4 pretraining.")
    sub = p.add_subparsers(dest="command", required=True)

    pr = sub.add_parser("prepare", help="tokenize text/JSONL/Parquet inputs into Arrow shards + manifest.json")
    pr.add_argument("inputs", nargs="+", help="files, directories or URIs (s3://bucket/prefix?endpoint_override=...)")
    pr.add_argument("--out", required=True, help="output directory or URI")
    tok = pr.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", help="a Hugging Face tokenizers tokenizer.json (path or URI)")
    tok.add_argument("--vocab-size", type=int, help="train a byte-level BPE of this size on the inputs")
    pr.add_argument("--text-column", default="text", help="JSONL field / Parquet column holding the text")
    pr.add_argument("--pattern", help="only directory members whose name matches this glob (e.g. '*.py')")
    pr.add_argument("--eos-token", help="document separator token (default: the first common EOS found)")
    pr.add_argument("--eval-fraction", type=float, default=0.0, help="share of documents held out in OUT/eval")
    pr.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard")
    pr.add_argument("--workers", type=int, help="tokenization processes (default: one per core)")
    pr.add_argument("--quiet", action="store_true", help="no progress bar or summary")

    em = sub.add_parser("embedded", help="prepare the embedded default corpus (this Python's stdlib sources)")
    em.add_argument("out", help="output directory")
    em.add_argument("--vocab-size", type=int, default=8192)
    em.add_argument("--eval-fraction", type=float, default=0.02)
    em.add_argument("--workers", type=int)

    info = sub.add_parser("info", help="print a dataset's manifest summary")
    info.add_argument("path", help="dataset directory or URI")

    ve = sub.add_parser("verify", help="check every shard's size and SHA-256 against the manifest")
    ve.add_argument("path", help="dataset directory or URI")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "prepare":
            path = prepare(
                args.inputs,
                args.out,
                tokenizer=args.tokenizer,
                vocab_size=args.vocab_size,
                text_column=args.text_column,
                pattern=args.pattern,
                eos_token=args.eos_token,
                eval_fraction=args.eval_fraction,
                shard_tokens=args.shard_tokens,
                workers=args.workers,
                progress=not args.quiet,
            )
            print(path)
        elif args.command == "embedded":
            path = prepare_embedded_corpus(
                args.out, args.vocab_size, eval_fraction=args.eval_fraction, workers=args.workers
            )
            print(path)
        elif args.command == "info":
            m = load_manifest(resolve(args.path))
            print(
                f"{args.path}: {m.num_tokens:,} tokens, {m.num_documents:,} documents, {len(m.shards)} shards, "
                f"dtype {m.dtype}, vocab {m.vocab_size}, eos {m.eos_token!r}={m.eos_id}, split {m.split}, "
                f"content hash {m.content_hash}"
            )
        else:
            problems = verify_dataset(args.path)
            for line in problems:
                print(line, file=sys.stderr)
            print(f"{args.path}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
            return 1 if problems else 0
    except (ValueError, FileNotFoundError) as exc:
        print(f"ds-fp4-data {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0

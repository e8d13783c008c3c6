"""prepare: formats, determinism across worker counts, held-out split, CLI entry points."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline import TokenDataset, prepare
from data_pipeline.manifest import load_manifest
from data_pipeline.prepare import is_eval_document
from data_pipeline.shards import ShardReader, ShardWriter, token_dtype
from data_pipeline.storage import resolve


def tree_hashes(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def test_rerun_is_byte_identical_for_any_worker_count(tmp_path, corpus_dir, dataset_dir):
    out = str(tmp_path / "again")
    prepare([corpus_dir], out, vocab_size=512, shard_tokens=3000, eval_fraction=0.1, workers=2, progress=False)
    again = tree_hashes(out)
    assert again == tree_hashes(dataset_dir)
    assert "eval/manifest.json" in again and "tokenizer.json" in again


def test_manifest_records_what_the_loader_needs(dataset_dir, all_tokens):
    m = load_manifest(resolve(dataset_dir))
    assert m.dtype == "uint16" and m.eos_token == "<|endoftext|>" and m.split == "train"
    assert len(m.shards) >= 6 and all(s.sha256 and s.chunks_sha256 for s in m.shards)
    stream = all_tokens(dataset_dir)
    assert stream.size == m.num_tokens and stream.max() < m.vocab_size
    assert int((stream == m.eos_id).sum()) == m.num_documents  # one separator per document
    tok = json.load(open(os.path.join(dataset_dir, "tokenizer.json")))
    tok_bytes = open(os.path.join(dataset_dir, "tokenizer.json"), "rb").read()
    assert hashlib.sha256(tok_bytes).hexdigest() == m.tokenizer_sha256
    assert tok["model"]["type"] == "BPE"


def test_documents_are_recoverable_and_split_by_content(dataset_dir, corpus_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(dataset_dir, "tokenizer.json"))
    texts = {open(os.path.join(corpus_dir, f)).read() for f in sorted(os.listdir(corpus_dir))}
    seen = {}
    for split in ("", "eval"):
        loc = resolve(os.path.join(dataset_dir, split))
        for entry in load_manifest(loc).shards:
            r = ShardReader(loc.path(entry.path), entry, 512, entry.path)
            off = r.document_offsets()
            for a, b in zip(off[:-1], off[1:], strict=True):
                seen[tok.decode(r.tokens[a : b - 1].tolist())] = split
    assert set(seen) == texts  # every document, once, decoded back to its text
    for text, split in seen.items():
        assert (split == "eval") == is_eval_document(text, 0.1)
    assert 0 < sum(s == "eval" for s in seen.values()) < len(texts) / 3


def test_jsonl_and_parquet_inputs_with_a_named_column(tmp_path, dataset_dir):
    docs = [f"record {i}: " + "lorem ipsum " * (i % 7 + 1) for i in range(30)]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(docs[:15])) + "\n")
    pq.write_table(pa.table({"body": docs[15:]}), tmp_path / "b.parquet")
    tok = os.path.join(dataset_dir, "tokenizer.json")
    out = str(tmp_path / "out")
    inputs = [str(jsonl), str(tmp_path / "b.parquet")]
    prepare(inputs, out, tokenizer=tok, text_column="body", workers=0, progress=False)
    m = load_manifest(resolve(out))
    assert m.num_documents == 30
    with pytest.raises(ValueError, match=r"a\.jsonl:1 has no string field 'text'"):
        prepare([str(jsonl)], str(tmp_path / "x"), tokenizer=tok, workers=0, progress=False)
    with pytest.raises(ValueError, match=r"b\.parquet has no column 'text' \(columns: \['body'\]\)"):
        prepare([str(tmp_path / "b.parquet")], str(tmp_path / "x"), tokenizer=tok, workers=0, progress=False)


def test_large_vocab_uses_uint32(tmp_path):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    loc = resolve(str(tmp_path))
    w = ShardWriter(loc, vocab_size=100_000, shard_tokens=10)
    w.add(np.array([99_999, 70_000, 0], dtype=np.uint32))
    (entry,) = w.close()
    r = ShardReader(loc.path(entry.path), entry, 100_000, entry.path)
    r.check(0, 3)
    assert r.tokens.dtype == np.uint32 and r.tokens.tolist() == [99_999, 70_000, 0]


def test_argument_errors(tmp_path, corpus_dir, dataset_dir):
    with pytest.raises(ValueError, match="exactly one of tokenizer= .* or vocab_size="):
        prepare([corpus_dir], str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        prepare([corpus_dir], str(tmp_path), vocab_size=100, workers=0, progress=False)
    with pytest.raises(ValueError, match="eval_fraction must be in"):
        prepare([corpus_dir], str(tmp_path), vocab_size=300, eval_fraction=1.5, progress=False)
    with pytest.raises(ValueError, match="eos_token '<nope>' is not in the vocabulary"):
        prepare([corpus_dir], str(tmp_path), tokenizer=os.path.join(dataset_dir, "tokenizer.json"),
                eos_token="<nope>", workers=0, progress=False)


def test_cli_and_module_entry_points(tmp_path, corpus_dir, dataset_dir):
    out = str(tmp_path / "cli")
    run = subprocess.run(
        [sys.executable, "-m", "data_pipeline", "prepare", corpus_dir, "--out", out, "--vocab-size", "512",
         "--shard-tokens", "3000", "--eval-fraction", "0.1", "--workers", "0"],
        capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr
    assert "tokens/s" in run.stdout
    assert tree_hashes(out) == tree_hashes(dataset_dir)
    exe = os.path.join(os.path.dirname(sys.executable), "ds-fp4-data")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "data_pipeline"]
    info = subprocess.run(cmd + ["info", out], capture_output=True, text=True)
    assert info.returncode == 0 and "content hash" in info.stdout
    assert subprocess.run(cmd + ["verify", out], capture_output=True, text=True).returncode == 0
    bad = subprocess.run(cmd + ["prepare", str(tmp_path / "missing"), "--out", out, "--vocab-size", "300"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "does not exist" in bad.stderr
    TokenDataset.open(out, seq_len=8).close()

"""Remote storage against a real S3 server (moto's server mode on loopback): prepare, read, verify."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch

from data_pipeline import BatchLoader, IntegrityError, TokenDataset, prepare
from data_pipeline.manifest import load_manifest
from data_pipeline.storage import resolve


@pytest.fixture(scope="module")
def s3():
    """(endpoint query string, pyarrow S3FileSystem) of a moto server on 127.0.0.1, bucket 'bkt'."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:  # pragma: no cover - moto is a dev dependency: its absence is a failure
        pytest.fail(f"moto[server] is not installed ({exc}); pip install -e '.[dev]'")
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_EC2_METADATA_DISABLED")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_EC2_METADATA_DISABLED="true")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    try:
        server.start()
    except Exception as exc:  # pragma: no cover
        pytest.fail(f"moto server could not start on loopback: {exc}")
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1", allow_bucket_creation=True)
    fs.create_dir("bkt")
    try:
        yield f"endpoint_override={endpoint}&scheme=http&region=us-east-1", fs
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def remote(s3, corpus_dir):
    """The test corpus uploaded to s3://bkt/corpus and prepared (from S3, to S3) into s3://bkt/ds."""
    query, fs = s3
    for name in sorted(os.listdir(corpus_dir)):
        with fs.open_output_stream(f"bkt/corpus/{name}") as f:
            f.write(open(os.path.join(corpus_dir, name), "rb").read())
    out = f"s3://bkt/ds?{query}"
    manifest_uri = prepare([f"s3://bkt/corpus?{query}"], out, vocab_size=512, shard_tokens=3000,
                           eval_fraction=0.1, workers=0, progress=False)
    return out, manifest_uri


def test_s3_round_trip_matches_local(remote, tmp_path, dataset_dir):
    out, manifest_uri = remote
    assert manifest_uri.startswith("s3://bkt/ds/manifest.json?")
    remote, local = load_manifest(resolve(out)), load_manifest(resolve(dataset_dir))
    assert remote.content_hash == local.content_hash  # same bytes wherever they were written

    cache = str(tmp_path / "cache")
    ds_remote = TokenDataset.open(manifest_uri, seq_len=16, seed=4, cache_dir=cache)
    ds_local = TokenDataset.open(dataset_dir, seq_len=16, seed=4)
    a, b = BatchLoader(ds_remote, 8, 4), BatchLoader(ds_local, 8, 4)
    for _ in range(ds_local.num_samples // 4 + 2):  # a full epoch: every shard is fetched
        assert torch.equal(next(a), next(b))
    a.close(), b.close()
    ds_remote.close()
    cached = [os.path.join(dp, f) for dp, _, fs_ in os.walk(cache) for f in fs_]
    assert len(cached) == len(remote.shards) and not any(".part-" in p for p in cached)

    ev = TokenDataset.open(out, seq_len=8, split="eval", cache_dir=cache)
    assert ev.read(np.arange(4)).shape == (4, 9)
    ev.close()


def test_a_run_over_s3_data_keeps_its_tokenizer_and_evaluates_on_the_s3_split(s3, remote, tmp_path):
    """What the trainer does at start with an s3:// source: write_run_files copies the tokenizer from S3 (it
    once opened the URI as a local path), checked against the manifest; the default evaluation finds the
    source's eval/ split on S3."""
    from transformers import LlamaConfig

    from data_pipeline import DataConfig, build_eval_loader
    from launch.export import write_run_files

    query, fs = s3
    out, _ = remote
    cfg = DataConfig(sources=[out], seq_len=8, cache_dir=str(tmp_path / "cache"))
    ds = TokenDataset(cfg)
    assert ds.tokenizer_path == f"s3://bkt/ds/tokenizer.json?{query}"
    write_run_files(tmp_path / "run", {"data": {"sources": [out]}}, LlamaConfig(vocab_size=ds.vocab_size), ds)
    with fs.open_input_stream("bkt/ds/tokenizer.json") as f:
        original = f.read()
    assert (tmp_path / "run" / "model" / "tokenizer.json").read_bytes() == original
    evals = build_eval_loader(cfg, 4, 2, num_batches=1)
    assert evals.left_out == () and evals.dataset.sources == [f"s3://bkt/ds/eval?{query}"]
    assert [b.shape for b in evals] == [(2, 9), (2, 9)]
    evals.dataset.close()

    with fs.open_output_stream("bkt/ds/tokenizer.json") as f:  # changed after prepare
        f.write(original.replace(b"<|endoftext|>", b"<|end_of_doc|>"))
    try:
        with pytest.raises(IntegrityError, match=r"tokenizer.json\?.* does not match the SHA-256 in .*re-run prepare"):
            write_run_files(tmp_path / "run", {}, LlamaConfig(vocab_size=ds.vocab_size), ds)
        assert (tmp_path / "run" / "model" / "tokenizer.json").read_bytes() == original  # left as it was
    finally:
        with fs.open_output_stream("bkt/ds/tokenizer.json") as f:
            f.write(original)
        ds.close()


def test_corrupted_remote_shard_is_refused_at_fetch(s3, remote, tmp_path):
    query, fs = s3
    entry = load_manifest(resolve(f"s3://bkt/ds?{query}")).shards[2]
    key = f"bkt/ds/{entry.path}"
    with fs.open_input_stream(key) as f:
        data = bytearray(f.read())
    data[len(data) // 2] ^= 0x40
    with fs.open_output_stream(key) as f:
        f.write(bytes(data))
    ds = TokenDataset.open(f"s3://bkt/ds?{query}", seq_len=16, cache_dir=str(tmp_path / "fresh"))
    with pytest.raises(IntegrityError, match=r"000002\.arrow has SHA-256 .* \(corrupted\)"):
        ds.read(np.arange(ds.num_samples))
    ds.close()
    assert not any(f.startswith("000002") for _, _, fs_ in os.walk(tmp_path / "fresh") for f in fs_)

"""Bad inputs fail loudly, naming what is wrong: shards, manifests, paths, sizes, configs."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from data_pipeline import (
    BatchLoader,
    DataConfig,
    IntegrityError,
    SourceSpec,
    TokenDataset,
    UnsafePathError,
    prepare,
    verify_dataset,
)
from data_pipeline.manifest import load_manifest, write_manifest
from data_pipeline.storage import resolve


@pytest.fixture()
def copy(tmp_path, dataset_dir):
    """A private copy of the prepared dataset that a test may damage."""
    dst = str(tmp_path / "ds")
    shutil.copytree(dataset_dir, dst)
    return dst


def read_everything(path, seq_len=16):
    ds = TokenDataset.open(path, seq_len=seq_len, seed=0)
    try:
        ds.read(np.arange(ds.num_samples))
    finally:
        ds.close()


def shard_file(path, i=1):
    return os.path.join(path, load_manifest(resolve(path)).shards[i].path)


def test_intact_copy_reads_and_verifies(copy):
    read_everything(copy)
    assert verify_dataset(copy) == []


def test_truncated_shard_is_named_at_open(copy):
    f = shard_file(copy)
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) - 100)
    with pytest.raises(IntegrityError, match=r"shard .*000001\.arrow is \d+ bytes but the manifest says"):
        read_everything(copy)
    assert any("000001.arrow" in p for p in verify_dataset(copy))


def token_offset(f):
    """Byte offset of the token buffer inside shard file f."""
    with pa.memory_map(f) as mm:
        head = ipc.open_file(mm).read_all().column("tokens").combine_chunks().values.to_numpy()[:64].tobytes()
    data = open(f, "rb").read()
    assert data.count(head) == 1
    return data.index(head)


def test_flipped_token_byte_is_named_on_first_touch(copy):
    f = shard_file(copy)
    data = bytearray(open(f, "rb").read())
    data[token_offset(f) + 101] ^= 0x01
    open(f, "wb").write(bytes(data))
    ds = TokenDataset.open(copy, seq_len=16, seed=0)  # opening is cheap and does not read tokens
    with pytest.raises(IntegrityError, match=r"000001\.arrow: checksum mismatch"):
        ds.read(np.arange(ds.num_samples))
    ds.close()
    assert any("SHA-256" in p and "000001.arrow" in p for p in verify_dataset(copy))


def test_corrupted_footer_is_named(copy):
    f = shard_file(copy)
    data = bytearray(open(f, "rb").read())
    data[-12:-6] = b"\xff" * 6
    open(f, "wb").write(bytes(data))
    with pytest.raises(IntegrityError, match=r"000001\.arrow"):
        read_everything(copy)


def test_error_in_the_prefetch_thread_reaches_the_consumer(copy):
    f = shard_file(copy, 0)
    data = bytearray(open(f, "rb").read())
    data[token_offset(f) + 300] ^= 0xFF
    open(f, "wb").write(bytes(data))
    ds = TokenDataset.open(copy, seq_len=16, seed=0)
    loader = BatchLoader(ds, 64, 64, prefetch=2)
    with pytest.raises(IntegrityError, match="000000.arrow"):
        for _ in range(ds.num_samples // 64 + 1):
            next(loader)
    loader.close()


def test_token_ids_beyond_the_vocab_are_refused(copy):
    loc = resolve(copy)
    m = load_manifest(loc)
    from dataclasses import replace

    write_manifest(loc, replace(m, vocab_size=300))  # a consistent manifest that lies about the vocab
    with pytest.raises(IntegrityError, match=r"token id \d+ >= vocab_size 300"):
        read_everything(copy)


def test_edited_manifest_is_refused(copy):
    p = os.path.join(copy, "manifest.json")
    data = json.load(open(p))
    data["num_documents"] += 1
    json.dump(data, open(p, "w"))
    with pytest.raises(IntegrityError, match="edited or corrupted"):
        TokenDataset.open(copy, seq_len=16)


@pytest.mark.parametrize("bad", ["../outside.arrow", "/etc/passwd", "shards/../../x.arrow", "s3://b/k"])
def test_shard_paths_escaping_the_root_are_refused(copy, bad):
    loc = resolve(copy)
    m = load_manifest(loc)
    from dataclasses import replace

    shards = (replace(m.shards[0], path=bad),) + m.shards[1:]
    write_manifest(loc, replace(m, shards=shards))
    with pytest.raises(UnsafePathError, match="escapes the dataset root"):
        TokenDataset.open(copy, seq_len=16)


def test_symlinked_shard_leaving_the_root_is_refused(copy, tmp_path):
    f = shard_file(copy)
    outside = str(tmp_path / "elsewhere.arrow")
    shutil.move(f, outside)
    os.symlink(outside, f)
    with pytest.raises(UnsafePathError, match="outside the dataset root"):
        TokenDataset.open(copy, seq_len=16)


def test_seq_len_larger_than_the_data_names_both(dataset_dir):
    n = load_manifest(resolve(dataset_dir)).num_tokens
    with pytest.raises(ValueError, match=rf"seq_len {n} is larger than the data: .* holds {n} tokens"):
        TokenDataset.open(dataset_dir, seq_len=n)
    TokenDataset.open(dataset_dir, seq_len=n - 1).close()  # exactly one sample fits


def test_empty_inputs_are_refused(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no input files found"):
        prepare([str(empty)], str(tmp_path / "o"), vocab_size=300, workers=0, progress=False)
    (empty / "blank.txt").write_text("")
    with pytest.raises(ValueError, match="no training documents"):
        prepare([str(empty)], str(tmp_path / "o"), vocab_size=300, workers=0, progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        prepare([str(tmp_path / "nope")], str(tmp_path / "o"), vocab_size=300, workers=0, progress=False)


def test_missing_manifest_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="ds-fp4-data prepare"):
        TokenDataset.open(str(tmp_path), seq_len=8)


@pytest.mark.parametrize(
    "kwargs, field, rule, value",
    [
        (dict(sources=[]), "sources", "Value error, give at least one prepared dataset", r"\[\]"),
        (dict(sources=[{"path": "x", "weight": 0}]), r"sources\.0\.weight", "Input should be greater than 0", "0"),
        (dict(sources=[{"path": "x", "weight": True}]), r"sources\.0\.weight", "Input should be a valid number",
         "True"),
        (dict(sources=[{"path": "x", "wieght": 1}]), r"sources\.0\.wieght", "Unexpected keyword argument", "1"),
        (dict(sources=[""]), r"sources\.0\.path", "String should have at least 1 character", "''"),
        (dict(sources=["x"], seq_len=0), "seq_len", "Input should be greater than or equal to 1", "0"),
        (dict(sources=["x"], seq_len=2.0), "seq_len", "Input should be a valid integer", "2.0"),
        (dict(sources=["x"], seed=-1), "seed", "Input should be greater than or equal to 0", "-1"),
        (dict(sources=["x"], seed=1 << 62), "seed", f"Input should be less than {1 << 62}", str(1 << 62)),
        (dict(sources=["x"], max_open_shards=0), "max_open_shards", "Input should be greater than or equal to 1", "0"),
        (dict(sources=["x"], eval_sources=[]), "eval_sources", "Value error, give at least one prepared", r"\[\]"),
    ],
)
def test_config_validation_names_field_and_allowed_values(kwargs, field, rule, value):
    """pydantic's error (a ValueError) names the class, the field, the rule and the offending value."""
    with pytest.raises(ValueError, match=rf"validation error for DataConfig\n{field}\n  {rule}.* input_value={value},"):
        DataConfig(**kwargs)


def test_config_accepts_bare_paths_and_is_frozen(tmp_path):
    cfg = DataConfig(sources=tmp_path, eval_sources=[{"path": str(tmp_path), "weight": 2}], cache_dir=tmp_path)
    assert cfg.sources == (SourceSpec(str(tmp_path), 1.0),) and cfg.eval_sources[0].weight == 2.0
    assert cfg.cache_dir == str(tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seq_len = 4


def test_open_shard_maps_stay_bounded(dataset_dir):
    n_shards = len(load_manifest(resolve(dataset_dir)).shards)
    assert n_shards >= 6
    ds = TokenDataset(DataConfig(sources=[dataset_dir], seq_len=16, max_open_shards=2))

    def mapped():
        with open("/proc/self/maps") as f:
            return {line.split()[-1] for line in f if dataset_dir in line and line.rstrip().endswith(".arrow")}

    ds.read(np.arange(ds.num_samples))  # touches every shard
    assert 1 <= len(mapped()) <= 2
    ds.close()
    assert len(mapped()) == 0

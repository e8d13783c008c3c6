"""Token data for ds_fp4: tokenize -> Arrow shards + manifest -> global order -> rank slice -> batches.

    from data_pipeline import DataConfig, TokenDataset, BatchLoader, prepare, prepare_embedded_corpus
    prepare(["corpus/"], "runs/data/mine", vocab_size=8192, eval_fraction=0.01)
    ds = TokenDataset(DataConfig(sources=[{"path": "runs/data/mine", "weight": 1.0}], seq_len=2048))
    loader = BatchLoader(ds, global_batch_size=64, micro_batch_size=4, rank=r, world_size=W)
    batch = next(loader)                         # int64 [4, 2049]
    state = loader.state_dict()                  # {"samples_consumed": n}: store it in the checkpoint

See docs/data_pipeline.md for the guarantees (order, resume, world-size invariance) and the formats.
This package never imports ds_fp4.
"""

from .config import DataConfig, SourceSpec
from .dataset import TokenDataset
from .embedded import prepare_embedded_corpus
from .evaluation import EvalLoader, build_eval_loader
from .geometry import BatchGeometry
from .loader import BatchLoader
from .prepare import prepare
from .storage import IntegrityError, UnsafePathError
from .verify import verify_dataset

__all__ = [
    "BatchGeometry",
    "BatchLoader",
    "DataConfig",
    "EvalLoader",
    "IntegrityError",
    "SourceSpec",
    "TokenDataset",
    "UnsafePathError",
    "build_eval_loader",
    "prepare",
    "prepare_embedded_corpus",
    "verify_dataset",
]

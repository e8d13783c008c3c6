"""Test-session setup shared by every test folder.

Triton kernels are tested on CPU through Triton's interpreter, which must be switched on before any
``@triton.jit`` function is created, i.e. before ds_fp4.kernels is imported. A machine with a GPU
runs the compiled kernels instead.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))  # shared helpers: `import tiny_runs`

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# One thread per process: the suite starts several processes at once (distributed ranks) on a 2-core
# machine, and OpenMP threads spinning against each other made some tests 6x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite tests/golden/*.json from this run (only when a numerics change is intended)")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """The embedded stdlib corpus cut to its first 120 files (a few seconds), for runs of the trainer."""
    from data_pipeline import prepare_embedded_corpus

    out = tmp_path_factory.mktemp("corpus") / "stdlib"
    prepare_embedded_corpus(out, vocab_size=1024, eval_fraction=0.05, max_files=120, progress=False)
    return out

"""Test-session setup shared by every test folder.

Triton kernels are tested on CPU through Triton's interpreter, which must be switched on before any
``@triton.jit`` function is created, i.e. before ds_fp4.kernels is imported. A machine with a GPU
runs the compiled kernels instead.
"""

import os

import torch

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

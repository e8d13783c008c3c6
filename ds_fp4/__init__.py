"""ds_fp4: NVFP4 (4-bit) pretraining for DeepSpeed models, on any hardware.

Public API (DESIGN §4): quantize / dequantize / NVFP4Tensor (the torch reference and its kernels),
NVFP4Recipe, NVFP4Linear, convert_to_nvfp4, and initialize (a drop-in for deepspeed.initialize).
"""

from .convert import ConversionReport, convert_to_nvfp4, set_nvfp4_active
from .engine import NVFP4Config, initialize
from .linear import NVFP4Linear
from .nvfp4 import NVFP4Tensor, dequantize, matmul, quantize
from .recipe import NVFP4Recipe, TensorPolicy

__all__ = [
    "ConversionReport",
    "NVFP4Config",
    "NVFP4Linear",
    "NVFP4Recipe",
    "NVFP4Tensor",
    "TensorPolicy",
    "convert_to_nvfp4",
    "dequantize",
    "initialize",
    "matmul",
    "quantize",
    "set_nvfp4_active",
]
__version__ = "0.1.0"

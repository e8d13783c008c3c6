"""ds_fp4: NVFP4 (4-bit) pretraining for DeepSpeed models, on any hardware.

Public API (docs/design.md §4): quantize / dequantize / NVFP4Tensor (the torch reference and its kernels),
NVFP4Recipe, NVFP4Linear, convert_to_nvfp4, initialize (a drop-in for deepspeed.initialize), and
patch_deepspeed / unpatch_deepspeed (deepspeed.initialize itself honours an "nvfp4" config section, for
HF Trainer, Accelerate, Lightning and other scripts: docs/integrations.md; ``python -m ds_fp4.run``).
"""

# Import torch._dynamo now, before any deepspeed.zero.Init can be entered in a process that uses ds_fp4.
# transformers >= 5 imports it from the first model module it loads; inside zero.Init, whose patched
# torch.Tensor.__new__ dynamo's polyfill check rejects, that import raises "TypeError: Signature mismatch
# ... tensor_pynew", and every ZeRO-3 model build (ours, a user's script, from_pretrained) crashes.
# Once imported, later imports are no-ops. It costs ~2 s once, which any transformers model pays anyway.
import torch._dynamo  # noqa: F401,I001

from .convert import ConversionReport, convert_to_nvfp4, set_nvfp4_active
from .deepspeed_patches import patch_deepspeed, unpatch_deepspeed
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
    "patch_deepspeed",
    "quantize",
    "set_nvfp4_active",
    "unpatch_deepspeed",
]
__version__ = "0.1.0"

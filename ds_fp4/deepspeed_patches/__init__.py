"""Every DeepSpeed function that ds_fp4 replaces, patched in this package and nowhere else (docs/design.md §5).

  comm_seams        the collectives through which each ZeRO stage moves gradients and ZeRO-3 weights,
                    replaced for engines that carry an NVFP4 CommState (NVFP4 communication)
  initialize_hook   ``deepspeed.initialize`` itself, for :func:`ds_fp4.patch_deepspeed`: a config with an
                    "nvfp4" section goes through ds_fp4.initialize (HF Trainer, Accelerate, Lightning)
"""

from .comm_seams import (
    SEAMS,
    SUPPORTED_DEEPSPEED,
    SeamError,
    activate_grad_comm,
    activate_weight_comm,
    check_seams,
    disable_cpu_shm_comm,
    install,
    installed,
    uninstall,
)
from .initialize_hook import is_patched, original_initialize, patch_deepspeed, unpatch_deepspeed

__all__ = [
    "SEAMS",
    "SUPPORTED_DEEPSPEED",
    "SeamError",
    "activate_grad_comm",
    "activate_weight_comm",
    "check_seams",
    "disable_cpu_shm_comm",
    "install",
    "installed",
    "is_patched",
    "original_initialize",
    "patch_deepspeed",
    "uninstall",
    "unpatch_deepspeed",
]

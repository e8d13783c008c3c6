"""ds_fp4.patch_deepspeed: NVFP4 for every script that calls ``deepspeed.initialize`` itself.

HF Trainer (through Accelerate), ``accelerate launch``, Lightning's DeepSpeedStrategy and GPT-NeoX-style
scripts all end in ``deepspeed.initialize``, and each looks the function up on the ``deepspeed`` module
when it calls it (checked: transformers 5.24, accelerate 1.16, lightning 2.6). So one replacement of that
attribute reaches all of them:

  * the config has a top-level "nvfp4" section: the call becomes :func:`ds_fp4.initialize` with the same
    arguments (positional ones included), which converts the model before DeepSpeed wraps it and
    routes the communication; the section goes to ds_fp4 and the rest to DeepSpeed;
  * anything else (no section, or a config that cannot be read here) goes to DeepSpeed's own function
    with the very same arguments, untouched.

The config is found where DeepSpeed finds it: ``config``, ``config_params`` or ``args.deepspeed_config``,
each a dict (HF's HfDeepSpeedConfig hands over its filled-in dict), a JSON path or base64 JSON.
:func:`patch_deepspeed` is idempotent and :func:`unpatch_deepspeed` restores DeepSpeed's function.
``python -m ds_fp4.run SCRIPT`` patches, then runs an unmodified script (ds_fp4/run.py).
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
from typing import Any

log = logging.getLogger("ds_fp4")

_lock = threading.Lock()
_original = None  # DeepSpeed's own initialize while the patch is on


def patch_deepspeed() -> bool:
    """Make ``deepspeed.initialize`` honour an "nvfp4" config section. Returns True if this call patched
    (False: already patched)."""
    global _original
    import deepspeed

    with _lock:
        if _original is not None:
            return False
        original = deepspeed.initialize

        @functools.wraps(original)
        def hook(*args, **kwargs):
            return _initialize(original, *args, **kwargs)

        _original = original
        deepspeed.initialize = hook
    log.info("ds_fp4: deepspeed.initialize now converts models whose config has an \"nvfp4\" section")
    return True


def unpatch_deepspeed() -> bool:
    """Restore DeepSpeed's own ``deepspeed.initialize``. Returns True if a patch was removed."""
    global _original
    import deepspeed

    with _lock:
        if _original is None:
            return False
        if getattr(deepspeed.initialize, "__wrapped__", None) is _original:  # still ours, not a later wrapper's
            deepspeed.initialize = _original
        _original = None
    return True


def is_patched() -> bool:
    return _original is not None


def original_initialize():
    """DeepSpeed's own ``initialize``, patched or not (ds_fp4.initialize calls this one)."""
    import deepspeed

    return _original if _original is not None else deepspeed.initialize


def nvfp4_section(arguments: dict[str, Any]) -> tuple[bool, Any]:
    """(found, section) of the config among a deepspeed.initialize call's bound arguments, looked up in
    DeepSpeed's order: config, config_params, args.deepspeed_config. A config that cannot be read here
    counts as none found, with a warning: DeepSpeed's own function then reports it as it always does."""
    from collections.abc import Mapping

    from ..engine import load_config

    config = arguments.get("config")
    if config is None:
        config = arguments.get("config_params")
    if config is None:
        config = getattr(arguments.get("args"), "deepspeed_config", None)
    if config is None:
        return False, None
    if isinstance(config, Mapping):
        return "nvfp4" in config, config.get("nvfp4")
    try:
        ds_config = load_config(config)
    except (OSError, TypeError, ValueError) as e:
        log.warning("ds_fp4: cannot read the DeepSpeed config %r (%s): handing the call to DeepSpeed "
                    "unchanged, without NVFP4", config, e)
        return False, None
    return "nvfp4" in ds_config, ds_config.get("nvfp4")


def _initialize(original, *args, **kwargs):
    try:
        bound = inspect.signature(original).bind(*args, **kwargs)
    except TypeError:
        return original(*args, **kwargs)  # DeepSpeed says what is wrong with the call
    found, _ = nvfp4_section(bound.arguments)
    if not found:
        return original(*args, **kwargs)
    from .. import integrations
    from ..engine import initialize

    arguments = dict(bound.arguments)
    model = arguments.pop("model", None)
    result = initialize(model=model, **arguments)
    integrations.started(result[0])
    return result

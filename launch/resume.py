"""Resume checks: is the run config of a restart the one the checkpoint was trained with?

Each checkpoint's meta.json holds the run config it was written under (``run_config``: the JSON after
``--set`` overrides, as ``RunConfig.raw``). A restart compares its own config with it before anything
is built. A resume is meant to continue the same run exactly (docs/design.md §6, §7.9); a change of the
data (sources, seq_len, seed), the schedule (max_steps / max_tokens, warmup, decay, the optimizer and
its lr), the NVFP4 recipe, the global batch or the model would silently make it another run: the lr
jumps, the data order changes, the curve is no longer one curve. Such a change is refused, naming every
changed key with its old and new value, unless ``trainer.allow_config_change`` lists it (a key or a
whole section). Changes that only affect how the run is observed or stored (HARMLESS) go through and
are printed once.

Traded off: the comparison is of the JSON as written, key by key, not of the parsed values, so writing
a default out (``"seed": 1234`` where it was left unset) or a path another way counts as a change; the
message shows both values, and the allow list accepts it. Anything not known to be harmless is
treated as a change of the run: a wrongly refused resume costs one ``--set``, a wrongly accepted one a
silently different run. The world size is not in the config: resuming on another one is a resize
(launch/checkpoint.py), not a change.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from .config import ConfigError

ALLOW_KEY = "trainer.allow_config_change"
# Keys (or whole sections) whose change leaves the trained model and its data untouched. The micro-batch
# is here because the global batch is kept: like a new world size, it changes only how a step is cut.
HARMLESS = (
    "trainer.log_interval", "trainer.eval_interval", "trainer.eval_batches", "trainer.save_interval",
    "trainer.keep_checkpoints", "trainer.progress", "trainer.out_dir", "trainer.max_consecutive_skips",
    "trainer.peak_tflops", ALLOW_KEY, "nvfp4.stats_interval", "nvfp4.selftest", "data.eval_sources", "data.cache_dir",
    "data.max_open_shards", "train_micro_batch_size_per_gpu", "tensorboard", "wandb", "csv_monitor", "comet",
    "steps_per_print", "wall_clock_breakdown", "flops_profiler", "comms_logger",
)
UNSET = "(unset)"


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": value} for every leaf of nested dicts; a list is one leaf (a source list changes as a whole)."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _covered(key: str, entries: Iterable[str]) -> bool:
    """Whether ``key`` is one of ``entries`` or lies inside one of them (a section)."""
    return any(key == e or key.startswith(e + ".") for e in entries)


_MISSING = object()  # a key that one of the two configs does not have


def _show(value: Any) -> str:
    return UNSET if value is _MISSING else json.dumps(value)


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, str]]:
    """[(key, "old -> new")] for every leaf that differs, sorted by key."""
    a, b = flatten(old), flatten(new)
    return [(k, f"{_show(a.get(k, _MISSING))} -> {_show(b.get(k, _MISSING))}")
            for k in sorted(a.keys() | b.keys()) if a.get(k, _MISSING) != b.get(k, _MISSING)]


def check_resume_config(old: Mapping[str, Any] | None, new: Mapping[str, Any], allowed: Iterable[str],
                        where: str) -> list[str]:
    """The lines to print about the config changes since the checkpoint at ``where``; raises ConfigError
    (every rank finds it alike; launch/train.py prints it once) naming each change that breaks an exact
    resume and is not in ``allowed``."""
    if old is None:
        return [f"resume: {where} holds no run config (written before configs were stored): not compared"]
    allowed = tuple(allowed)
    changes = config_changes(old, new)
    refused = [(k, c) for k, c in changes if not _covered(k, HARMLESS) and not _covered(k, allowed)]
    if refused:
        keys = json.dumps(sorted({k for k, _ in refused} | set(allowed)))
        raise ConfigError(
            f"the config changed since the checkpoint {where}, in ways that make the resumed run differ from "
            "the one it continues:\n" + "".join(f"  {k}: {c}\n" for k, c in refused)
            + "Restore those values to resume exactly, start a new run in another trainer.out_dir, or accept "
            f"the change with\n  --set '{ALLOW_KEY}={keys}'"
        )
    lines = []
    harmless = [(k, c) for k, c in changes if _covered(k, HARMLESS) and k != ALLOW_KEY]  # the list: said below
    accepted = [(k, c) for k, c in changes if not _covered(k, HARMLESS)]
    if harmless:
        lines.append("resume: config changes since the checkpoint that leave the run as it was: "
                     + "; ".join(f"{k}: {c}" for k, c in harmless))
    if accepted:
        lines.append(f"resume: config changes accepted by {ALLOW_KEY} (the run continues differently): "
                     + "; ".join(f"{k}: {c}" for k, c in accepted))
    return lines

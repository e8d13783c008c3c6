"""DeepSpeed's keys in the run config, checked at config time: a key DeepSpeed would ignore is an error.

DeepSpeed 0.19 ignores top-level keys it does not know, so ``"gradient_cliping": 1.0`` trains without
clipping and says nothing. DeepSpeed has no list of its keys to check against: ``DeepSpeedConfig`` reads
them one by one, through hand-written ``get_*`` functions and through pydantic models. A list written here
would drift with every DeepSpeed release, so the keys are found at run time by asking DeepSpeed itself:
:func:`deepspeed_reads` builds ``DeepSpeedConfig`` once on a copy of the run's DeepSpeed keys whose
dicts record every lookup (``get``, ``[]``, ``in``, membership in ``keys()``); iterating a dict
(``items()``, ``**`` unpacking into a pydantic model) marks it as read whole.

What that finds, and what it may miss:

- Top level: every key ``DeepSpeedConfig`` looks up, present or not (its getters run unconditionally),
  minus the removed features it only looks up to refuse (DeepSpeed raises its own message for those),
  plus :data:`READ_OUTSIDE_THE_PROBE`: keys read only by ``deepspeed.initialize`` or only once a process
  group exists, which the probe (run before the group) cannot see. A key read only elsewhere in DeepSpeed
  (the engine, an optimizer) and never by ``DeepSpeedConfig`` would be refused wrongly; none is known in
  0.19.8, and tests/launch/test_config.py checks every key of configs/ and a sample of documented ones.
- Sections DeepSpeed parses with its pydantic models (``zero_optimization``, ``bf16``, ``fp16``,
  ``tensorboard``, ...): those models forbid unknown keys themselves; the probe only makes their
  refusal happen at config time, rephrased with the nearest valid key.
- Sections read key by key (``optimizer``, ``scheduler``, ``checkpoint``, ``activation_checkpointing``,
  ``flops_profiler``, ``aio``, ``data_types``, ...): a key the probe did not look up is refused, since
  DeepSpeed never reads it (``optimizer.params`` without ``optimizer.type`` included). Deeper levels are
  not checked: ``optimizer.params`` belongs to the optimizer class, which DeepSpeed builds later and which
  refuses unknown arguments itself. A section read whole into a plain dict (``pipeline``) is not checked.

Traded off: building ``DeepSpeedConfig`` imports DeepSpeed (seconds) at config time, and DeepSpeed's own
validation of values (``fp16`` with ``bf16``, removed features) now stops the run there too, as a
ValueError worded by DeepSpeed.
"""

from __future__ import annotations

import copy
import difflib
import logging
from collections.abc import Iterable, KeysView, Mapping
from typing import Any

WHOLE = object()  # recorded for a dict that was iterated: every key in it was handed on
READ_OUTSIDE_THE_PROBE = {
    "data_parallel_size": "deepspeed.initialize (with sequence_parallel_size, for the device mesh)",
    "sequence_parallel_size": "DeepSpeedConfig, only once the process group exists",
}
Reads = dict[tuple, set]


class _Keys(KeysView):
    """``keys()`` of a recording dict: membership is a lookup of that key, iteration reads them all."""

    def __contains__(self, key: Any) -> bool:
        self._mapping.record(key)
        return dict.__contains__(self._mapping, key)

    def __iter__(self):
        self._mapping.record(WHOLE)
        return dict.__iter__(self._mapping)


class _Recording(dict):
    """A dict (and its nested dicts) that records in ``reads[path]`` which of its keys were looked up."""

    def __init__(self, values: Mapping, path: tuple, reads: Reads) -> None:
        super().__init__()
        self.path, self.reads = path, reads
        for key, value in values.items():
            dict.__setitem__(self, key, _Recording(value, path + (key,), reads) if isinstance(value, dict) else value)

    def record(self, key: Any) -> None:
        self.reads.setdefault(self.path, set()).add(key)

    def __getitem__(self, key):
        self.record(key)
        return dict.__getitem__(self, key)

    def get(self, key, default=None):
        self.record(key)
        return dict.get(self, key, default)

    def __contains__(self, key) -> bool:
        self.record(key)
        return dict.__contains__(self, key)

    def pop(self, key, *default):
        self.record(key)
        return dict.pop(self, key, *default)

    def setdefault(self, key, default=None):
        self.record(key)
        return dict.setdefault(self, key, default)

    def keys(self):
        return _Keys(self)

    def __iter__(self):  # overriding it also sends ``**`` unpacking through keys() and __getitem__
        self.record(WHOLE)
        return dict.__iter__(self)

    def items(self):
        self.record(WHOLE)
        return dict.items(self)

    def values(self):
        self.record(WHOLE)
        return dict.values(self)

    def __copy__(self):  # DeepSpeedConfig copies the top level: the copy records into the same log
        new = _Recording({}, self.path, self.reads)
        dict.update(new, dict.items(self))
        return new


def deepspeed_reads(ds: Mapping[str, Any]) -> Reads:
    """The keys ``DeepSpeedConfig`` looks up for these DeepSpeed keys, per dict path (``()`` = the top
    level; :data:`WHOLE` in a set: the dict was iterated). A config DeepSpeed itself refuses raises a
    ValueError with DeepSpeed's reason. DeepSpeedConfig also asserts the batch arithmetic, here for one
    rank (no process group yet): launch.config.check_batch checks it first, with the fix in its message."""
    import deepspeed
    from deepspeed.runtime.config import DeepSpeedConfig, DeepSpeedConfigError
    from deepspeed.utils import logger
    from pydantic import ValidationError

    reads: Reads = {}
    level = logger.level
    logger.setLevel(logging.ERROR)  # its warnings come again, once, when the engine reads the config
    try:
        DeepSpeedConfig(_Recording(copy.deepcopy(dict(ds)), (), reads))
    except ValidationError as e:
        raise ValueError("\n".join(_explain(e, ds))) from e
    except (DeepSpeedConfigError, AssertionError, ValueError) as e:
        raise ValueError(f"DeepSpeed {deepspeed.__version__} refuses the config: {e}") from e
    finally:
        logger.setLevel(level)
    return reads


def check_deepspeed_keys(ds: Mapping[str, Any], sections: Iterable[str]) -> None:
    """Raise a ValueError naming every key of ``ds`` (DeepSpeed's part of the run config) that DeepSpeed
    would ignore, with the nearest key it reads; ``sections`` are the run's own top-level keys (not in
    ``ds``, but a misspelling of one is found here)."""
    import deepspeed

    version, sections = deepspeed.__version__, list(sections)
    reads = deepspeed_reads(ds)
    top = top_level_keys(reads)
    problems = []
    for key in ds:
        if key not in top:
            problems.append(f"unknown top-level key {key!r}: DeepSpeed {version} does not read it, and it is "
                            f"not a section of the run ({', '.join(sections)})" + _hint(key, top | set(sections)))
    for key, section in ds.items():
        seen = reads.get((key,), set())
        if isinstance(section, Mapping) and seen and WHOLE not in seen:
            problems += [f"unknown key {sub!r} in the \"{key}\" section: DeepSpeed {version} does not read it "
                         f"with this config" + _hint(sub, seen) for sub in section if sub not in seen]
    if problems:
        raise ValueError("\n".join(problems))


def top_level_keys(reads: Reads) -> set[str]:
    """The top-level keys DeepSpeed reads, from a probe's ``reads``: every one it looked up, less the removed
    features it looks up only to refuse them, plus READ_OUTSIDE_THE_PROBE."""
    from deepspeed.runtime import config as ds_config

    removed = getattr(ds_config, "_REMOVED_TOP_LEVEL_CONFIG_KEYS", {})  # private: without it, no key is dropped
    return {k for k in reads.get((), ()) if isinstance(k, str) and k not in removed} | set(READ_OUTSIDE_THE_PROBE)


def _hint(key: Any, valid: Iterable[Any]) -> str:
    names = sorted(v for v in valid if isinstance(v, str))
    close = difflib.get_close_matches(str(key), names, n=1)
    return f"; did you mean {close[0]}?" if close else f"; valid keys: {names}"


def _explain(error, ds: Mapping[str, Any]) -> list[str]:
    """A pydantic error of one of DeepSpeed's config models, one line per problem, named by its path in
    the run config and, for an unknown key, with the nearest key the model takes."""
    import deepspeed

    lines = []
    for err in error.errors(include_url=False):
        loc = tuple(err["loc"])
        where = _find(ds, loc) or (error.title, *loc)
        dotted = ".".join(map(str, where))
        if err["type"] == "extra_forbidden":
            valid = _model_keys(error.title, loc[:-1])
            lines.append(f"unknown key {loc[-1]!r} in the \"{'.'.join(map(str, where[:-1]))}\" section: "
                         f"DeepSpeed {deepspeed.__version__} refuses it" + _hint(loc[-1], valid))
        else:
            requirement = err["msg"].removeprefix("Input should be ")
            verb = " must be " if requirement != err["msg"] else ": "
            lines.append(f"{dotted}{verb}{requirement} (DeepSpeed's rule); got {err.get('input')!r}")
    return lines


def _find(node: Any, loc: tuple, path: tuple = ()) -> tuple | None:
    """The path in the run config that ends with ``loc`` (a model's error location), if there is one."""
    if isinstance(node, Mapping):
        if _follow(node, loc):
            return path + loc
        for key, value in node.items():
            found = _find(value, loc, path + (key,))
            if found:
                return found
    return None


def _follow(node: Any, loc: tuple) -> bool:
    for part in loc:
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def _model_keys(title: str, parents: tuple) -> set[str]:
    """The field names and aliases of DeepSpeed's config model ``title``, or of the model nested in it
    at ``parents``; empty when it cannot be found."""
    import typing

    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    model = next((c for c in subclasses(DeepSpeedConfigModel) if c.__name__ == title), None)
    for part in parents:
        fields = model.model_fields if model is not None else {}
        field = next((f for name, f in fields.items() if part in (name, f.alias)), None)
        hints = [field.annotation] if field is not None else []
        while hints and not (isinstance(hints[0], type) and issubclass(hints[0], DeepSpeedConfigModel)):
            hints = hints[1:] + list(typing.get_args(hints[0]))
        model = hints[0] if hints else None
    if model is None:
        return set()
    return {name for name, f in model.model_fields.items()} | {f.alias for f in model.model_fields.values() if f.alias}

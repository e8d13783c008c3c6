"""The conventions every config dataclass of the project shares, and the one error formatter for them.

Config sections are pydantic dataclasses (docs/design.md §7): each field's type says what it accepts
(``strict`` numbers, so ``true`` is not 1 and ``"2"`` is not 2; unknown keys forbidden), and a bad value
raises pydantic's ``ValidationError`` (a ValueError) naming the class, the field and the value. That suits
Python callers. A JSON section is a different audience: :func:`section_errors` rephrases the errors as
``section.key must be ...; got value`` and lists the valid keys for an unknown one. ds_fp4 uses it for its
"nvfp4" section and launch/config.py for the trainer's sections (launch may import ds_fp4; data_pipeline
may not, and its DataConfig is formatted by launch when it parses the run JSON).
"""

from __future__ import annotations

import typing
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import fields
from typing import Annotated, Any

from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import is_pydantic_dataclass

STRICT_FIELDS = ConfigDict(extra="forbid")  # unknown keys are errors; numbers are strict per field
NonNegInt = Annotated[int, Field(strict=True, ge=0)]


@contextmanager
def section_errors(section: str, root: type, valid: Sequence[str] | None = None) -> Iterator[None]:
    """Rephrase a pydantic ValidationError raised inside as a ValueError about the JSON section ``section``,
    one line per error: ``section.key must be <pydantic's requirement>; got <value>``, a validator's own
    sentence after ``section.key:``, and ``unknown key(s) [...] in the "section.key" config section; valid
    keys: [...]``. ``root`` is the dataclass the section's keys belong to (nested sections are found
    through its field types); ``valid`` overrides its top-level keys for a section that merges several
    dataclasses, as "nvfp4" does."""
    try:
        yield
    except ValidationError as e:
        raise ValueError("\n".join(_explain(e.errors(include_url=False), section, root, valid))) from None


def _explain(errors: list[dict], section: str, root: type, valid: Sequence[str] | None) -> list[str]:
    lines, unknown = [], {}
    for err in errors:
        loc = err["loc"]
        if err["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
            unknown.setdefault(loc[:-1], []).append(loc[-1])
            continue
        where, msg = _dotted(section, loc), err["msg"]
        requirement = msg.removeprefix("Input should be ")
        if err["type"] == "value_error":  # a validator's sentence, which names the value itself
            lines.append(f"{where}: {msg.removeprefix('Value error, ')}")
        elif requirement != msg:
            lines.append(f"{where} must be {requirement}; got {err['input']!r}")
        else:
            lines.append(f"{where}: {msg}; got {err['input']!r}")
    for parent, keys in unknown.items():
        names = valid if valid is not None and not parent else _field_names(root, parent)
        lines.insert(0, f"unknown key(s) {sorted(keys)} in the \"{_dotted(section, parent)}\" config section; "
                        f"valid keys: {sorted(names)}")
    return lines


def _dotted(section: str, loc: tuple) -> str:
    return section + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)


def _field_names(cls: type, path: tuple) -> list[str]:
    """The keys of the dataclass reached from ``cls`` through the field names in ``path`` (list indices skipped)."""
    for name in (p for p in path if isinstance(p, str)):
        cls = next(t for t in _type_tree(cls.__pydantic_fields__[name].annotation) if is_pydantic_dataclass(t))
    return [f.name for f in fields(cls)]


def _type_tree(hint: Any) -> Iterator[Any]:
    yield hint
    for arg in typing.get_args(hint):
        yield from _type_tree(arg)

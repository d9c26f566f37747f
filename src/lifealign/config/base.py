"""The base of every config section, and the number rules every section shares.

- Unknown keys are errors; assignments are validated.
- Every float is finite: ``nan`` / ``.inf`` (or the strings ``"nan"``, ``"inf"``) are refused with the key named
  (``allow_inf_nan=False``). Untyped values (loss keyword arguments, plugin options, ``unlearn.loss_args``) are not
  pydantic floats; :func:`nonfinite_keys` finds non-finite numbers there, and ``RunConfig`` refuses them.
- A boolean is not a number: ``batch_size: true`` is an error, not 1 (pydantic's lax mode would take it). Floats
  for int fields must be whole (``2.0`` is 2, ``2.5`` is an error); numeric strings such as ``"1e-5"`` (PyYAML reads
  ``1e-5`` as a string) still parse for float fields.
"""

from __future__ import annotations

import math
import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

__all__ = ["Section", "nonfinite_keys"]


def _numeric_types(annotation: Any) -> set[type]:
    """``{int}``, ``{float}``, both or none: the number types a field annotation (``int | None`` ...) admits."""
    origin = typing.get_origin(annotation)
    members = typing.get_args(annotation) if origin in (typing.Union, types.UnionType) else (annotation,)
    return {m for m in members if m in (int, float)}


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated, numbers are numbers."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _bool_is_not_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and info.field_name in cls.model_fields:
            numbers = _numeric_types(cls.model_fields[info.field_name].annotation)
            if numbers:
                kind = "an integer" if numbers == {int} else "a number"
                raise ValueError(f"expected {kind}, got a boolean")
        return value


def nonfinite_keys(data: Any, prefix: tuple = ()) -> list[tuple[tuple, float]]:
    """``[(key path, value), ...]`` for every NaN / infinite float anywhere in nested dicts and lists."""
    if isinstance(data, float) and not math.isfinite(data):
        return [(prefix, data)]
    if isinstance(data, dict):
        return [hit for key, value in data.items() for hit in nonfinite_keys(value, prefix + (key,))]
    if isinstance(data, list | tuple):
        return [hit for i, value in enumerate(data) for hit in nonfinite_keys(value, prefix + (i,))]
    return []

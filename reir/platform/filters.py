"""Structured search filters (``{"field", "op", "value"}``) -> Milvus expressions.

Callers (the HTTP API) never send expression text. A filter names a field from an
allow-list (the built-in ``image_id``, ``model_version``, ``uri`` plus the metadata
fields a deployment declares), an operator that fits the field's type, and a value.
String values are escaped into one complete literal (:func:`reir.platform.store.quote_string`):
any file name a user has (spaces, brackets, quotes, backslashes, unicode) can be filtered
on, and no value can end the literal early. Numbers must be finite and in int64 range.
Anything else raises :class:`FilterError` (the API answers 422).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from reir.platform import schema as S
from reir.platform.store import SearchFilter, quote_string

FieldType = Literal["str", "int", "float", "bool"]
Op = Literal["eq", "ne", "in", "not_in", "prefix", "lt", "le", "gt", "ge"]

BUILTIN_FIELDS: dict[str, FieldType] = {S.IMAGE_ID: "str", S.MODEL_VERSION: "str", S.URI: "str"}
OPS_BY_TYPE: dict[FieldType, frozenset[str]] = {
    "str": frozenset({"eq", "ne", "in", "not_in", "prefix"}),
    "int": frozenset({"eq", "ne", "in", "not_in", "lt", "le", "gt", "ge"}),
    "float": frozenset({"lt", "le", "gt", "ge"}),  # equality on floats is a trap
    "bool": frozenset({"eq", "ne"}),
}
_COMPARE = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}
_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
# LIKE's wildcards and its escape character; a prefix filter matches them literally.
_LIKE_SPECIAL = re.compile(r"([\\%_])")
_INT64 = (-(2**63), 2**63 - 1)
MAX_LIST_VALUES = 100


class FilterError(ValueError):
    """A filter the allow-list or the value rules reject (HTTP 422)."""


def allowed_fields(metadata: Mapping[str, FieldType] | None = None) -> dict[str, FieldType]:
    """The built-in fields plus declared metadata fields (validated names, no shadowing)."""
    fields = dict(BUILTIN_FIELDS)
    for name, kind in (metadata or {}).items():
        if not _FIELD_NAME.match(name):
            raise FilterError(f"metadata field name {name!r} is not an identifier")
        if name in S.RESERVED_FIELDS:
            raise FilterError(f"metadata field {name!r} shadows a schema field")
        if kind not in OPS_BY_TYPE:
            raise FilterError(f"metadata field {name!r}: type must be one of {sorted(OPS_BY_TYPE)}")
        fields[name] = kind
    return fields


def _literal(kind: FieldType, value: Any, field: str) -> str:
    if kind == "str":
        if not isinstance(value, str) or not value:
            raise FilterError(f"{field}: expected a non-empty string")
        try:
            return quote_string(value)
        except ValueError as exc:
            raise FilterError(f"{field}: {exc}") from exc
    if kind == "bool":
        if not isinstance(value, bool):
            raise FilterError(f"{field}: expected true or false")
        return "true" if value else "false"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FilterError(f"{field}: expected a number")
    if kind == "int":
        if not isinstance(value, int) or not _INT64[0] <= value <= _INT64[1]:
            raise FilterError(f"{field}: expected a 64-bit integer")
        return str(int(value))
    if not math.isfinite(float(value)) or abs(float(value)) > 1e300:
        raise FilterError(f"{field}: expected a finite number")
    return repr(float(value))


@dataclass(frozen=True)
class Condition:
    """One validated clause; only :meth:`to_expr` turns it into Milvus syntax."""

    field: str
    op: str
    literal: str  # a complete literal rendered by _literal (for prefix: the LIKE pattern)

    def to_expr(self) -> str:
        if self.op in _COMPARE:
            return f"{self.field} {_COMPARE[self.op]} {self.literal}"
        if self.op == "in":
            return f"{self.field} in {self.literal}"
        if self.op == "not_in":
            return f"{self.field} not in {self.literal}"
        return f"{self.field} like {self.literal}"


def compile_condition(field: str, op: str, value: Any, fields: Mapping[str, FieldType]) -> Condition:
    """Validate one ``{"field","op","value"}`` clause against the allow-list ``fields``."""
    kind = fields.get(field)
    if kind is None:
        raise FilterError(f"field {field!r} is not filterable; allowed: {sorted(fields)}")
    if op not in OPS_BY_TYPE[kind]:
        raise FilterError(f"{field}: op {op!r} is not allowed; allowed: {sorted(OPS_BY_TYPE[kind])}")
    if op in ("in", "not_in"):
        if not isinstance(value, list) or not 1 <= len(value) <= MAX_LIST_VALUES:
            raise FilterError(f"{field}: {op} needs a list of 1..{MAX_LIST_VALUES} values")
        return Condition(field, op, "[" + ", ".join(_literal(kind, v, field) for v in value) + "]")
    if isinstance(value, list):
        raise FilterError(f"{field}: {op} needs a single value")
    if op == "prefix":
        if not isinstance(value, str) or not value:
            raise FilterError(f"{field}: expected a non-empty string")
        # '%', '_' and '\' in the value match themselves, then anything may follow.
        return Condition(field, op, _literal(kind, _LIKE_SPECIAL.sub(r"\\\1", value) + "%", field))
    return Condition(field, op, _literal(kind, value, field))


@dataclass(frozen=True)
class StructuredFilter(SearchFilter):
    """A :class:`SearchFilter` plus validated conditions, all joined with ``and``."""

    conditions: tuple[Condition, ...] = ()

    def to_expr(self) -> str:
        parts = [super().to_expr(), *(c.to_expr() for c in self.conditions)]
        return " and ".join(p for p in parts if p)


def compile_filters(
    clauses: Sequence[Mapping[str, Any]],
    fields: Mapping[str, FieldType],
    *,
    model_version: str | None = None,
) -> StructuredFilter:
    """``[{"field","op","value"}, ...]`` -> one :class:`StructuredFilter` (all must hold)."""
    conditions = []
    for clause in clauses:
        unknown = set(clause) - {"field", "op", "value"}
        if unknown:
            raise FilterError(f"unknown filter keys {sorted(unknown)}")
        conditions.append(compile_condition(str(clause.get("field")), str(clause.get("op")), clause.get("value"),
                                            fields))
    return StructuredFilter(model_version=model_version, conditions=tuple(conditions))

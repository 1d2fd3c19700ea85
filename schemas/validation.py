"""Checking a table against a schema before it is written."""
from __future__ import annotations

import pyarrow as pa


class SchemaError(ValueError):
    """A table does not match the schema it is written under."""


def validate_table(table: pa.Table, schema: pa.Schema, what: str) -> None:
    """Raise SchemaError naming the first problem: missing/extra/reordered columns, wrong types, nulls in
    non-nullable columns."""
    names, expected = table.schema.names, schema.names
    if names != expected:
        missing = [n for n in expected if n not in names]
        extra = [n for n in names if n not in expected]
        detail = f"missing {missing}" if missing else f"unexpected {extra}" if extra else "columns out of order"
        raise SchemaError(f"{what} table does not match its schema: {detail}")
    for field in schema:
        column = table.column(field.name)
        if not column.type.equals(field.type):
            raise SchemaError(f"{what} column {field.name!r} has type {column.type}, schema says {field.type}")
        if not field.nullable and column.null_count:
            raise SchemaError(f"{what} column {field.name!r} has {column.null_count} nulls but is not nullable")

"""python -m schemas.describe: print every table schema the jobs write, with column docs."""
from __future__ import annotations

import pyarrow as pa

from schemas.attributions import ERROR_SCHEMA, attribution_schema
from schemas.metrics import SANITY_SCHEMA
from schemas.samples import SAMPLE_SCHEMA


def describe(schema: pa.Schema) -> str:
    """One line per column: name, type, nullability and its documentation."""
    lines = []
    for field in schema:
        doc = (field.metadata or {}).get(b"doc", b"").decode()
        lines.append(f"  {field.name:<14} {str(field.type):<58} {'' if field.nullable else 'not null':<9} {doc}")
    return "\n".join(lines)


def main() -> None:
    """Print the schemas of samples, attribution rows and error rows."""
    for title, schema in (("samples (decoded WebDataset samples)", SAMPLE_SCHEMA),
                          ("attributions/<shard>/part-*.parquet (map dtype float16 by default)",
                           attribution_schema(224, "float16")),
                          ("errors/<shard>/part-*.parquet", ERROR_SCHEMA),
                          ("sanity/part-*.parquet (jobs.sanity; its errors/part-*.parquet use the errors schema)",
                           SANITY_SCHEMA)):
        print(f"{title}\n{describe(schema)}\n")


if __name__ == "__main__":
    main()

"""Plain text tables for the benchmarks' printed output (one place for the column layout), and their JSON files."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def text_table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """``head`` and ``rows`` (cells formatted by the caller; ``str()`` of each) as left-aligned columns separated by
    `` | ``, with a ``-+-`` rule under the head; each column as wide as its widest cell."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *cells)]
    fmt = " | ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), "-+-".join("-" * w for w in widths)] + [fmt.format(*row) for row in cells])


def write_report(path: Path, report: dict) -> None:
    """Write a benchmark's ``report`` as indented JSON to ``path`` (parents created) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(f"wrote {path}")

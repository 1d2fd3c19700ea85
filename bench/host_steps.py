"""The host-side steps between an attribution actor's maps and the staged Parquet parts, per map: the actor's output
(its rows as Arrow IPC blobs in a binary column) and the write step (workers.staging.write_parts).

    python -m bench.host_steps [--images 16] [--methods 16] [--size 224] [--dtype float16] [--repeats 7]
                               [--out bench/results/host_steps.json]

One actor batch as bench.compaction builds it (``--images`` x ``--methods`` x top-5 maps of random values, the
schema's other columns filled in). The actor's output step two ways: through Python bytes (``ipc_blob`` then
``pa.Table.from_pydict``: what the actors did before) and as ours (``ipc_buffer`` then ``binary_chunks``: the IPC
stream's own buffer becomes the column). The write step on that output into a temporary folder, with the Parquet
write alone (``pyarrow.parquet.write_table`` of the same rows with ``parquet_options``) as its floor. Fastest of
``--repeats``, alternating, in this process (1 thread). Prints a table with ms per map and ratios, writes JSON.
"""
from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.compaction import batch_table
from bench.tables import text_table, write_report
from workers.batches import binary_chunks, ipc_blob, ipc_buffer, ipc_tables
from workers.sink import ROW_GROUP_SIZE, parquet_options
from workers.staging import write_parts

DEFAULT_OUT = Path("bench/results/host_steps.json")


def fastest(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Seconds of the fastest of ``repeats`` calls of each fn, the fns called alternately."""
    best = {label: float("inf") for label in fns}
    for _ in range(repeats):
        for label, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[label] = min(best[label], time.perf_counter() - t0)
    return best


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (module docstring)."""
    p = argparse.ArgumentParser(prog="python -m bench.host_steps", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--methods", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--dtype", default="float16", choices=("float16", "float32", "int8", "uint8"))
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args(argv)
    keys = [f"ILSVRC2012_val_{i:08d}" for i in range(a.images)]
    batch = batch_table(keys, a.methods, 5, a.size, a.dtype, np.random.default_rng(0))
    (rows,) = ipc_tables(batch.column("attributions")[0].as_py())
    maps = rows.num_rows
    schema = pa.schema([("attributions", pa.binary())])
    work = Path(tempfile.mkdtemp(prefix="host_steps-"))

    def write_step() -> None:
        write_parts(batch, str(work / f"w{time.perf_counter_ns()}"), ("parquet",))

    def parquet_only() -> None:
        pq.write_table(rows, str(work / f"p{time.perf_counter_ns()}.parquet"), row_group_size=ROW_GROUP_SIZE,
                       **parquet_options(rows.schema))

    try:
        output = fastest({"bytes": lambda: pa.Table.from_pydict({"attributions": [ipc_blob(rows)]}, schema=schema),
                          "ours": lambda: pa.Table.from_pydict({"attributions": binary_chunks([ipc_buffer(rows)])},
                                                               schema=schema)}, a.repeats)
        write = fastest({"write_parts": write_step, "parquet_write_table": parquet_only}, a.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    per_map = {k: v / maps * 1e3 for k, v in {**{f"output_{k}": v for k, v in output.items()}, **write}.items()}
    mib = rows.nbytes / 2 ** 20
    print(f"{a.images} images x {a.methods} methods x top-5 = {maps} maps, {a.size} px {a.dtype}, "
          f"{mib:.0f} MiB of rows; fastest of {a.repeats}, 1 thread")
    print(text_table(["step", "ms / map", "ms / batch", "ratio"], [
        ["actor output through bytes (before)", f"{per_map['output_bytes']:.4f}", f"{output['bytes'] * 1e3:.1f}",
         f"{output['bytes'] / output['ours']:.1f}x ours"],
        ["actor output as Arrow buffers (ours)", f"{per_map['output_ours']:.4f}", f"{output['ours'] * 1e3:.1f}", ""],
        ["write step (write_parts)", f"{per_map['write_parts']:.4f}", f"{write['write_parts'] * 1e3:.1f}",
         f"{write['write_parts'] / write['parquet_write_table']:.2f}x floor"],
        ["floor: Parquet write of the rows", f"{per_map['parquet_write_table']:.4f}",
         f"{write['parquet_write_table'] * 1e3:.1f}", ""]]))
    write_report(a.out, {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                         "maps": maps, "rows_mib": mib, "seconds": {**{f"output_{k}": v for k, v in output.items()},
                                                                   **write},
                         "ms_per_map": per_map, "machine": {"python": platform.python_version(),
                                                            "pyarrow": pa.__version__,
                                                            "processor": platform.processor()}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Per-operator figures of the Ray Data pipelines a run executed, read back from Ray Data's own log: where a
pipeline's time went (read, decode, the actor, the write step), for a run that has to be read afterwards — the one
call on a lent GPU machine.

    python -m bench.ray_data_log [--logs DIR | --from-log RUN.log] [--out ray_data_operators.json]

``--from-log``: the folder Ray Data named in a run's printed output ("Full logs are in DIR", the last one), so the
figures are that run's own; ``--logs``: a folder; neither: the latest Ray session's.

Ray Data logs, when each operator completes, a line ``Operator <name> completed. Operator Metrics:`` followed by
its metrics as a Python dict repr (Ray 2.60; some values are object reprs, so the fields are picked out one by
one). Per dataset and operator this keeps: tasks, mean / max task duration (s), mean scheduling and output
back-pressure time per task (s), mean block generation and serialisation time (s), input rows, output bytes and the
largest USS of a task (bytes). Prints a table, writes JSON; a log
without such lines gives an empty list (and says so), never an error.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

from bench.tables import text_table

COMPLETED = re.compile(r"Operator (?P<op>.+?) completed\. Operator Metrics:\s*$")
PLAN = re.compile(r"Execution plan of Dataset (?P<ds>\S+?):")
FULL_LOGS = re.compile(r"Full logs are in (\S+)")


def default_logs() -> Path:
    """Where Ray puts the latest session's Ray Data logs by default: <RAY_TMPDIR, else TMPDIR, else /tmp>/ray/
    session_latest/logs/ray-data (as Ray's own temp-dir rule on Linux)."""
    base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return Path(base) / "ray" / "session_latest" / "logs" / "ray-data"


def logs_named_in(run_log: Path) -> Path | None:
    """The Ray Data log folder the last "Full logs are in DIR" line of a run's printed output names; None if none."""
    found = FULL_LOGS.findall(run_log.read_text(encoding="utf-8", errors="replace")) if run_log.is_file() else []
    return Path(found[-1]) if found else None


def _number(text: str, key: str) -> float | None:
    """The number logged for ``'key': <number>`` in ``text``; None if absent."""
    found = re.search(rf"'{re.escape(key)}': (-?[0-9.]+(?:e[-+]?[0-9]+)?)", text)
    return float(found[1]) if found else None


def _stat(text: str, key: str, field: str) -> float | None:
    """``field`` of the flat dict logged for ``'key': {...}`` in ``text``; None if absent."""
    found = re.search(rf"'{re.escape(key)}': (\{{[^{{}}]*\}})", text)
    try:
        value = ast.literal_eval(found[1]).get(field) if found else None
    except (ValueError, SyntaxError):
        return None
    return float(value) if isinstance(value, (int, float)) else None


def operator_metrics(log: Path) -> list[dict[str, Any]]:
    """The completed operators in Ray Data's main log ``log`` (ray-data.log), in log order: one dict per (dataset,
    operator) with the fields of the module docstring; metrics that Ray did not log are None."""
    rows: list[dict[str, Any]] = []
    dataset, lines = None, log.read_text(encoding="utf-8", errors="replace").splitlines()
    for i, line in enumerate(lines):
        if plan := PLAN.search(line):
            dataset = plan["ds"]
        done = COMPLETED.search(line)
        if not done or i + 1 >= len(lines):
            continue
        text = lines[i + 1]
        if done["op"].startswith("InputDataBuffer"):
            continue
        rows.append({
            "dataset": dataset, "operator": done["op"],
            "tasks": _stat(text, "op_task_duration_stats", "num_samples"),
            "task_mean_s": _stat(text, "op_task_duration_stats", "mean"),
            "task_max_s": _stat(text, "op_task_duration_stats", "max"),
            "scheduling_mean_s": _number(text, "average_task_scheduling_time_s"),
            "backpressure_mean_s": _number(text, "average_task_output_backpressure_time_s"),
            "block_gen_mean_s": _number(text, "average_task_block_gen_and_ser_time_s"),
            "rows_in": _number(text, "num_row_inputs_received"),
            "bytes_out": _number(text, "bytes_task_outputs_generated"),
            "max_uss_bytes": _stat(text, "max_uss_bytes", "max"),
        })
    return rows


def _fmt(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if digits else f"{value:.0f}"


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (module docstring)."""
    p = argparse.ArgumentParser(prog="python -m bench.ray_data_log", description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group()
    where.add_argument("--logs", type=Path, default=None, help="Ray Data's log folder")
    where.add_argument("--from-log", type=Path, default=None, help="a run's printed output naming that folder")
    p.add_argument("--out", type=Path, default=Path("ray_data_operators.json"))
    a = p.parse_args(argv)
    folder = logs_named_in(a.from_log) if a.from_log is not None else a.logs or default_logs()
    log = folder / "ray-data.log" if folder is not None else None
    rows = operator_metrics(log) if log is not None and log.is_file() else []
    if log is None:
        print(f"Ray Data operators: {a.from_log} names no Ray Data log folder (no pipeline ran)")
    else:
        print(f"Ray Data operators ({log}: {f'{len(rows)} completed' if log.is_file() else 'no such file'})")
    if rows:
        mib = (lambda v: "-" if v is None else f"{v / 2**20:.0f}")
        print(text_table(["dataset", "operator", "tasks", "task s mean", "task s max", "sched s", "backpressure s",
                          "block gen s", "rows in", "MiB out", "max USS MiB"],
                         [[r["dataset"][-8:] if r["dataset"] else "-", r["operator"], _fmt(r["tasks"], 0),
                           _fmt(r["task_mean_s"]), _fmt(r["task_max_s"]), _fmt(r["scheduling_mean_s"]),
                           _fmt(r["backpressure_mean_s"]), _fmt(r["block_gen_mean_s"]), _fmt(r["rows_in"], 0),
                           mib(r["bytes_out"]), mib(r["max_uss_bytes"])] for r in rows]))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"log": str(log) if log else None, "operators": rows}, indent=2), encoding="utf-8")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

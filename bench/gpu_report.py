"""bench.gpu_check's output: the JSON report (JSON-safe, rewritten atomically), the printed tables and number
cells, one-line errors, and the record of the machine and software the numbers come from."""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from bench.gpu_plan import JSON_NAME, Plan
from bench.provenance import device_name, git_commit, versions
from bench.tables import text_table


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def finite(value: Any) -> Any:
    """JSON-safe copy: NaN/inf floats become None, tuples lists, other objects their str."""
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def write_report(report: dict, plan: Plan) -> Path:
    """Write ``report`` (JSON-safe via :func:`finite`) to ``plan.out / JSON_NAME`` through a temporary file and a
    rename, so a kill mid-write keeps the previous report; returns the path."""
    plan.out.mkdir(parents=True, exist_ok=True)
    path = plan.out / JSON_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(finite(report), indent=2))
    tmp.replace(path)
    return path


def print_table(title: str, head: list[str], rows: list[list[Any]]) -> None:
    """Print ``title`` and a plain text table (:func:`bench.tables.text_table`; numbers formatted by the caller)."""
    print(f"\n{title}")
    print(text_table(head, rows), flush=True)


def fmt(value: float | None, digits: int = 1) -> str:
    """A number cell with ``digits`` decimals; "-" for None, NaN or inf."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def environment(device: torch.device) -> dict[str, Any]:
    """Facts about the machine and the software the numbers come from."""
    env: dict[str, Any] = {"device": str(device), "device_name": device_name(device), "cpu_count": os.cpu_count(),
                           "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                           "versions": versions(), "git_commit": git_commit(),
                           "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                           "cudnn_version": torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
                           else None, "cudnn_benchmark": torch.backends.cudnn.benchmark}
    try:
        import ray
        env["versions"]["ray"] = ray.__version__
    except ImportError:
        env["versions"]["ray"] = "not installed"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu_name=props.name, gpu_capability=f"{props.major}.{props.minor}",
                   gpu_memory_bytes=int(props.total_memory), gpu_multiprocessors=props.multi_processor_count,
                   bf16_supported=torch.cuda.is_bf16_supported(),
                   cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20, check=False).stdout.strip()
            env["nvidia_smi"] = smi.splitlines()
        except (OSError, subprocess.SubprocessError) as exc:
            env["nvidia_smi"] = one_line(exc)
    return env

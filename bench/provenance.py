"""Where a benchmark's numbers come from: package versions, the commit, the device's name."""
from __future__ import annotations

import platform
from pathlib import Path

import torch

from workers.device import device_name  # the one place; benchmarks import it from here too

__all__ = ["device_name", "git_commit", "versions"]


def versions() -> dict[str, str]:
    """{package: version} of Python, torch and the reference libraries ("not installed" where missing)."""
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("torchvision", "numpy", "captum", "grad-cam", "zennit", "saliency", "torchray", "scikit-image"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def git_commit() -> str | None:
    """HEAD of the checkout the benchmark ran from (+ "-dirty" when attribution/ has uncommitted changes)."""
    import subprocess
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, cwd=root, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "attribution"], check=False, cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("-dirty" if dirty else "")) or None

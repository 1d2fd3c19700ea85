"""The GPU session's carried packages (bench.gpu_bundle) and the wrapper that uses them (bench/gpu_check.sh).

The lent GPU machine has no Ray and no package registry, so the wrapper must find Ray in the bundle. Building a
real bundle downloads ~100 MB and takes ~1.5 minutes (a manual step before a GPU session); here the wheel
unpacking is checked on a small wheel made in the test, and the wrapper runs for real on the CPU: once with this
environment's Python, once with Ray hidden and a bundle that brings a stand-in, and once with neither.
"""
from __future__ import annotations

import importlib.metadata
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from bench import gpu_bundle

ROOT = Path(__file__).resolve().parents[1]
WRAPPER = ROOT / "bench" / "gpu_check.sh"


def make_wheel(path: Path, members: dict[str, tuple[bytes, int]]) -> Path:
    """A zip with each member's bytes and Unix mode (as pip's wheels carry them in external_attr)."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, (data, mode) in members.items():
            info = zipfile.ZipInfo(name, date_time=(2026, 1, 2, 3, 4, 5))
            info.external_attr = (stat.S_IFREG | mode) << 16
            zf.writestr(info, data)
    return path


def test_wheel_unpacked_with_modes_and_without_the_dropped_paths(tmp_path):
    wheel = make_wheel(tmp_path / "ray-0-cp312-cp312-manylinux2014_x86_64.whl", {
        "ray/__init__.py": (b"x = 1\n", 0o644),
        "ray/core/src/ray/raylet/raylet": (b"\x7fELF" + b"\0" * 60, 0o755),
        "ray/jars/ray_dist.jar": (b"j" * 1000, 0o644),
        "ray/dashboard/client/build/index.html": (b"<html>" * 10, 0o644),
        "ray/dashboard/modules/job.py": (b"y = 2\n", 0o644),
    })
    archive_path = tmp_path / "site.tar.xz"
    with tarfile.open(archive_path, "w:xz") as archive:
        kept, dropped = gpu_bundle.add_wheel(archive, wheel)
    assert (kept, dropped) == (6 + 64 + 6, 1000 + 60)
    with tarfile.open(archive_path) as archive:
        members = {m.name: m for m in archive.getmembers()}
        assert sorted(members) == ["ray/__init__.py", "ray/core/src/ray/raylet/raylet",
                                   "ray/dashboard/modules/job.py"]
        assert members["ray/core/src/ray/raylet/raylet"].mode == 0o755
        assert members["ray/__init__.py"].mode == 0o644
    assert gpu_bundle.unpack(archive_path, tmp_path / "site") == []  # no packages.txt in this one
    assert os.access(tmp_path / "site/ray/core/src/ray/raylet/raylet", os.X_OK)
    assert (tmp_path / "site/ray/__init__.py").read_bytes() == b"x = 1\n"


def test_unreadable_bundle_is_one_line_naming_it(tmp_path):
    broken = tmp_path / "site.tar.xz"
    broken.write_bytes(b"\xfd7zXZ\0" + b"not really xz" * 10)
    with pytest.raises(SystemExit, match=r"^gpu_bundle: cannot unpack .*site\.tar\.xz: "):
        gpu_bundle.unpack(broken, tmp_path / "site")


def test_pins_are_this_environments_versions_and_a_missing_package_is_named():
    pins = gpu_bundle.pinned(("ray", "captum"))
    assert pins == [f"ray=={importlib.metadata.version('ray')}", f"captum=={importlib.metadata.version('captum')}"]
    with pytest.raises(SystemExit, match="not installed in .*: no-such-package-xyz"):
        gpu_bundle.pinned(("ray", "no-such-package-xyz"))


def test_every_import_of_the_wrapper_is_bundled_or_on_the_device_image():
    # the wrapper's import check names the modules the check needs; each is in the bundle or in the device image
    on_device_image = {"torch", "pyarrow"}
    bundled_modules = {"ray", "captum", "webdataset", "braceexpand", "pytorch_grad_cam"}
    line = next(l for l in WRAPPER.read_text().splitlines() if '-c "import torch, ray' in l)
    needed = {m.strip() for m in line.split('-c "import ')[1].split('"')[0].split(",")}
    assert needed == on_device_image | bundled_modules
    distributions = importlib.metadata.packages_distributions()
    for module in bundled_modules:
        assert set(distributions[module]) & set(gpu_bundle.DEVICE_MISSING), module


def run_wrapper(tmp_path: Path, extra_env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "GPU_CHECK_BUNDLE", "GPU_CHECK_PYTHON")}
    env.update({"OUT": str(tmp_path / "out"), "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_ROAD_TIMEOUT_S": "0",
                "GPU_CHECK_PYTHON": sys.executable, **extra_env})
    return subprocess.run(["bash", str(WRAPPER), "--tiny", "--budget-s", "0", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def test_wrapper_runs_the_check_into_out(tmp_path):
    done = run_wrapper(tmp_path, {"GPU_CHECK_BUNDLE": str(tmp_path / "none.tar.xz")})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "from " not in done.stdout.splitlines()[0]  # this Python has Ray: no bundle unpacked
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["environment"]["device"] == "cpu"
    assert {s["status"] for s in report["sections"].values()} == {"skipped"}  # --budget-s 0
    assert "gpu_check: " in (tmp_path / "out" / "gpu_check.log").read_text()
    operators = json.loads((tmp_path / "out" / "ray_data_operators.json").read_text())
    assert operators == {"log": None, "operators": []}  # no pipeline ran: none read, and no stale session's


def hide_ray(tmp_path: Path) -> str:
    """A folder for PYTHONPATH whose ``ray`` package refuses to import: this Python then lacks Ray."""
    shadow = tmp_path / "shadow" / "ray"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text('raise ImportError("ray hidden by the test")\n')
    return str(shadow.parent)


def test_wrapper_takes_ray_from_the_bundle_when_its_python_lacks_it(tmp_path):
    # a bundle whose "ray" is a stand-in that says where it came from (enough for a run whose sections all skip)
    bundle = tmp_path / "site.tar.xz"
    stand_in = (b"__version__ = 'from-the-bundle'\nRUNS = []\n"
                b"def is_initialized():\n    return False\n")
    with tarfile.open(bundle, "w:xz") as archive:
        for name, data in (("packages.txt", b"ray==0-test\n"), ("ray/__init__.py", stand_in)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    done = run_wrapper(tmp_path, {"GPU_CHECK_BUNDLE": str(bundle), "PYTHONPATH": hide_ray(tmp_path)})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0] == f"gpu_check.sh: from {bundle}: ray==0-test", lines[:3]
    assert "ray from-the-bundle" in lines[1], lines[:3]
    assert json.loads((tmp_path / "out" / "gpu_check.json").read_text())["sections"]


def test_wrapper_without_ray_or_bundle_stops_with_one_line(tmp_path):
    done = run_wrapper(tmp_path, {"GPU_CHECK_BUNDLE": str(tmp_path / "none.tar.xz"),
                                  "PYTHONPATH": hide_ray(tmp_path)})
    assert done.returncode == 1
    first = done.stderr.splitlines()[0]
    assert first.startswith("gpu_check.sh: ") and "cannot import what the check needs" in first, done.stderr
    assert "ray hidden by the test" in first
    assert not (tmp_path / "out" / "gpu_check.json").exists()

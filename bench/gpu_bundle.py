"""The Python packages a GPU session carries to the lent device machine, as one archive (issues 13 and 17).

    python -m bench.gpu_bundle [--python-version 3.12] [--out .gpu_bundle] [--max-mib 48]
    python -m bench.gpu_bundle --unpack .gpu_bundle/site.tar.xz --into DIR      (what bench/gpu_check.sh runs)

The lent GPU machine (the session's ``device`` tool) has PyTorch, NumPy, pandas, pyarrow, SciPy, scikit-image,
matplotlib, psutil and nvidia-ml-py in its ``python3`` (Python 3.12, listed in the tool library's
``device/KINDS.md``), but not Ray, Captum, pytorch-grad-cam or webdataset, and it reaches no package registry:
``make .venv/.installed`` cannot run there. What travels with a call is the working tree plus at most 64 MiB of
ignored paths, and Ray's wheel alone is 79 MB. This module builds ``<out>/site.tar.xz`` on a developer machine
(which has the registry):

1. ``pip download --no-deps`` of every package of :data:`DEVICE_MISSING` for CPython ``--python-version`` on
   manylinux x86-64, each at the version installed in the running environment (``make test``'s .venv), so the
   device runs what the tests ran;
2. each wheel unpacked (file modes kept: Ray's ``raylet`` and ``gcs_server`` are executables) without the paths of
   :data:`DROPPED` (Ray's Java jar and its dashboard's web client: 33 of Ray's 79 MB, never loaded by a local
   Ray Data job);
3. everything as one xz tar, with ``packages.txt`` (name==version per line) at its root.

``bench/gpu_check.sh`` unpacks it into a temporary folder on ``PYTHONPATH`` when its Python cannot import Ray.
The device call is then ``run(command="bench/gpu_check.sh", carry=[".gpu_bundle"])``.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import io
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterable
from pathlib import Path

# Imported by the check, the jobs or the references and absent from the device image (KINDS.md, 2026-11-17),
# with what they need that the image lacks too (Ray: jsonschema and its three; pytorch-grad-cam: ttach).
DEVICE_MISSING = (
    "ray", "jsonschema", "jsonschema-specifications", "referencing", "rpds-py",
    "webdataset", "braceexpand",
    "captum", "grad-cam", "ttach", "zennit", "saliency", "torchray",
)
# Path prefixes (inside the wheels) left out of the bundle: Ray's Java worker jar and its dashboard web client.
DROPPED = ("ray/jars/", "ray/dashboard/client/build/")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
ARCHIVE = "site.tar.xz"
MANIFEST = "packages.txt"
DEFAULT_OUT = Path(".gpu_bundle")
DEFAULT_MAX_MIB = 48.0  # the device tool carries 64 MiB in all; the working tree takes ~5 of it


def pinned(names: Iterable[str] = DEVICE_MISSING) -> list[str]:
    """``name==version`` for each name, at the version installed in this interpreter's environment.

    Raises ``SystemExit`` with one line naming every package that is not installed here (run ``make test`` first).
    """
    found, missing = [], []
    for name in names:
        try:
            found.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    if missing:
        raise SystemExit(f"gpu_bundle: not installed in {sys.prefix}: {', '.join(missing)} (run `make test` once, "
                         "then `.venv/bin/python -m bench.gpu_bundle`)")
    return found


def kept(member: str) -> bool:
    """Whether a wheel's member path goes into the bundle (not under one of :data:`DROPPED`)."""
    return not member.startswith(DROPPED)


def download(requirements: list[str], python_version: str, dest: Path) -> list[Path]:
    """Fetch one wheel per requirement (no dependencies) for CPython ``python_version`` on manylinux x86-64 into
    ``dest`` and return their paths. A package published only as a source archive (pytorch-grad-cam, torchray) is
    built here with ``pip wheel`` and accepted only when the result is pure Python (``-none-any``)."""
    wheels = []
    for requirement in requirements:
        before = set(dest.glob("*.whl"))
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--implementation", "cp",
               "--python-version", python_version, "-d", str(dest), "-q"]
        for platform in PLATFORMS:
            cmd += ["--platform", platform]
        if subprocess.run(cmd + [requirement], capture_output=True, text=True).returncode != 0:
            built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dest),
                                    requirement], capture_output=True, text=True)
            if built.returncode != 0:
                lines = [line for line in built.stderr.splitlines() if line.strip()]
                raise SystemExit(f"gpu_bundle: no wheel for {requirement}: {lines[-1] if lines else built.returncode}")
        new = sorted(set(dest.glob("*.whl")) - before)
        if len(new) != 1:
            raise SystemExit(f"gpu_bundle: {requirement} gave {len(new)} wheels in {dest}, expected one")
        if not new[0].name.endswith(("-none-any.whl", "_x86_64.whl")):
            raise SystemExit(f"gpu_bundle: {new[0].name} is neither pure Python nor built for manylinux x86-64")
        wheels.append(new[0])
    return wheels


def add_wheel(archive: tarfile.TarFile, wheel: Path) -> tuple[int, int]:
    """Unpack one wheel into ``archive`` (paths as in the wheel, i.e. a site-packages tree), keeping each member's
    Unix mode, without :data:`DROPPED`. Returns (bytes kept, bytes dropped), uncompressed."""
    kept_bytes = dropped_bytes = 0
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            if not kept(info.filename):
                dropped_bytes += info.file_size
                continue
            entry = tarfile.TarInfo(info.filename)
            entry.size = info.file_size
            mode = (info.external_attr >> 16) & 0o777
            entry.mode = mode if mode else 0o644
            entry.mtime = int(time.mktime(info.date_time + (0, 0, -1)))
            with zf.open(info) as data:
                archive.addfile(entry, data)
            kept_bytes += info.file_size
    return kept_bytes, dropped_bytes


def build(out: Path, python_version: str, max_mib: float = DEFAULT_MAX_MIB,
          names: Iterable[str] = DEVICE_MISSING) -> Path:
    """Build ``out/site.tar.xz`` (see the module docstring) and ``out/packages.txt``; return the archive's path.

    Raises ``SystemExit`` with one line when a package is not installed here, pip fails, or the archive is over
    ``max_mib`` MiB (it would not travel).
    """
    requirements = pinned(names)
    out.mkdir(parents=True, exist_ok=True)
    target = out / ARCHIVE
    manifest = "".join(f"{r}\n" for r in requirements).encode()
    with tempfile.TemporaryDirectory(prefix="gpu_bundle_") as tmp:
        wheels = download(requirements, python_version, Path(tmp))
        partial = target.with_suffix(".partial")
        kept_total = dropped_total = 0
        with tarfile.open(partial, "w:xz", preset=6) as archive:
            entry = tarfile.TarInfo(MANIFEST)
            entry.size = len(manifest)
            archive.addfile(entry, io.BytesIO(manifest))
            for wheel in wheels:
                k, d = add_wheel(archive, wheel)
                kept_total += k
                dropped_total += d
                print(f"  {wheel.name}: {k / 2**20:.1f} MiB kept, {d / 2**20:.1f} MiB dropped", flush=True)
        size_mib = partial.stat().st_size / 2**20
        if size_mib > max_mib:
            partial.unlink()
            raise SystemExit(f"gpu_bundle: {target} would be {size_mib:.1f} MiB, over --max-mib {max_mib:g}")
        partial.replace(target)
    (out / MANIFEST).write_bytes(manifest)
    print(f"wrote {target} ({size_mib:.1f} MiB; {kept_total / 2**20:.0f} MiB unpacked, "
          f"{dropped_total / 2**20:.0f} MiB dropped) for CPython {python_version}: {len(requirements)} packages")
    return target


def unpack(archive: Path, dest: Path) -> list[str]:
    """Unpack a bundle into ``dest`` (a folder for ``PYTHONPATH``) with Python's own tarfile/lzma (the device image
    need not have the ``xz`` program); returns its ``name==version`` lines. Raises ``SystemExit`` with one line
    naming the archive when it cannot be read."""
    try:
        with tarfile.open(archive) as tar:
            try:
                tar.extractall(dest, filter="tar")  # keeps the executables' x bits, refuses paths outside dest
            except TypeError:  # Python without extraction filters (< 3.10.12 / 3.11.4)
                tar.extractall(dest)
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise SystemExit(f"gpu_bundle: cannot unpack {archive}: {type(exc).__name__}: {exc}") from None
    manifest = dest / MANIFEST
    return manifest.read_text().split() if manifest.exists() else []


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--python-version", default="3.12", help="the device machine's CPython (KINDS.md: 3.12)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--max-mib", type=float, default=DEFAULT_MAX_MIB)
    p.add_argument("--unpack", type=Path, metavar="ARCHIVE", help="unpack this bundle (into --into) instead")
    p.add_argument("--into", type=Path, help="the folder --unpack fills")
    args = p.parse_args(argv)
    if args.unpack is not None:
        if args.into is None:
            p.error("--unpack needs --into DIR")
        print(f"{args.unpack}: {' '.join(unpack(args.unpack, args.into))}")
        return args.into
    return build(args.out, args.python_version, args.max_mib)


if __name__ == "__main__":
    main(sys.argv[1:])

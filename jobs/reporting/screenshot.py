"""A PNG of the report page from headless Chromium (Debian's ``chromium`` package), with the page's console
messages, so a test can tell that the page opens without errors.

Flags: those this kind of machine needs for a sandbox-less, offline, headless start (no sandbox as root, no GPU,
no background networking, a fresh profile), plus ``--enable-logging=stderr --v=0`` so that every console
message of the page reaches stderr as ``…:CONSOLE…] "message", source: URL (line)``. The page has no
JavaScript, so any console line is a problem (a failed resource, a blocked load …).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from jobs.common import JobError

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--enable-logging=stderr", "--v=0")
CONSOLE = re.compile(r":CONSOLE[:(]")


@dataclass
class Screenshot:
    """``path``: the PNG written; ``console``: the page's console messages (lines of Chromium's log)."""

    path: Path
    console: list[str]


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome binary: $CHROMIUM if set, else the first of CANDIDATES on PATH; None if none."""
    explicit = os.environ.get("CHROMIUM")
    if explicit:
        return shutil.which(explicit) or (explicit if Path(explicit).is_file() else None)
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def screenshot(page: str | Path, png: str | Path, *, width: int = 1400, height: int = 4000, timeout: float = 120,
               binary: str | None = None, trim: bool = False) -> Screenshot:
    """Open the local HTML file ``page`` in headless Chromium and save a ``width`` × ``height`` pixel PNG of its
    top to ``png`` (``trim``: then crop the empty rows below the page's end, for a whole-page picture taken with
    a tall window). JobError (one line) when no Chromium is found, it fails or times out, or writes no PNG."""
    binary = binary or find_chromium()
    if binary is None:
        raise JobError("no chromium binary found (apt-get install chromium, or set CHROMIUM=/path/to/chrome)")
    page, png = Path(page).resolve(), Path(png).resolve()
    if not page.is_file():
        raise JobError(f"{page} does not exist")
    png.parent.mkdir(parents=True, exist_ok=True)
    if png.exists():
        png.unlink()
    with tempfile.TemporaryDirectory(prefix="report-chromium-") as profile:
        command = [binary, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={png}",
                   f"--window-size={width},{height}", page.as_uri()]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise JobError(f"chromium did not finish the screenshot of {page} in {timeout:.0f} s") from None
    log = (done.stdout or "") + (done.stderr or "")
    if done.returncode != 0 or not png.is_file():
        last = [line for line in log.splitlines() if line.strip()][-1:] or ["no output"]
        raise JobError(f"chromium exited with status {done.returncode} without a screenshot of {page}: {last[0]}")
    if trim:
        trim_bottom(png)
    return Screenshot(png, [line for line in log.splitlines() if CONSOLE.search(line)])


def trim_bottom(png: str | Path, margin: int = 24) -> tuple[int, int]:
    """Crop the rows at the bottom of a PNG that are all the colour of its bottom-left pixel (the empty part of a
    tall viewport), keeping ``margin`` of them; returns the new (width, height)."""
    import numpy as np
    from PIL import Image

    with Image.open(png) as image:
        pixels = np.asarray(image.convert("RGB"))
    background = pixels[-1, 0]
    used = np.flatnonzero((pixels != background).any(axis=(1, 2)))
    height = min(pixels.shape[0], int(used[-1]) + 1 + margin) if used.size else pixels.shape[0]
    if height < pixels.shape[0]:
        Image.fromarray(pixels[:height]).save(png)
    return pixels.shape[1], height


__all__ = ["Screenshot", "find_chromium", "screenshot", "trim_bottom"]

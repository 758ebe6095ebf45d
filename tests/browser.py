"""Open a page in real headless Chromium (Debian's `chromium`) and read what it drew."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
from PIL import Image

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--enable-logging=stderr",
    "--v=0",
]


@dataclass
class Rendered:
    screenshot: Path
    dom: str
    log: str  # Chromium's stderr: console messages appear as "CONSOLE(...)" lines


def chromium() -> str:
    path = shutil.which("chromium")
    assert path, "Chromium is missing: run .ci/install-test-packages.sh"
    return path


def render(page: Path, work: Path, height: int = 3000) -> Rendered:
    """Screenshot and DOM of `page`, each from a fresh browser profile."""
    url = page.resolve().as_uri()
    shot = work / "screenshot.png"
    common = [chromium(), *FLAGS, f"--window-size=1280,{height}"]
    taken = subprocess.run(
        [*common, f"--user-data-dir={work / 'profile-shot'}", f"--screenshot={shot}", url],
        capture_output=True, text=True, timeout=120,
    )
    dumped = subprocess.run(
        [*common, f"--user-data-dir={work / 'profile-dom'}", "--dump-dom", url],
        capture_output=True, text=True, timeout=120,
    )
    assert shot.exists(), taken.stderr[-2000:]
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    return Rendered(shot, dumped.stdout, taken.stderr + dumped.stderr)


def console_problems(log: str) -> list[str]:
    """Console messages and failed loads that Chromium logged for the page."""
    return [
        line for line in log.splitlines()
        if "CONSOLE" in line or "Failed to load resource" in line or "Uncaught" in line
    ]


def ink(png: Path) -> tuple[float, int]:
    """(share of pixels that are not background white, number of distinct colours)."""
    pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)
    not_white = float((pixels.min(axis=1) < 245).mean())
    colours = len(np.unique(pixels[:: max(len(pixels) // 200_000, 1)], axis=0))
    return not_white, colours


class PageFigures(HTMLParser):
    """`data-key`/`data-value` pairs of a report page, by table row (data-instance / data-pool)
    or at the top level (the summary cards)."""

    def __init__(self, dom: str) -> None:
        super().__init__()
        self.top: dict[str, str] = {}
        self.instances: dict[str, dict[str, str]] = {}
        self.pools: dict[str, dict[str, str]] = {}
        self.svgs = 0
        self._row: dict[str, str] | None = None
        self.feed(dom)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "svg":
            self.svgs += 1
        if tag == "tr":
            if a.get("data-instance"):
                self._row = self.instances.setdefault(str(a["data-instance"]), {})
            elif a.get("data-pool"):
                self._row = self.pools.setdefault(str(a["data-pool"]), {})
            else:
                self._row = None
        key, value = a.get("data-key"), a.get("data-value")
        if key and value is not None:
            (self._row if self._row is not None else self.top)[key] = value

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._row = None

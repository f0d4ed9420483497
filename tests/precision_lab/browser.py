"""Open a page in Debian's headless chromium: its DOM after scripts ran, its console
errors, a screenshot. Tests that need it skip with the reason where chromium is absent.

Each call starts a fresh browser with a fresh profile and no network features
(background networking, component updates, sync off), so a page that tried to fetch
anything would show it as a console error. ``--virtual-time-budget`` lets the page's
scripts and Plotly's drawing finish before the DOM is dumped or the screenshot taken.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--enable-logging=stderr",
    "--v=0",
)
# chromium logs console messages to stderr as: [..:INFO:CONSOLE(12)] "message", source: ...
_CONSOLE = re.compile(r':CONSOLE[^\]]*\] "(?P<message>.*)", source: (?P<source>\S*)')


def chromium() -> str | None:
    """Path of the chromium executable, or None."""
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


requires_chromium = pytest.mark.skipif(
    chromium() is None,
    reason="chromium is not installed (apt-get install chromium); browser tests skip",
)


@dataclass
class PageRun:
    """What one headless visit produced."""

    dom: str
    console: list[str]
    stderr: str

    @property
    def errors(self) -> list[str]:
        """Console messages that report an error (uncaught exceptions, failed loads)."""
        words = ("error", "uncaught", "failed", "refused")
        return [m for m in self.console if any(w in m.lower() for w in words)]


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    exe = chromium()
    if exe is None:
        pytest.skip("chromium is not installed")
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        return subprocess.run(
            [exe, *FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def load(page: Path, budget_ms: int = 20_000, timeout: float = 120) -> PageRun:
    """Load ``page``, let its scripts run, and return the DOM and console messages."""
    proc = _run(
        [f"--virtual-time-budget={budget_ms}", "--dump-dom", page.resolve().as_uri()], timeout
    )
    console = [m.group("message") for m in _CONSOLE.finditer(proc.stderr)]
    if not proc.stdout.strip():
        raise RuntimeError(
            f"chromium dumped no DOM (exit {proc.returncode}): {proc.stderr[-2000:]}"
        )
    return PageRun(proc.stdout, console, proc.stderr)


def screenshot(
    page: Path, png: Path, size: tuple[int, int] = (1400, 4000), budget_ms: int = 20_000
) -> Path:
    """Save a screenshot of ``page`` (width x height in CSS pixels) to ``png``."""
    png.parent.mkdir(parents=True, exist_ok=True)
    proc = _run(
        [
            f"--virtual-time-budget={budget_ms}",
            f"--window-size={size[0]},{size[1]}",
            f"--screenshot={png.resolve()}",
            page.resolve().as_uri(),
        ],
        timeout=120,
    )
    if not png.is_file() or png.stat().st_size == 0:
        raise RuntimeError(f"chromium wrote no screenshot (exit {proc.returncode}).")
    return png


def artifacts_dir() -> Path:
    """``test-artifacts/`` at the repository root (git-ignored)."""
    root = Path(__file__).resolve().parents[2]
    path = root / "test-artifacts"
    path.mkdir(exist_ok=True)
    return path

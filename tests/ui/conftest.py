"""Browser-test fixtures: Debian's chromium (installed on first use when we are root), Playwright driving it, and the
dashboard served by uvicorn on a free local port."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
INSTALL = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
# Headless, and nothing that phones home: the test machines have no internet beyond the package registries.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _install_chromium() -> str | None:
    """Install Debian's chromium; None when it worked, else why not."""
    if shutil.which("apt-get") is None:
        return "no apt-get on this machine"
    if os.geteuid() != 0:
        return "not root, so it cannot be installed here"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    started = time.monotonic()
    for attempt in ("install", "update then install"):
        if attempt != "install":  # the package lists may be missing or stale on a fresh machine
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=600)
        result = subprocess.run(INSTALL, env=env, capture_output=True, text=True, timeout=900)
        if result.returncode == 0 and CHROMIUM.exists():
            print(f"\ninstalled chromium in {time.monotonic() - started:.0f} s", file=sys.stderr)
            return None
    tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
    return f"`{' '.join(INSTALL)}` failed: {tail[0]}"


@pytest.fixture(scope="session")
def chromium_path() -> str:
    pytest.importorskip("playwright.sync_api", reason="Playwright is missing: pip install -e '.[dev]'")
    if not CHROMIUM.exists():
        why = _install_chromium()
        if why:
            pytest.skip(f"browser tests need Debian's chromium at {CHROMIUM}: {why}. Install it with: "
                        f"sudo {' '.join(INSTALL)}")
    return str(CHROMIUM)


@pytest.fixture(scope="module")
def browser(chromium_path, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    yield context.new_page()
    context.close()

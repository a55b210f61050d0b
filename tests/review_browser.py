"""Headless Chromium (Debian's /usr/bin/chromium) driven by Playwright, for the review tests."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def missing_tool(what: str) -> None:
    """Skip on a developer machine without the tool; fail on CI, where .ci/run installs it."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must have {what}")
    pytest.skip(f"needs {what}")


def chromium_path() -> str | None:
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@contextmanager
def chromium() -> Iterator[Any]:
    """Chromium with the flags it needs as root on a closed network; Playwright gives it a fresh profile
    folder (its own temporary --user-data-dir) per launch."""
    try:
        from playwright import sync_api
    except ImportError:
        missing_tool("playwright (pip install playwright, extra `test`)")
    exe = chromium_path()
    if exe is None:
        missing_tool("a chromium binary (apt-get install chromium; .ci/run installs it)")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def wait_images_loaded(page: Any, selector: str, timeout: float = 10.0) -> int:
    """Wait until every image matching `selector` has decoded (polled from Python: the app's CSP forbids the
    eval that Playwright's wait_for_function needs); returns how many there are."""
    js = f"() => [...document.querySelectorAll({selector!r})].map(i => i.complete && i.naturalWidth > 0)"
    deadline = time.monotonic() + timeout
    while True:
        done = page.evaluate(js)
        if done and all(done):
            return len(done)
        if time.monotonic() > deadline:
            raise AssertionError(f"images not loaded: {selector} {done}")
        time.sleep(0.05)

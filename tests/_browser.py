"""Headless Chromium for the results-page tests and bench (helper "browser").

Uses Debian's ``chromium`` and ``chromium-driver`` through selenium (PyPI), never a browser
downloaded at run time: the driver path is given, so selenium-manager is not consulted.
:func:`unavailable` says why a browser cannot be started (tests skip with that reason).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = os.environ.get("DEEPHEMNMA_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("DEEPHEMNMA_CHROMEDRIVER", "/usr/bin/chromedriver")
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--enable-unsafe-swiftshader",  # WebGL (NGL) on the CPU: SwiftShader
         "--window-size=1400,1000", "--hide-scrollbars", "--force-device-scale-factor=1"]


def unavailable() -> str | None:
    """None if headless Chromium can be driven here, else the reason it cannot."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium; make test installs it)"
    for path, pkg in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (Path(path).is_file() and os.access(path, os.X_OK)):
            return f"{path} not found (apt-get install {pkg}; make test does this where it runs as root)"
    return None


@contextmanager
def chromium(download_dir: Path | None = None, width: int = 1400, height: int = 1000):
    """A selenium Chrome driver on a fresh profile; browser console messages are kept."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="dh-chromium-")
    for f in FLAGS:
        opts.add_argument(f if not f.startswith("--window-size") else f"--window-size={width},{height}")
    opts.add_argument(f"--user-data-dir={profile}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    if download_dir is not None:
        opts.add_experimental_option("prefs", {"download.default_directory": str(download_dir),
                                               "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        if download_dir is not None:
            driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow",
                                                                   "downloadPath": str(download_dir)})
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def console_errors(driver) -> list[str]:
    """Browser console messages of level SEVERE since the last call."""
    return [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def wait_for(driver, script: str, timeout: float = 30.0, poll: float = 0.05):
    """Poll ``return <script>`` until truthy; return its value (TimeoutError otherwise)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        v = driver.execute_script(f"return {script}")
        if v:
            return v
        time.sleep(poll)
    raise TimeoutError(f"{script} still false after {timeout} s")


def wait_for_file(path: Path, timeout: float = 20.0) -> Path:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if path.is_file() and path.stat().st_size > 0:
            return path
        time.sleep(0.05)
    raise TimeoutError(f"{path} did not appear in {timeout} s")


def element_png(driver, css: str) -> bytes:
    """Screenshot of the first element matching ``css`` (scrolled into view)."""
    from selenium.webdriver.common.by import By

    el = driver.find_element(By.CSS_SELECTOR, css)
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", el)
    time.sleep(0.1)
    return el.screenshot_as_png


def not_blank(png: bytes, min_colours: int = 8, min_fraction: float = 0.01) -> tuple[bool, str]:
    """Whether a screenshot shows something: enough distinct colours, enough non-background pixels."""
    import io

    import numpy as np
    from matplotlib import image as mpimg

    img = (mpimg.imread(io.BytesIO(png), format="png")[..., :3] * 255).astype(np.uint8)
    flat = img.reshape(-1, 3)
    bg = np.median(flat, axis=0)
    frac = float((np.abs(flat.astype(int) - bg).sum(axis=1) > 30).mean())
    colours = len(np.unique(flat[:: max(1, len(flat) // 200_000)], axis=0))
    return colours >= min_colours and frac >= min_fraction, f"{colours} colours, {100 * frac:.1f} % non-background"

"""Screenshots of TensorBoard showing a wdiff export: docs/images/tensorboard.png (time series, the
block groups) and docs/images/tensorboard-images.png (the frames and the render).

    python scripts/tensorboard_screenshot.py                 # runs wdiff on sample_checkpoints/digits-gpt2
    python scripts/tensorboard_screenshot.py --out OUT       # or exports these results

Starts a real ``tensorboard --logdir`` server on a free port (the ``tensorboard`` beside this Python)
on a fresh export, opens it in headless Chromium through selenium (Debian's ``chromium`` and
``chromium-driver``), waits until the charts are drawn and saves the pictures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_checkpoints" / "digits-gpt2"
IMAGES = ROOT / "docs" / "images"
RUN = "digits-gpt2"  # the run's name in TensorBoard: the LOGDIR folder under --logdir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(logdir: Path, port: int) -> subprocess.Popen:
    """``tensorboard --logdir`` on ``port``, once it answers with the export's tags."""
    exe = Path(sys.executable).with_name("tensorboard")
    server = subprocess.Popen(
        [str(exe), "--logdir", str(logdir), "--port", str(port), "--host", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"tensorboard exited: {server.stderr.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/scalars/tags", timeout=2) as r:
                if json.load(r):
                    return server
        except OSError:
            pass
        time.sleep(0.5)
    server.terminate()
    raise RuntimeError("tensorboard did not answer within 60 s")


def browser(width: int, height: int):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--use-angle=swiftshader",
        "--enable-unsafe-swiftshader",
        f"--window-size={width},{height}",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver") or "chromedriver"), options=options)


def wait_for(driver, script: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if driver.execute_script(script):
            return
        time.sleep(0.5)
    raise RuntimeError(f"the page never satisfied: {script}")


# The time series dashboard is an Angular app whose cards live in its DOM: a chart is drawn when its
# line chart has a canvas or svg with content; every group of cards is a ``metrics-card-group``.
CHARTS_DRAWN = (
    "const cards = document.querySelectorAll('scalar-card');"
    "return cards.length >= 6 && [...cards].slice(0, 6).every(c => c.querySelector('canvas, svg path'));"
)
# the Custom Scalars dashboard is Polymer: its charts are inside shadow roots
CUSTOM_DRAWN = (
    "const deep = (root, sel) => [...root.querySelectorAll(sel)].concat("
    "  ...[...root.querySelectorAll('*')].filter(e => e.shadowRoot).map(e => deep(e.shadowRoot, sel)));"
    "return deep(document, 'tf-custom-scalar-multi-line-chart-card').length >= 2"
    "  && deep(document, 'svg path.line').length >= 7;"
)
# click the innermost element (inside shadow roots too) whose text is exactly arguments[0]
CLICK = (
    "const all = root => [...root.querySelectorAll('*')].flatMap("
    "  e => e.shadowRoot ? [e, ...all(e.shadowRoot)] : [e]);"
    "const hits = all(document).filter(e => e.textContent.trim() === arguments[0]);"
    "hits[hits.length - 1].click();"
)
OPEN_BLOCK = "transformer.h.1"  # the Custom Scalars category opened in the picture
IMAGES_DRAWN = (
    "const imgs = [...document.querySelectorAll('image-card img')];"
    "return imgs.length >= 2 && imgs.every(i => i.complete && i.naturalWidth > 0);"
)


#: TensorBoard's own settings, as its settings pane stores them in the browser: no smoothing (the points
#: are exact), no outlier clipping (a 7-point series has no outliers), the settings pane closed.
SETTINGS = {"scalarSmoothing": 0, "ignoreOutliers": False, "timeSeriesSettingsPaneOpened": False}


def shoot(port: int, target: Path, pictures: Path, custom: Path) -> None:
    driver = browser(1400, 1000)
    try:
        base = f"http://127.0.0.1:{port}/"
        driver.get(base)
        for key in ("_tb_global_settings", "_tb_global_settings.timeseries"):
            driver.execute_script(
                "localStorage.setItem(arguments[0], arguments[1])", key, json.dumps(SETTINGS)
            )
        # the time series tab filtered to one quantity: one card per block
        driver.get(f"{base}?darkMode=false&tagFilter={quote('^block[.]update_ratio_per_step/')}#timeseries")
        wait_for(driver, CHARTS_DRAWN)
        time.sleep(3)  # the charts animate in
        driver.save_screenshot(str(target))
        driver.get(f"{base}?darkMode=false&tagFilter={quote('^(frames|render)/')}#timeseries")
        wait_for(driver, IMAGES_DRAWN)
        time.sleep(2)
        driver.save_screenshot(str(pictures))
        # Custom Scalars: the layout the export wrote, every block in one chart per quantity
        driver.get(f"{base}?darkMode=false#custom_scalars&_smoothingWeight=0")
        wait_for(driver, CUSTOM_DRAWN)
        for text in ("Ignore outliers in chart scaling", f"wdiff: {OPEN_BLOCK}"):  # untick; open a block
            driver.execute_script(CLICK, text)
        time.sleep(4)
        driver.save_screenshot(str(custom))
    finally:
        driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="wdiff results to export (default: run the sample)")
    parser.add_argument("--images", type=Path, default=IMAGES, help="where the PNGs go")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from wdiff import api
    from wdiff.export.tensorboard import export

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out
        if out is None:
            out = Path(tmp) / "out"
            api.run(str(SAMPLE), out, frames=True)
        logroot = Path(tmp) / "logs"
        exported = export(out, logroot / RUN)
        print(
            f"{exported.path}: {exported.scalars} scalars, {exported.images} images, {exported.texts} texts"
        )
        port = free_port()
        server = start_server(logroot, port)
        try:
            args.images.mkdir(parents=True, exist_ok=True)
            shots = [args.images / f"tensorboard{s}.png" for s in ("", "-images", "-custom")]
            shoot(port, *shots)
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(", ".join(map(str, shots)))


if __name__ == "__main__":
    main()

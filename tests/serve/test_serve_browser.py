"""`camlens serve` end to end in a real headless browser: Debian's Chromium and chromedriver driven by
Selenium (installed by `make browser`, which `make test` runs). Skipped, with the reason, only where
Chromium or its driver is not installed. The screenshot lands in the test's tmp folder (and in
$CAMLENS_TEST_OUTPUT when set)."""

from __future__ import annotations

import io
import os
import shutil
import socket
import struct
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"

pytestmark = pytest.mark.slow


def _missing() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} is not installed (run `make browser`: apt-get install chromium chromium-driver)"
    for mod in ("selenium", "fastapi", "uvicorn"):
        try:
            __import__(mod)
        except ImportError:
            return f"{mod} is not installed (pip install 'camlens[serve,dev]')"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(lite0):
    """`camlens serve`'s app with the bundled EfficientNet-Lite0 on a free loopback port, in a thread."""
    import uvicorn

    from camlens.cli.serve import LOOPBACK_NAMES
    from camlens.serve.app import create_app
    from camlens.serve.service import Limits, ModelPool, Service

    svc = Service(ModelPool({"efficientnet_lite0": lite0}), Limits(max_upload_bytes=1_000_000))
    app = create_app(svc, allowed_hosts=LOOPBACK_NAMES)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    for _ in range(300):
        if srv.started:
            break
        time.sleep(0.02)
    assert srv.started, "the server did not start"
    yield f"http://127.0.0.1:{port}/"
    srv.should_exit = True
    t.join(10)


@pytest.fixture
def browser(tmp_path, monkeypatch):
    reason = _missing()
    if reason:
        pytest.skip(reason)
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never try to download a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    profile = tempfile.mkdtemp(prefix="camlens-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,1600",
        f"--user-data-dir={profile}",
    ):
        opts.add_argument(flag)
    opts.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    drv = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    drv.downloads = downloads
    try:
        yield drv
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _png_file(path: Path, arr: np.ndarray) -> Path:
    Image.fromarray(arr).save(path)
    return path


def _bomb(path: Path, side: int = 30000) -> Path:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )
    return path


def _shot(el) -> np.ndarray:
    with Image.open(io.BytesIO(el.screenshot_as_png)) as im:
        return np.asarray(im.convert("RGB")).astype(np.float32)


def test_upload_explain_box_download_in_chromium(server, browser, tmp_path, lite0, cat):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    import camlens
    from camlens.base.localization import localize, scale_boxes

    d = browser
    wait = WebDriverWait(d, 120)
    d.get(server)
    wait.until(lambda d: d.find_elements(By.ID, "method-gradcam"))
    # only the methods that apply to the model are offered: no attention method, no D-RISE for a CNN
    wait.until(lambda d: "CNN classifier" in (d.find_element(By.ID, "method-note").get_attribute("title") or ""))
    offered = {
        lb.get_attribute("data-method")
        for lb in d.find_elements(By.CSS_SELECTOR, "#methods label[data-method]")
        if lb.is_displayed()
    }
    assert "gradcam" in offered and not offered & {"attention_rollout", "generic_attention", "drise"}

    def upload(path: Path) -> None:
        d.find_element(By.ID, "file-input").send_keys(str(path))
        wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-state") in ("ready", "error"))

    # bad uploads: a clear message in the page and a 4xx; the server goes on serving
    text = tmp_path / "notes.jpg"
    text.write_text("a text file renamed .jpg\n" * 20)
    noise = (np.random.default_rng(0).random((700, 700, 3)) * 255).astype(np.uint8)
    for path, status, words in [
        (text, "415", "not an image file"),
        (_bomb(tmp_path / "bomb.png"), "413", "decompression bomb"),
        (_png_file(tmp_path / "huge.png", noise), "413", "more than this server's limit of 977 KiB"),
    ]:
        upload(path)
        msg = d.find_element(By.ID, "message")
        assert msg.is_displayed() and words in msg.text, msg.text
        assert msg.get_attribute("data-status") == status

    photo = _png_file(tmp_path / "cat.png", cat)
    upload(photo)
    assert d.find_element(By.ID, "status").get_attribute("data-state") == "ready"
    assert not d.find_element(By.ID, "message").is_displayed()

    # Grad-CAM only (the default choice), top-2 classes
    for box in d.find_elements(By.CSS_SELECTOR, "#methods input"):
        if box.is_selected() != (box.get_attribute("value") == "gradcam"):
            box.click()
    d.find_element(By.ID, "explain-btn").click()
    wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-state") in ("done", "error"))
    assert d.find_element(By.ID, "status").get_attribute("data-state") == "done", d.find_element(By.ID, "message").text

    ref = camlens.explain(lite0, str(photo), method="gradcam", targets="top2")
    rows = d.find_elements(By.CSS_SELECTOR, "#predictions tr.pred")
    assert rows[0].find_element(By.CSS_SELECTOR, "td.name").text == ref.labels()[0][0] == "Egyptian cat"
    panel = d.find_element(By.CSS_SELECTOR, ".panel[data-method=gradcam][data-class='285']")
    heat = panel.find_element(By.CSS_SELECTOR, "img.heat")
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", heat))
    assert heat.is_displayed()
    assert d.execute_script("return arguments[0].naturalWidth", heat) == 451

    # the overlay's pixels differ from the plain photo: opacity 0 shows the photo, 0.5 the heatmap over it
    stack = panel.find_element(By.CSS_SELECTOR, ".stack")
    d.execute_script("arguments[0].scrollIntoView({block: 'center'})", stack)  # whole in the viewport
    d.execute_script("arguments[0].querySelector('rect.box').style.visibility = 'hidden'", stack)
    overlaid = _shot(stack)
    d.find_element(By.ID, "opacity").send_keys(Keys.HOME)
    assert d.find_element(By.ID, "opacity-value").text == "0.00"
    plain = _shot(stack)
    resized = np.asarray(Image.fromarray(cat).resize(plain.shape[1::-1], Image.Resampling.BILINEAR), np.float32)
    assert np.abs(plain - resized).mean() < 8  # opacity 0: the photo itself
    assert np.abs(overlaid - plain).mean() > 25  # the heatmap changes the pixels
    for _ in range(10):
        d.find_element(By.ID, "opacity").send_keys(Keys.ARROW_RIGHT)
    assert d.find_element(By.ID, "opacity-value").text == "0.50"
    d.execute_script("arguments[0].querySelector('rect.box').style.visibility = ''", stack)

    # the box follows the threshold slider and is camlens.localize's box, scaled to the shown image
    def shown_box() -> list[int]:
        return [int(v) for v in panel.find_element(By.CSS_SELECTOR, "rect.box").get_attribute("data-box").split(",")]

    def oracle(t: float) -> list[int]:
        return scale_boxes(localize(ref.maps[0, 0], t), (224, 224), (300, 451)).tolist()

    assert d.find_element(By.ID, "threshold-value").text == "0.30"
    at_030 = shown_box()
    assert at_030 == oracle(0.3)
    for _ in range(8):
        d.find_element(By.ID, "threshold").send_keys(Keys.ARROW_RIGHT)
    assert d.find_element(By.ID, "threshold-value").text == "0.70"
    at_070 = shown_box()
    assert at_070 != at_030 and at_070 == oracle(0.7)
    b = at_070
    assert (b[2] - b[0]) * (b[3] - b[1]) < (at_030[2] - at_030[0]) * (at_030[3] - at_030[1])

    # click another class (the 3rd) to explain it
    rows[2].click()
    cls3 = int(rows[2].get_attribute("data-class"))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f".panel[data-method=gradcam][data-class='{cls3}']"))
    wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-state") == "done")

    # the figure download is a valid PNG
    d.find_element(By.ID, "download-figure").click()
    for _ in range(300):
        done = [p for p in d.downloads.glob("*.png")]
        if done and not list(d.downloads.glob("*.crdownload")):
            break
        time.sleep(0.1)
    assert [p.name for p in done] == ["cat_camlens.png"]
    with Image.open(done[0]) as im:
        im.verify()
    with Image.open(done[0]) as im:
        assert im.format == "PNG" and im.size[0] > 600

    d.execute_script("window.scrollTo(0, 0)")
    out = tmp_path / "serve.png"
    d.save_screenshot(str(out))
    if os.environ.get("CAMLENS_TEST_OUTPUT"):
        dest = Path(os.environ["CAMLENS_TEST_OUTPUT"])
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(out, dest / "serve.png")
    print(f"screenshot: {out}")

    # the other downloads: the maps as .npy (K, 224, 224) and the JSON summary with the box shown
    npy_head = d.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(document.querySelector('#download-npy a[data-method=gradcam]').href)"
        ".then(r => r.arrayBuffer()).then(b => done(String.fromCharCode(...new Uint8Array(b.slice(0, 128)))));"
    )
    assert npy_head.startswith("\x93NUMPY") and "'shape': (3, 224, 224)" in npy_head
    summary = d.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(document.getElementById('download-json').href).then(r => r.json()).then(done);"
    )
    assert summary["threshold"] == 0.7 and summary["predictions"][0]["name"] == "Egyptian cat"
    assert next(m for m in summary["maps"] if m["class"] == 285)["box_display"] == at_070

    # drag and drop: a file dropped on the drop zone is uploaded like a chosen one
    d.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch('api/image/sample-coffee.png').then(r => r.blob()).then(b => {"
        "  const dt = new DataTransfer(); dt.items.add(new File([b], 'dropped.png', {type: 'image/png'}));"
        "  document.getElementById('drop-zone').dispatchEvent("
        "    new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true})); done(); });"
    )
    wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-state") == "ready")
    assert d.find_element(By.ID, "photo-caption").text == "dropped.png · 600×400"

    # nothing was fetched from anywhere but this server
    urls = d.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert urls and all(u.startswith(server) for u in urls), urls

"""The web app's volume and clip viewer in headless Chromium (as tests/serve/test_serve_browser.py): a NIfTI scan
uploaded, shown at its peak slice, the slider and the axis choice change the slice, the slice keeps its
physical aspect; a video gets a frame slider with timestamps. The screenshot lands in the test's tmp
folder (and in $CAMLENS_TEST_OUTPUT when set)."""

from __future__ import annotations

import io
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.serve.test_serve_browser import _free_port, browser  # noqa: F401 - the Chromium fixture
from tests.serve.test_volume import tiny_3d

nib = pytest.importorskip("nibabel")

pytestmark = pytest.mark.slow


@pytest.fixture
def volume_server():
    """The app with two tiny 3-D models (one channel for scans, three for clips) on a free port."""
    import uvicorn

    from camlens.cli.serve import LOOPBACK_NAMES
    from camlens.serve.app import create_app
    from camlens.serve.service import ModelPool, Service

    app = create_app(Service(ModelPool({"tiny3d": tiny_3d(1), "tinyclip": tiny_3d(3)})), allowed_hosts=LOOPBACK_NAMES)
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


def _scan(tmp_path: Path) -> Path:
    z, y, x = np.meshgrid(np.arange(12), np.arange(10), np.arange(6), indexing="ij")  # (i, j, k)
    data = ((z - 6) ** 2 / 30 + (y - 5) ** 2 / 20 + (x - 3) ** 2 / 8 < 1).astype(np.float32)
    data += np.random.default_rng(0).uniform(0, 0.3, data.shape).astype(np.float32)
    path = tmp_path / "head.nii.gz"
    nib.Nifti1Image(data, np.diag([0.9, 1.2, 2.5, 1.0])).to_filename(str(path))
    return path


def _keep(name: str, png: bytes, tmp_path: Path) -> None:
    (tmp_path / name).write_bytes(png)
    if os.environ.get("CAMLENS_TEST_OUTPUT"):
        Path(os.environ["CAMLENS_TEST_OUTPUT"], name).write_bytes(png)


def test_volume_and_clip_sliders_in_chromium(volume_server, browser, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    d = browser
    wait = WebDriverWait(d, 120)
    d.get(volume_server)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
    d.find_element(By.ID, "file-input").send_keys(str(_scan(tmp_path)))
    wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-state") in ("done", "error"))
    assert d.find_element(By.ID, "status").get_attribute("data-state") == "done", d.find_element(By.ID, "message").text
    img = d.find_element(By.ID, "volume-slice")
    loaded = "return arguments[0].complete && arguments[0].naturalWidth > 0"
    wait.until(lambda d: d.execute_script(loaded, img))
    assert d.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", img) == [12, 10]
    assert d.find_element(By.ID, "volume-where").text.endswith("· peak")  # it starts at the map's peak
    viewer = d.find_element(By.ID, "volume-viewer")
    d.execute_script("arguments[0].scrollIntoView({block: 'center'})", viewer)
    _keep("volume_viewer.png", viewer.screenshot_as_png, tmp_path)

    def slide_to(i: int) -> np.ndarray:
        d.execute_script(
            "const s = arguments[0]; s.value = arguments[1]; s.dispatchEvent(new Event('input'))",
            d.find_element(By.ID, "volume-slider"),
            i,
        )
        wait.until(lambda d: f"/{i}.png" in img.get_attribute("src") and d.execute_script(loaded, img))
        with Image.open(io.BytesIO(img.screenshot_as_png)) as im:
            return np.asarray(im.convert("RGB")).astype(np.float32)

    first, last = slide_to(0), slide_to(5)
    assert np.abs(first - last).mean() > 1.0  # another slice
    assert d.find_element(By.ID, "volume-where").text.startswith("axial 5 / 5")
    Select(d.find_element(By.ID, "volume-axis")).select_by_value("coronal")
    assert d.find_element(By.ID, "volume-slider").get_attribute("max") == "9"
    wait.until(lambda d: "/coronal/" in img.get_attribute("src") and d.execute_script(loaded, img))
    assert d.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", img) == [12, 6]
    box = d.execute_script("const r = arguments[0].getBoundingClientRect(); return [r.width, r.height]", img)
    assert box[1] / box[0] == pytest.approx(6 * 2.5 / (12 * 0.9), rel=0.03)  # mm, not voxels
    _keep("volume_viewer_coronal.png", viewer.screenshot_as_png, tmp_path)

    # a clip: the three-channel model, a frame slider with the frames' times
    pytest.importorskip("av")
    from tests.base.test_video import FPS, N_FRAMES, write_video

    Select(d.find_element(By.ID, "model")).select_by_value("tinyclip")
    video = tmp_path / "moving.mkv"
    write_video(video)
    d.find_element(By.ID, "file-input").send_keys(str(video))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#volume-viewer[data-kind=clip]"))
    img = d.find_element(By.ID, "volume-slice")
    wait.until(lambda d: d.execute_script(loaded, img))
    assert d.find_element(By.ID, "volume-slider").get_attribute("max") == str(N_FRAMES - 1)
    slide_to(3)
    assert f"frame 3 / {N_FRAMES - 1} · {3 / FPS:.2f} s" in d.find_element(By.ID, "volume-where").text
    _keep("clip_viewer.png", d.find_element(By.ID, "volume-viewer").screenshot_as_png, tmp_path)

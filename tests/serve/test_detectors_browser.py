"""The web app with a detector in headless Chromium (the pattern of ``test_serve_browser.py``): the
detector is chosen among the served models, Explain lists its detections (drawn over the photo), a
click on one explains it; the panel's map is the one ``/api/explain_detection`` answers."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from PIL import Image

from camlens.models.detectors import as_detector
from tests.conftest import TinyCNN
from tests.models.test_detr import build
from tests.serve.test_serve_browser import _free_port
from tests.serve.test_serve_browser import browser as _chromium  # noqa: F401  (its Chromium fixture)

pytestmark = pytest.mark.slow  # a browser and a server: ~15 s


@pytest.fixture
def detector_server():
    import uvicorn

    from camlens.cli.serve import LOOPBACK_NAMES
    from camlens.serve.app import create_app
    from camlens.serve.service import ModelPool, Service

    net, _ = build("detr")
    svc = Service(ModelPool({"classifier": TinyCNN().eval(), "detr": as_detector(net, threshold=0.0)}))
    app, port = create_app(svc, allowed_hosts=LOOPBACK_NAMES), _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    for _ in range(300):
        if srv.started:
            break
        time.sleep(0.02)
    assert srv.started
    yield f"http://127.0.0.1:{port}/"
    srv.should_exit = True
    t.join(10)


def test_choose_a_detector_list_and_explain_a_detection(detector_server, request, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    d = request.getfixturevalue("_chromium")  # test_serve_browser.py's headless Chromium
    wait = WebDriverWait(d, 120)
    d.get(detector_server)
    wait.until(lambda d: d.find_elements(By.ID, "method-gradcam"))
    Select(d.find_element(By.ID, "model")).select_by_value("detr")
    d.execute_script("document.getElementById('model').dispatchEvent(new Event('change'))")
    wait.until(lambda d: "detector" in (d.find_element(By.ID, "method-note").get_attribute("title") or ""))
    offered = {
        lb.get_attribute("data-method")
        for lb in d.find_elements(By.CSS_SELECTOR, "#methods label[data-method]")
        if lb.is_displayed()
    }
    assert "gradcam" in offered and "cam" not in offered  # only the methods that apply to detectors
    photo = tmp_path / "p.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (72, 120, 3), dtype=np.uint8)).save(photo)
    d.find_element(By.ID, "file-input").send_keys(str(photo))
    wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-state") == "ready")
    for box in d.find_elements(By.CSS_SELECTOR, "#methods input"):
        if box.is_selected() != (box.get_attribute("value") == "gradcam"):
            box.click()
    d.find_element(By.ID, "explain-btn").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#predictions tr.detection"))
    rows = d.find_elements(By.CSS_SELECTOR, "#predictions tr.detection")
    assert len(rows) == len(d.find_elements(By.CSS_SELECTOR, "#det-layer rect.det-box")) >= 2
    index = rows[1].get_attribute("data-index")
    rows[1].click()
    panel_sel = f".panel[data-method=gradcam][data-class='{index}']"
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, panel_sel))
    heat = d.find_element(By.CSS_SELECTOR, f"{panel_sel} img.heat")
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", heat))
    assert d.find_element(By.ID, "status").get_attribute("data-state") == "done"
    assert len(d.find_elements(By.CSS_SELECTOR, "#predictions tr.detection")) == len(rows)  # the list stays
    d.save_screenshot(str(tmp_path / "detector_page.png"))

"""What a researcher sees in the MLflow UI: the run page's image panel, stepped by epoch.

Needs headless Chromium (`apt-get install chromium`; `.ci/run` installs it) and skips without it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from robustlogits.config import apply_overrides, preset
from robustlogits.jobs.tracked_training import HISTOGRAM_IMAGE_KEY
from robustlogits.jobs.train import run_training
from tests.browser import CHROMIUM, Browser, free_port

SCREENSHOT = os.environ.get("ROBUSTLOGITS_SCREENSHOT")  # keep the screenshot here when set


@pytest.fixture
def mlflow_server(isolated_store):
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            isolated_store.as_uri(),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except Exception:  # noqa: BLE001 - still starting
                if time.time() > deadline or server.poll() is not None:
                    pytest.fail("mlflow server did not start")
                time.sleep(1)
        yield url
    finally:
        server.terminate()
        server.wait(20)


SEARCH = """(() => { const i = document.querySelector('input[placeholder="Search metric charts"]');
  Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set.call(i, '%s');
  i.dispatchEvent(new Event('input', {bubbles: true})); return i.value; })()"""
LOADED = (
    "[...document.images].filter(i => i.src.includes('get-artifact') && decodeURIComponent(i.src)"
    ".includes('%s+step+%d+') && i.complete && i.naturalWidth > 0).length || null"
)


@pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason=f"headless Chromium not found at {CHROMIUM} (apt-get install chromium)"
)
def test_run_page_shows_the_histogram_image_for_the_chosen_epoch(mlflow_server, tmp_path):
    cfg = preset("test")
    apply_overrides(cfg, ["optim.epochs=3", "run.checkpoint_epochs=3", "monitor.robust_every=0"])
    run_id = run_training(cfg, progress=False)
    experiment = MlflowClient().get_run(run_id).info.experiment_id
    browser = Browser(1400, 1000)
    try:
        browser.call("Page.enable")
        browser.call("Page.navigate", url=f"{mlflow_server}/#/experiments/{experiment}/runs/{run_id}/model-metrics")
        assert browser.wait_for("document.querySelector('input[placeholder=\"Search metric charts\"]') && 1", 90)
        browser.evaluate(SEARCH % HISTOGRAM_IMAGE_KEY)
        assert browser.wait_for("document.querySelector('[role=slider]') && 1", 60), "no image panel with a step slider"
        slider = browser.evaluate(
            "(() => { const s = document.querySelector('[role=slider]'); s.focus();"
            " return [s.getAttribute('aria-valuemin'), s.getAttribute('aria-valuemax')]; })()"
        )
        assert slider == ["1", "3"]  # one image per epoch
        for _ in range(2):  # drag the slider to epoch 2 with the keyboard
            for kind in ("keyDown", "keyUp"):
                browser.call(
                    "Input.dispatchKeyEvent", type=kind, key="ArrowRight", code="ArrowRight", windowsVirtualKeyCode=39
                )
        assert browser.wait_for(LOADED % (HISTOGRAM_IMAGE_KEY, 2), 60), "the epoch's image did not load"
        browser.evaluate(
            "[...document.images].filter(i => i.src.includes('get-artifact'))[0].scrollIntoView({block: 'end'})"
        )
        time.sleep(1)
        shot = Path(SCREENSHOT) if SCREENSHOT else tmp_path / "run_page.png"
        browser.screenshot(shot)
        assert shot.stat().st_size > 20_000
    finally:
        browser.close()

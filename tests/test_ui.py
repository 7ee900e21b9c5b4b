"""What a researcher sees in the MLflow UI: experiments in the model-training mode, the run page's
image panel stepped by epoch, opening on the initial network's histograms.

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
        deadline = time.time() + 300  # a loaded CPU can take minutes to start it
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
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:  # a loaded machine: stop it the hard way
            server.kill()
            server.wait(20)


ML_MODE = "workflowType=machine_learning"  # the UI's model-training mode, as the README's links open it
SEARCH = """(() => { const i = document.querySelector('input[placeholder="Search metric charts"]');
  Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set.call(i, '%s');
  i.dispatchEvent(new Event('input', {bubbles: true})); return i.value; })()"""
# The panel's image for a step: the UI fetched that step's artifact and shows a decoded image. MLflow
# up to 3.17 points the <img> at `get-artifact?path=images/KEY+step+N+...`; 3.18 fetches the same URL
# and shows it as a `blob:` URL, so the step is read from the page's resource timings, which list
# both kinds of load. Returns the shown images' sources (to tell one step's image from another's).
SHOWN = "[...document.images].filter(i => (i.src.includes('get-artifact') || i.src.startsWith('blob:'))"
LOADED = (
    "(() => { const fetched = performance.getEntriesByType('resource').some(e => "
    "decodeURIComponent(e.name).includes('get-artifact') && decodeURIComponent(e.name).includes('%s+step+%d+'));"
    f" const shown = {SHOWN} && i.complete && i.naturalWidth > 0);"
    " return fetched && shown.length ? shown.map(i => i.src).join(' ') : null; })()"
)


def test_experiments_say_they_are_for_model_training():
    """MLflow 3's UI opens an experiment without a kind in its GenAI mode: every experiment a job
    creates carries the kind, and one created elsewhere gets it when a job first touches it."""
    from robustlogits.tracking.store import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, check_store

    client = MlflowClient()
    created = check_store("fresh")
    assert client.get_experiment(created).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    older = client.create_experiment("made-elsewhere")
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(older).tags
    assert check_store("made-elsewhere") == older
    assert client.get_experiment(older).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    chosen = client.create_experiment("owner-chose", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    check_store("owner-chose")
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"  # theirs to choose


@pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason=f"headless Chromium not found at {CHROMIUM} (apt-get install chromium)"
)
def test_experiment_opens_on_training_runs_and_the_slider_on_an_image(mlflow_server, tmp_path):
    cfg = preset("test")
    apply_overrides(cfg, ["optim.epochs=3", "run.checkpoint_epochs=3", "monitor.robust_every=0"])
    run_id = run_training(cfg, progress=False)
    experiment = MlflowClient().get_run(run_id).info.experiment_id
    browser = Browser(1400, 1000)
    try:
        browser.call("Page.enable")
        # MLflow 3.17 picks GenAI or model-training mode by a sidebar switch the browser remembers (default
        # GenAI), not by the experiment's kind: the links we document carry the mode, and the experiment
        # opens on its training runs, listing this run, with none of the GenAI pages.
        browser.call("Page.navigate", url=f"{mlflow_server}/#/experiments/{experiment}?{ML_MODE}")
        run_name = MlflowClient().get_run(run_id).info.run_name
        listed = browser.wait_for(f"document.body.innerText.includes({run_name!r}) && location.hash", 240)
        assert listed and f"/experiments/{experiment}/runs?" in listed and ML_MODE in listed, listed
        text = browser.evaluate("document.body.innerText")
        assert "Model training" in text and "Evaluation runs" not in text and "Prompts" not in text, text[:600]

        browser.call(
            "Page.navigate", url=f"{mlflow_server}/#/experiments/{experiment}/runs/{run_id}/model-metrics?{ML_MODE}"
        )
        assert browser.wait_for("document.querySelector('input[placeholder=\"Search metric charts\"]') && 1", 90)
        browser.evaluate(SEARCH % HISTOGRAM_IMAGE_KEY)
        assert browser.wait_for("document.querySelector('[role=slider]') && 1", 60), "no image panel with a step slider"
        slider = browser.evaluate(
            "(() => { const s = document.querySelector('[role=slider]'); s.focus();"
            " return [s.getAttribute('aria-valuemin'), s.getAttribute('aria-valuemax'), s.getAttribute('aria-valuenow')]; })()"
        )
        assert slider == ["0", "3", "0"]  # one image per epoch, epoch 0 the initial network; it opens on one
        first = browser.wait_for(LOADED % (HISTOGRAM_IMAGE_KEY, 0), 60)
        assert first, "the panel opened without an image"
        assert not browser.evaluate("document.body.innerText.includes('No image logged at this step')")
        for _ in range(2):  # drag the slider to epoch 2 with the keyboard
            for kind in ("keyDown", "keyUp"):
                browser.call(
                    "Input.dispatchKeyEvent", type=kind, key="ArrowRight", code="ArrowRight", windowsVirtualKeyCode=39
                )
        assert browser.wait_for(
            f"(() => {{ const now = {LOADED % (HISTOGRAM_IMAGE_KEY, 2)}; return now && now !== {first!r} ? now : null; }})()",
            60,
        ), "the epoch's image did not load"
        shown = browser.evaluate(
            f"(() => {{ const i = {SHOWN})[0];"
            " i.scrollIntoView({block: 'end'}); return [i.naturalWidth, i.naturalHeight]; })()"
        )
        assert shown == [256, 256]  # MLflow's thumbnail of a square image fills the panel's square box
        time.sleep(1)
        shot = Path(SCREENSHOT) if SCREENSHOT else tmp_path / "run_page.png"
        browser.screenshot(shot)
        assert shot.stat().st_size > 20_000
    finally:
        browser.close()

"""The web page at ``GET /`` in a real browser: Debian's Chromium driven by Playwright.

It loads the page from the session's served app, checks the form built from ``/v1/info``,
uploads a real photo, runs with 2 steps over the streaming endpoint, and checks the result image
(decoded and compared with the photo), the face row, the timings, the downloads, a range
error caught before sending and a 422 from the service shown next to the field it names.
Chromium missing is a failure, not a skip: ``make test`` / ``.ci/run`` install it.
Set FACEDETAILER_SCREENSHOT=path.png to save a screenshot of the finished page.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deployments.testing import assets

pytestmark = [pytest.mark.ray, pytest.mark.browser, pytest.mark.timeout(600)]

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    # without these Chromium's own connections (updates, sync, field trials) are refused on a
    # closed network and can stall start-up
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
RESULT_TIMEOUT_MS = 240_000
WORKFLOWS = Path(__file__).resolve().parents[1] / "core" / "workflows"


def chromium_executable() -> str:
    path = os.environ.get("FACEDETAILER_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        pytest.fail(
            "Chromium is not installed: the web page test needs Debian's chromium "
            "(`apt-get install -y chromium`; `make test` and .ci/run install it)",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="module")
def browser_page(serve_instance):
    from playwright.sync_api import sync_playwright  # a dev dependency: missing is an error, not a skip

    executable = chromium_executable()
    with sync_playwright() as playwright, tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        context = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=executable,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 900},
        )
        try:
            page = context.new_page()
            page.set_default_timeout(30_000)
            yield page
        finally:
            context.close()


def data_url_image(url: str) -> np.ndarray:
    assert url.startswith("data:image/png;base64,"), url[:40]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))


def test_page_runs_facedetailer_in_a_real_browser(browser_page, serve_instance, tmp_path):
    page = browser_page
    script_errors: list[str] = []  # exceptions in the page's code, and any request that failed unexpectedly
    page.on("pageerror", lambda error: script_errors.append(str(error)))
    page.on(
        "response",
        lambda response: script_errors.append(f"{response.status} {response.url}")
        if response.status >= 400 and response.status != 422
        else None,
    )

    page.goto(serve_instance["url"] + "/")
    page.wait_for_selector("#field-steps")
    # the form: generated from /v1/info, grouped as the node groups its inputs, defaults filled
    legends = page.locator("#params-form legend").all_inner_texts()
    assert legends[:3] == ["Detailing", "BBox detector", "SAM"], legends
    assert page.input_value("#field-steps") == "20"
    assert page.input_value("#field-guide_size") == "384"
    assert page.input_value("#field-sampler_name") == "euler"
    assert page.locator("#field-sampler_name option").count() >= 2
    assert page.is_checked("#field-force_inpaint")
    # the model inputs are choices among the service's configured names; the hooks are JSON
    detectors = page.locator("#field-bbox_detector option").all_inner_texts()
    assert detectors == ["(the service's default)", "default"], detectors
    assert page.input_value("#field-detailer_hooks") == "[]"

    photo = assets.astronaut()  # one real face
    photo_path = tmp_path / "astronaut.png"
    Image.fromarray(photo).save(photo_path)
    page.set_input_files("#image-input", str(photo_path))

    # an out-of-range value is refused next to its field, before anything is sent
    page.fill("#field-denoise", "2")
    page.click("#run")
    assert "denoise" in page.inner_text("#error-denoise") and "1" in page.inner_text("#error-denoise")
    assert page.is_hidden("#progress")
    page.fill("#field-denoise", "0.5")
    assert page.inner_text("#error-denoise") == ""

    page.fill("#field-steps", "2")
    page.fill("#field-guide_size", "128")
    page.fill("#field-max_size", "256")
    page.click("#run")
    page.wait_for_selector("#results:not([hidden])", timeout=RESULT_TIMEOUT_MS)

    rows = page.locator("#faces tbody tr.face-row")
    assert rows.count() == 1
    assert "refined" in rows.first.inner_text()
    assert page.locator("#progress-log li.face-event").count() == 1, "the face arrived as a streamed event"
    after = data_url_image(page.get_attribute("#after-image", "src"))
    assert after.shape == photo.shape
    changed = np.any(after != photo, axis=2)
    assert changed.any(), "the face was redrawn"
    # the downloadable result.json holds the face's crop region: nothing outside it changed
    metadata = page.evaluate(
        "async () => (await fetch(document.querySelector('#downloads a[download$=\"result.json\"]').href)).json()"
    )
    x1, y1, x2, y2 = metadata["segments"][0][0]["crop_region"]
    outside = np.ones(changed.shape, bool)
    outside[y1:y2, x1:x2] = False
    assert changed[~outside].any() and not changed[outside].any()
    assert metadata["detailer_pipe"]["params"]["steps"] == 2
    stages = page.locator("#timings tbody tr").evaluate_all("rows => rows.map(row => row.dataset.stage)")
    assert {"decode", "detect", "inpaint", "blend", "encode", "total"} <= set(stages), stages
    downloads = page.locator("#downloads a").evaluate_all("links => links.map(a => a.download)")
    assert {"astronaut.image.png", "astronaut.mask.png", "astronaut.cropped_refined-0.png",
            "astronaut.cropped_enhanced_alpha-0.png", "astronaut.result.json"} <= set(downloads), downloads
    assert page.is_hidden("#mask-overlay")
    page.check("#mask-toggle")
    assert page.is_visible("#mask-overlay")
    page.wait_for_function("document.querySelector('#mask-overlay').src.startsWith('data:image/png')")
    if os.environ.get("FACEDETAILER_SCREENSHOT"):
        page.locator("#compare-slider").fill("45")
        page.set_viewport_size({"width": 1280, "height": 1360})  # tall enough for the timings and downloads
        page.screenshot(path=os.environ["FACEDETAILER_SCREENSHOT"], full_page=False)
        page.set_viewport_size({"width": 1280, "height": 900})

    # a ComfyUI workflow file fills the form (seed beyond 2^53 kept exact)
    page.set_input_files("#workflow-input", str(WORKFLOWS / "facedetailer_ui.json"))
    page.wait_for_function("document.querySelector('#workflow-status').textContent.includes('node 8')")
    assert page.input_value("#field-seed") == "123456789012345678"
    assert (page.input_value("#field-sampler_name"), page.input_value("#field-cfg")) == ("dpmpp_2m", "6.5")
    assert page.input_value("#field-positive") == "a detailed face, sharp eyes" and page.is_checked("#field-use_sam")

    # a 4xx from the service lands next to the field it names
    page.check("#field-use_segm")  # this app has no segm detector: 422 naming use_segm
    page.click("#run")
    page.wait_for_function("document.querySelector('#error-use_segm').textContent.length > 0")
    assert "segm" in page.inner_text("#error-use_segm")
    # …and a work limit's 422 next to the inputs that lower it (its details list them as fields)
    page.uncheck("#field-use_segm")
    page.fill("#field-steps", "10000")
    page.click("#run")
    page.wait_for_function("document.querySelector('#error-steps').textContent.length > 0")
    assert "limits.max_steps" in page.inner_text("#error-steps")
    assert not script_errors, script_errors

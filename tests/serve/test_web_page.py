"""The web page at ``GET /`` in a real browser: Debian's Chromium driven by Playwright.

Against the session's served app (tiny inpainter, real face detector): the form built from
``/v1/info`` with the service's limits applied, structured hook and ControlNet editors, switches;
a run from a scrolled form with live step previews arriving during the run, the results brought
into view, every output checked (image decoded and compared with the photo, faces, nested
timings, only the downloads that exist), 1:1 zoom; Cancel stopping the work on the service
(``crops_cancelled`` moves); errors next to their fields, worded once; no horizontal scroll at
390×844 before or after a run; the keyboard path; an EXIF-rotated photo upright on both sides.
Chromium missing is a failure, not a skip: ``make test`` / ``.ci/run`` install it.

``FACEDETAILER_SCREENSHOTS=docs/images`` saves the README's screenshots there: desktop 1280×900
and phone 390×844, before, during (live previews) and after a run on zidane.jpg
(``web-page.png`` is the desktop one after, the others ``web-{desktop,phone}-{before,running}.jpg``
and ``web-phone-after.jpg``).
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, ImageOps

from deployments.testing import assets

pytestmark = [pytest.mark.ray, pytest.mark.browser, pytest.mark.timeout(900)]

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
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
SCREENSHOTS = os.environ.get("FACEDETAILER_SCREENSHOTS")


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
def browser(serve_instance):
    from playwright.sync_api import sync_playwright  # a dev dependency: missing is an error, not a skip

    executable = chromium_executable()
    with sync_playwright() as playwright, tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=executable, headless=True, args=CHROMIUM_FLAGS, viewport=DESKTOP
        )
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser, serve_instance):
    """A fresh tab on the page; any script error or unexpected failed request fails the test."""
    page = browser.new_page()
    page.set_default_timeout(30_000)
    page.set_viewport_size(DESKTOP)
    problems: list[str] = []
    page.allowed_statuses = {422}  # a test that expects other refusals adds them
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on(
        "response",
        lambda response: problems.append(f"{response.status} {response.url}")
        if response.status >= 400 and response.status not in page.allowed_statuses
        else None,
    )
    page.goto(serve_instance["url"] + "/")
    page.wait_for_selector("#field-steps")
    yield page
    page.close()
    assert not problems, problems


@pytest.fixture(scope="module")
def service(serve_instance):
    with httpx.Client(base_url=serve_instance["url"], timeout=60, trust_env=False) as http:
        yield http


def data_url_image(url: str) -> np.ndarray:
    assert url.startswith("data:image/png;base64,"), url[:40]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))


def save(photo: np.ndarray, path: Path) -> Path:
    Image.fromarray(photo).save(path)
    return path


def small_run(page, steps: int = 3) -> None:
    page.fill("#field-steps", str(steps))
    page.fill("#field-guide_size", "128")
    page.fill("#field-max_size", "256")


def in_viewport(page, selector: str) -> bool:
    return page.evaluate(
        """selector => { const box = document.querySelector(selector).getBoundingClientRect();
           return box.bottom > 0 && box.top < innerHeight && box.height > 0; }""",
        selector,
    )


def document_width(page) -> int:
    return page.evaluate("Math.max(document.documentElement.scrollWidth, document.body.scrollWidth)")


def test_the_form_shows_the_services_limits_and_structured_editors(page, service):
    info = service.get("/v1/info").json()
    max_steps = info["limits"]["max_steps"]
    assert max_steps < 10000
    legends = page.locator("#params-form legend").all_inner_texts()
    assert legends[:2] == ["Detailing", "BBox detector"], legends
    assert page.get_attribute("#field-steps", "max") == str(max_steps), "the steps range is the service's"
    hint = page.inner_text("#hint-steps")
    assert f"1 … {max_steps}" in hint and "limits.max_steps" in hint and "10000" in hint
    assert str(info["limits"]["max_sample_pixels"]) in page.inner_text("#hint-max_size")
    # friendly labels with the node's name beside them; descriptions on demand
    label = page.locator("label[for=field-cfg]")
    assert "CFG scale" in label.inner_text() and label.locator("code").inner_text() == "cfg"
    assert page.is_hidden("#help-cfg")
    page.click("[aria-controls=help-cfg]")
    assert page.is_visible("#help-cfg") and "guidance" in page.inner_text("#help-cfg")
    # every boolean is a switch; the rarely changed groups are folded
    booleans = [spec["name"] for spec in info["parameters"] if spec["type"] == "BOOLEAN"]
    assert all(page.get_attribute(f"#field-{name}", "role") == "switch" for name in booleans)
    assert page.is_hidden("#field-sam_threshold")
    page.click("#advanced-fold > summary")
    assert page.is_visible("#field-sam_threshold")
    assert page.locator("#field-sam_mask_hint_use_negative option").all_inner_texts()[0] == "off"
    # detailer hooks: typed cards with fields, not JSON text
    page.select_option("#field-detailer_hooks", "denoise_scheduler")
    page.click(".hook-add button")
    assert page.input_value("[id='field-detailer_hooks.0.target_denoise']") == "0.3"
    page.fill("[id='field-detailer_hooks.0.target_denoise']", "2")
    page.click("#run")
    assert "between 0 and 1" in page.inner_text("[id='error-detailer_hooks.0.target_denoise']")
    page.click(".hook-card button[aria-label^='Remove']")
    assert page.locator(".hook-card").count() == 0
    # ControlNet: a switch and fields, the names the service configures
    assert page.is_hidden(".cn-fields")
    page.check("#field-controlnet")
    options = page.locator("[id='field-controlnet.name'] option").all_inner_texts()
    assert options == list(info["controlnets"]), options
    page.uncheck("#field-controlnet")
    # presets: fast preview sets fewer steps; the node's defaults put them back
    page.select_option("#preset", "fast")
    page.click("#apply-preset")
    assert page.input_value("#field-steps") == "8" and "Steps 8" in page.inner_text("#preset-note")
    page.select_option("#preset", "defaults")
    page.click("#apply-preset")
    assert page.input_value("#field-steps") == "20"


def test_a_run_streams_previews_and_brings_every_result_into_view(page, service, tmp_path):
    photo = assets.astronaut()  # one real face
    page.set_input_files("#image-input", str(save(photo, tmp_path / "astronaut.png")))
    # a value out of the service's range is refused next to its field, before anything is sent
    page.fill("#field-denoise", "2")
    page.click("#run")
    assert "between 0.0001 and 1" in page.inner_text("#error-denoise")
    assert not page.inner_text("#error-denoise").startswith("denoise"), "worded once"
    assert page.is_hidden("#progress")
    page.fill("#field-denoise", "0.5")
    assert page.inner_text("#error-denoise") == ""

    small_run(page, steps=12)
    page.select_option("#preview-every", "1")
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")  # Run from the bottom of the form
    page.click("#run")
    # a preview over the face, a moving bar and the step while the result is not there yet
    page.wait_for_function(
        """() => document.querySelector('.face-preview[src^="data:image/jpeg"]')
                 && Number(document.querySelector('.face-progress .face-bar').getAttribute('aria-valuenow')) > 0
                 && document.querySelector('.face-status').textContent.startsWith('step ')
                 && document.querySelector('#results').hidden""",
        timeout=RESULT_TIMEOUT_MS,
    )
    page.wait_for_selector("#results:not([hidden])", timeout=RESULT_TIMEOUT_MS)
    assert in_viewport(page, "#viewer"), "the result is where the eye is"
    assert page.locator(".face-preview").count() == 0, "previews give way to the result"

    rows = page.locator("#faces tbody tr.face-row")
    assert rows.count() == 1 and "refined" in rows.first.inner_text()
    after = data_url_image(page.get_attribute("#after-image", "src"))
    assert after.shape == photo.shape
    changed = np.any(after != photo, axis=2)
    metadata = page.evaluate(
        "async () => (await fetch(document.querySelector('#downloads a[download$=\"result.json\"]').href)).json()"
    )
    x1, y1, x2, y2 = metadata["segments"][0][0]["crop_region"]
    outside = np.ones(changed.shape, bool)
    outside[y1:y2, x1:x2] = False
    assert changed[~outside].any() and not changed[outside].any()
    assert metadata["detailer_pipe"]["params"]["steps"] == 12
    # timings nested as they contain each other
    nested = page.evaluate(
        """() => ['pipeline', 'inpaint', 'inpaint_engine', 'inpaint_queue_wait'].map(stage =>
             document.querySelector(`[data-stage="${stage}"]`).parentElement.closest('[data-stage]')?.dataset.stage)"""
    )
    assert nested == ["total", "pipeline", "inpaint", "inpaint_engine"], nested
    downloads = page.locator("#downloads a").evaluate_all("links => links.map(a => a.download)")
    assert {"astronaut.image.png", "astronaut.mask.png", "astronaut.cropped_refined-0.png",
            "astronaut.cropped_enhanced_alpha-0.png", "astronaut.result.json"} <= set(downloads), downloads
    assert not [name for name in downloads if "cnet_image" in name], "no ControlNet ran"
    # 1:1: the image at its own pixel size, in a panel that pans
    page.click("#faces tbody tr.face-row button")
    page.wait_for_function("document.querySelector('#before-image').clientWidth === 512")
    assert page.get_attribute("#zoom-toggle", "aria-pressed") == "true"
    page.click("#zoom-toggle")
    assert page.is_hidden("#mask-overlay")
    page.check("#mask-toggle")
    page.wait_for_function("document.querySelector('#mask-overlay').src.startsWith('data:image/png')")

    # a ComfyUI workflow file fills the form (seed beyond 2^53 kept exact)
    page.click("#workflow-box > summary")
    page.set_input_files("#workflow-input", str(WORKFLOWS / "facedetailer_ui.json"))
    page.wait_for_function("document.querySelector('#workflow-status').textContent.includes('node 8')")
    assert page.input_value("#field-seed") == "123456789012345678"
    assert (page.input_value("#field-sampler_name"), page.input_value("#field-cfg")) == ("dpmpp_2m", "6.5")
    assert page.input_value("#field-positive") == "a detailed face, sharp eyes" and page.is_checked("#field-use_sam")

    # a 4xx from the service lands next to the field it names, said once
    page.check("#field-use_segm")  # this app has no segm detector: 422 naming use_segm
    page.click("#run")
    page.wait_for_function("document.querySelector('#error-use_segm').textContent.length > 0")
    message = page.inner_text("#error-use_segm")
    assert "segm" in message and not message.startswith("use_segm"), message
    # a work limit known after detection: its message once below Run, the inputs that lower it marked
    page.uncheck("#field-use_segm")
    page.fill("#field-guide_size", "16384")
    page.fill("#field-max_size", "16384")
    page.click("#run")
    page.wait_for_function("document.querySelector('#run-error').textContent.includes('limits.max_sample_pixels')")
    assert "lowering this helps" in page.inner_text("#error-guide_size")
    assert page.inner_text("#run-error").count("limits.max_sample_pixels") == 1


def engine_stats(service: httpx.Client) -> dict:
    return service.get("/v1/stats").json()["inpainter"]


def test_cancel_ends_the_stream_and_the_work(page, service, tmp_path):
    photo = np.asarray(Image.fromarray(assets.astronaut()).resize((256, 256), Image.Resampling.LANCZOS))
    page.set_input_files("#image-input", str(save(photo, tmp_path / "face.png")))
    page.fill("#field-steps", page.get_attribute("#field-steps", "max"))  # the longest run the service takes
    page.fill("#field-guide_size", "384")
    page.fill("#field-max_size", "512")
    before = engine_stats(service)
    page.click("#run")
    page.wait_for_function(
        "Number(document.querySelector('.face-progress .face-bar')?.getAttribute('aria-valuenow')) > 0",
        timeout=RESULT_TIMEOUT_MS,
    )
    assert page.is_visible("#cancel") and in_viewport(page, "#cancel")
    page.click("#cancel")
    page.wait_for_function("document.querySelector('#progress-text').textContent.startsWith('cancelled')")
    assert page.is_enabled("#run") and page.is_hidden("#results")
    assert page.locator(".face-preview").count() == 0, "no half-run preview left over the photo"
    deadline = time.monotonic() + 60
    stats = engine_stats(service)
    moved = lambda stats: stats["crops_cancelled"] != before["crops_cancelled"] and not stats["active_crops"]  # noqa: E731
    while time.monotonic() < deadline and not moved(stats):
        time.sleep(0.25)
        stats = engine_stats(service)
    assert stats["crops_cancelled"] == before["crops_cancelled"] + 1, "the crop left the inpainter's engine"
    assert stats["active_crops"] == 0 and stats["crops_completed"] == before["crops_completed"]


@pytest.mark.parametrize("viewport", [PHONE, DESKTOP], ids=["phone", "desktop"])
def test_no_horizontal_scroll_and_results_in_view_on_phone_and_desktop(page, tmp_path, viewport):
    """zidane.jpg (two faces) at 390×844 and 1280×900; the README's screenshots when asked."""
    page.set_viewport_size(viewport)
    name = "phone" if viewport is PHONE else "desktop"
    page.reload()
    page.wait_for_selector("#field-steps")
    assert document_width(page) <= viewport["width"], "no horizontal scroll before a run"
    if SCREENSHOTS:
        page.screenshot(path=str(Path(SCREENSHOTS) / f"web-{name}-before.jpg"), quality=85)
    photo = tmp_path / "zidane.jpg"
    Image.fromarray(assets.zidane()).save(photo, quality=92)
    page.set_input_files("#image-input", str(photo))
    small_run(page, steps=8)
    page.fill("#field-guide_size", "256")
    page.fill("#field-max_size", "384")
    page.select_option("#preview-every", "1")
    page.click("#advanced-fold > summary")  # the longest form
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
    page.click("#run")
    page.wait_for_function(  # Run brings the progress into view
        "() => { const box = document.querySelector('#progress').getBoundingClientRect();"
        " return box.height > 0 && box.top >= 0 && box.top < innerHeight; }"
    )
    if SCREENSHOTS:  # mid-run: a step preview over a face (the desktop's output panel stays in view)
        page.wait_for_function(
            "document.querySelector('.face-preview')"
            " && Number(document.querySelector('.face-bar').getAttribute('aria-valuenow')) >= 50",
            timeout=RESULT_TIMEOUT_MS,
        )
        if name == "desktop":
            page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(Path(SCREENSHOTS) / f"web-{name}-running.jpg"), quality=85)
    page.wait_for_selector("#results:not([hidden])", timeout=RESULT_TIMEOUT_MS)
    assert page.locator("#faces tbody tr.face-row").count() == 2
    assert in_viewport(page, "#viewer"), "the result is in view after Run from a scrolled form"
    assert document_width(page) <= viewport["width"], "no horizontal scroll after a run"
    if SCREENSHOTS:
        page.locator("#compare-slider").fill("45")
        if name == "desktop":
            page.evaluate("window.scrollTo(0, 0)")
        if name == "desktop":  # the README's picture
            page.screenshot(path=str(Path(SCREENSHOTS) / "web-page.png"))
        else:
            page.screenshot(path=str(Path(SCREENSHOTS) / f"web-{name}-after.jpg"), quality=85)


def test_the_page_works_from_the_keyboard(page, tmp_path):
    # every input of the form has a label a screen reader reads
    unlabelled = page.evaluate(
        """() => [...document.querySelectorAll('main input, main select, main textarea')]
             .filter(el => !el.labels?.length && !el.getAttribute('aria-label') && !el.getAttribute('aria-labelledby'))
             .map(el => el.id || el.outerHTML.slice(0, 60))"""
    )
    assert not unlabelled, unlabelled
    # Tab goes from the image to the form's fields in order and on to Run, each with a visible focus ring
    order: list[str] = []
    while "run" not in order and len(order) < 120:
        page.keyboard.press("Tab")
        focused = page.evaluate(
            """() => { const el = document.activeElement; const style = getComputedStyle(el);
               return [el.id, style.outlineStyle !== 'none' && parseFloat(style.outlineWidth) > 0]; }"""
        )
        order.append(focused[0])
        assert focused[1], f"no visible focus on {focused[0] or 'an element without id'} after {order}"
    positions = [order.index(name) for name in ("image-input", "field-guide_size", "field-steps", "run")]
    assert positions == sorted(positions), order
    # run with the keyboard: choose a file, move to Run, press Enter
    photo = np.asarray(Image.fromarray(assets.astronaut()).resize((256, 256), Image.Resampling.LANCZOS))
    page.set_input_files("#image-input", str(save(photo, tmp_path / "face.png")))
    small_run(page, steps=2)
    page.focus("#run")
    page.keyboard.press("Enter")
    page.wait_for_selector("#results:not([hidden])", timeout=RESULT_TIMEOUT_MS)
    assert page.evaluate("document.activeElement.id") == "output-heading", "focus moves to the progress and results"


def exif_rotated_jpeg(path: Path) -> np.ndarray:
    """A photo stored sideways with EXIF orientation 6 (display rotated 90° clockwise); returns it upright."""
    upright = assets.astronaut()
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1)))  # 90° counter-clockwise on disk
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, quality=95, exif=exif.tobytes())
    return np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))


def test_an_exif_rotated_photo_is_upright_before(page, tmp_path):
    path = tmp_path / "rotated.jpg"
    upright = exif_rotated_jpeg(path)
    height, width = upright.shape[:2]
    assert Image.open(path).size == (height, width), "stored sideways"
    page.set_input_files("#image-input", str(path))
    page.wait_for_function("(img => img.complete && img.naturalWidth > 0)(document.querySelector('#before-image'))")
    shown = page.evaluate(
        """() => { const img = document.querySelector('#before-image');
           const canvas = document.createElement('canvas');
           [canvas.width, canvas.height] = [img.naturalWidth, img.naturalHeight];
           canvas.getContext('2d').drawImage(img, 0, 0);
           const aspect = img.clientWidth / img.clientHeight;
           return [img.naturalWidth, img.naturalHeight, aspect, canvas.toDataURL('image/png')]; }"""
    )
    assert shown[:2] == [width, height] and shown[2] == pytest.approx(width / height, rel=0.01)
    pixels = data_url_image(shown[3]).astype(int)
    assert np.abs(pixels - upright).mean() < 3, "the before side shows the photo upright"


def test_an_exif_rotated_photo_is_upright_after(page, tmp_path):
    path = tmp_path / "rotated.jpg"
    upright = exif_rotated_jpeg(path)
    page.set_input_files("#image-input", str(path))
    small_run(page, steps=2)
    page.click("#run")
    page.wait_for_selector("#results:not([hidden])", timeout=RESULT_TIMEOUT_MS)
    after = data_url_image(page.get_attribute("#after-image", "src"))
    assert after.shape == upright.shape, "the after side is upright too"
    metadata = page.evaluate(
        "async () => (await fetch(document.querySelector('#downloads a[download$=\"result.json\"]').href)).json()"
    )
    outside = np.ones(upright.shape[:2], bool)
    for segment in metadata["segments"][0]:
        x1, y1, x2, y2 = segment["crop_region"]
        outside[y1:y2, x1:x2] = False
    assert np.array_equal(after[outside], upright[outside])


def test_a_batch_shows_every_image_with_its_faces(page, tmp_path):
    face = np.asarray(Image.fromarray(assets.astronaut()).resize((256, 256), Image.Resampling.LANCZOS))
    empty = np.full((200, 300, 3), 90, np.uint8)  # no face
    paths = [save(face, tmp_path / "one.png"), save(empty, tmp_path / "two.png")]
    page.set_input_files("#image-input", [str(path) for path in paths])
    assert page.locator("#image-tabs [role=tab]").count() == 2
    small_run(page, steps=2)
    page.click("#run")
    page.wait_for_selector("#results:not([hidden])", timeout=RESULT_TIMEOUT_MS)
    headers = page.locator("#faces thead th").all_inner_texts()
    assert headers[0] == "image", headers
    rows = page.locator("#faces tbody tr").evaluate_all("rows => rows.map(row => row.innerText)")
    assert len(rows) == 2 and "refined" in rows[0] and "no face found" in rows[1], rows
    assert data_url_image(page.get_attribute("#after-image", "src")).shape == face.shape
    page.click("#image-tab-1")
    assert page.get_attribute("#image-tab-1", "aria-selected") == "true"
    assert np.array_equal(data_url_image(page.get_attribute("#after-image", "src")), empty)
    downloads = page.locator("#downloads a").evaluate_all("links => links.map(a => a.download)")
    assert {"one.image-0.png", "two.image-1.png", "one.mask-0.png", "two.mask-1.png"} <= set(downloads), downloads


def test_the_api_key_goes_with_every_call_and_a_refusal_is_explained(page, tmp_path):
    sent: list[str | None] = []
    page.on("request", lambda request: "/v1/" in request.url and sent.append(request.headers.get("authorization")))
    page.allowed_statuses.update({401, 429})  # answered below by page.route, not by the service
    try:
        page.click("#access > summary")
        page.fill("#api-key", "test-key-123")
        page.click("#api-key-form button[type=submit]")
        page.reload()
        page.wait_for_selector("#field-steps")
        assert page.input_value("#api-key") == "test-key-123", "kept in the browser"
        assert sent and sent[-1] == "Bearer test-key-123"
        # a service that refuses the key: the page says so, and opens the key's field
        page.route("**/v1/info", lambda route: route.fulfill(status=401, json={"error": "unknown API key"}))
        page.reload()
        page.wait_for_function("document.querySelector('#service-status').textContent.includes('401')")
        assert "API key" in page.inner_text("#service-status")
        assert page.evaluate("document.querySelector('#access').open")
        page.unroute("**/v1/info")
        # too many requests: the wait the service asks for
        page.route("**/v1/detail/stream", lambda route: route.fulfill(
            status=429, headers={"Retry-After": "7"}, json={"error": "rate limit of this key reached"}))
        page.reload()
        page.wait_for_selector("#field-steps")
        page.set_input_files("#image-input", str(save(assets.astronaut(), tmp_path / "face.png")))
        page.click("#run")
        page.wait_for_function("document.querySelector('#run-error').textContent.includes('429')")
        assert "7 s" in page.inner_text("#run-error")
    finally:
        page.evaluate("localStorage.clear()")

"""FaceDetector: tiny random YOLOs for shapes and types, the packaged face ONNX for real faces.

Every model is loaded from disk through ``resolve_weights``, as production loads hub files and URLs.
Timings are printed (run with ``-s``) for the issue note.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest

from deployments.detector import FaceDetector, unletterbox_masks
from deployments.testing import assets
from deployments.weights import CorruptWeightsError, WeightsNotFoundError
from facedetailer.segs import Detection

pytestmark = pytest.mark.models

TINY_IMGSZ = 160  # random weights find nothing anyway; a small letterbox keeps 300 masks cheap
FACE_THRESHOLD = 0.3
# faceghost v0-1.onnx at imgsz 640, conf 0.3. Checked once by eye on box overlays drawn with PIL.
# Confidences seen: astronaut 0.83; zidane 0.80, 0.59; bus 0.81, 0.78. Next below 0.3: zidane 0.10
# (a second box on Zidane's face), bus 0.15 and 0.13 (faces cut by the image's left/right edges).
EXPECTED_FACES: dict[str, list[tuple[int, int, int, int]]] = {
    "astronaut": [(181, 56, 269, 177)],
    "zidane": [(915, 98, 1055, 276), (543, 253, 663, 434)],
    "bus": [(116, 417, 155, 468), (271, 424, 307, 470)],
}


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def timed_load(**kwargs: object) -> FaceDetector:
    started = time.perf_counter()
    detector = FaceDetector(**kwargs)  # type: ignore[arg-type]
    print(f"\n[timing] load {Path(str(kwargs['model'])).name}: {time.perf_counter() - started:.2f}s")
    return detector


def print_call_time(name: str, detector: FaceDetector, image: np.ndarray, threshold: float) -> None:
    detector.detect(image, threshold)  # warm
    runs = 3
    started = time.perf_counter()
    for _ in range(runs):
        detector.detect(image, threshold)
    per_call = (time.perf_counter() - started) / runs
    print(f"\n[timing] {name} detect {image.shape[1]}x{image.shape[0]}: {per_call * 1000:.0f} ms/call")


@pytest.fixture(scope="module")
def tiny_bbox(tiny_yolo: dict) -> FaceDetector:
    return timed_load(model=tiny_yolo["bbox"], imgsz=TINY_IMGSZ)


@pytest.fixture(scope="module")
def tiny_segm(tiny_yolo: dict) -> FaceDetector:
    return timed_load(model=tiny_yolo["segm"], imgsz=TINY_IMGSZ)


@pytest.fixture(scope="module")
def face_onnx() -> FaceDetector:
    return timed_load(model=str(assets.faceghost_face_onnx()))


@pytest.fixture(scope="module")
def zidane_small() -> np.ndarray:
    """A non-square photo, small enough for many random masks."""
    return np.ascontiguousarray(assets.zidane()[::4, ::4])


def assert_detections_well_formed(detections: list[Detection], height: int, width: int) -> None:
    assert detections, "threshold 0 must let random weights through"
    for detection in detections:
        assert isinstance(detection, Detection)
        assert detection.label == "face"
        assert len(detection.bbox) == 4 and all(isinstance(value, float) for value in detection.bbox)
        x1, y1, x2, y2 = detection.bbox
        assert -1 <= x1 <= x2 <= width + 1 and -1 <= y1 <= y2 <= height + 1
        assert isinstance(detection.confidence, float) and 0.0 <= detection.confidence <= 1.0
    confidences = [detection.confidence for detection in detections]
    assert confidences == sorted(confidences, reverse=True)


def test_tiny_bbox_model_returns_boxes_without_masks(tiny_bbox: FaceDetector, zidane_small: np.ndarray):
    height, width = zidane_small.shape[:2]
    detections = tiny_bbox.detect(zidane_small, 0.0)
    assert_detections_well_formed(detections, height, width)
    assert all(detection.mask is None for detection in detections)
    assert not tiny_bbox.is_segmentation and tiny_bbox.task == "detect"
    print_call_time("tiny bbox (imgsz 160)", tiny_bbox, zidane_small, 0.0)


def test_tiny_segm_model_returns_full_image_float_masks(tiny_segm: FaceDetector, zidane_small: np.ndarray):
    height, width = zidane_small.shape[:2]
    detections = tiny_segm.detect(zidane_small, 0.0)
    assert_detections_well_formed(detections, height, width)
    for detection in detections:
        assert detection.mask is not None
        assert detection.mask.shape == (height, width) and detection.mask.dtype == np.float32
        assert 0.0 <= detection.mask.min() and detection.mask.max() <= 1.0
    assert any(detection.mask.max() > 0 for detection in detections)
    assert tiny_segm.is_segmentation and tiny_segm.task == "segment"
    print_call_time("tiny segm (imgsz 160)", tiny_segm, zidane_small, 0.0)


def test_segm_model_can_serve_boxes_only(tiny_segm: FaceDetector, tiny_bbox: FaceDetector, zidane_small):
    boxes_only = tiny_segm.detect(zidane_small, 0.0, with_masks=False)
    with_masks = tiny_segm.detect(zidane_small, 0.0)
    assert [d.bbox for d in boxes_only] == [d.bbox for d in with_masks]
    assert all(detection.mask is None for detection in boxes_only)
    with pytest.raises(ValueError, match="no masks"):
        tiny_bbox.detect(zidane_small, 0.0, with_masks=True)


def test_task_detect_makes_a_segm_model_a_bbox_detector(tiny_yolo: dict, zidane_small: np.ndarray):
    detector = FaceDetector(tiny_yolo["segm"], task="detect", imgsz=TINY_IMGSZ)
    assert detector.model_task == "segment" and not detector.is_segmentation
    assert all(detection.mask is None for detection in detector.detect(zidane_small, 0.0))
    with pytest.raises(ValueError, match="cannot serve task='segment'"):
        FaceDetector(tiny_yolo["bbox"], task="segment", imgsz=TINY_IMGSZ)


def test_float_images_are_converted_like_the_reference(tiny_bbox: FaceDetector, zidane_small: np.ndarray):
    as_float = zidane_small.astype(np.float32) / 255.0
    expected = np.clip(255.0 * as_float, 0, 255).astype(np.uint8)  # truncation, as the reference does
    assert tiny_bbox.detect(as_float, 0.0) == tiny_bbox.detect(expected, 0.0)
    with pytest.raises(ValueError, match="RGB image"):
        tiny_bbox.detect(zidane_small[..., 0], 0.5)
    with pytest.raises(ValueError, match="threshold"):
        tiny_bbox.detect(zidane_small, 1.5)


def test_info_and_health(tiny_segm: FaceDetector, tiny_yolo: dict):
    info = tiny_segm.info()
    assert info["model_path"] == tiny_yolo["segm"]
    assert info["task"] == "segment" and info["class_names"] == {0: "face"}
    assert info["imgsz"] == TINY_IMGSZ and info["device"] == "cpu" and info["half"] is False
    tiny_segm.check_health()


@pytest.mark.parametrize(
    ("letterbox", "image"),
    [((384, 640), (720, 1280)), ((640, 640), (720, 1280)), ((640, 480), (1080, 810)), ((64, 64), (512, 512))],
)
def test_unletterbox_masks_puts_the_content_back_on_the_image(letterbox, image):
    """A mask of the image's bottom-right quarter, drawn in letterbox space, lands on that quarter."""
    (mask_h, mask_w), (height, width) = letterbox, image
    gain = min(mask_h / height, mask_w / width)
    content_h, content_w = round(height * gain), round(width * gain)
    top, left = round((mask_h - content_h) / 2 - 0.1), round((mask_w - content_w) / 2 - 0.1)
    masks = np.zeros((1, mask_h, mask_w), dtype=np.uint8)
    masks[0, top + content_h // 2 : top + content_h, left + content_w // 2 : left + content_w] = 1
    full = unletterbox_masks(masks, height, width)
    assert full.shape == (1, height, width) and full.dtype == np.float32
    quarter = np.zeros((height, width), dtype=bool)
    quarter[height // 2 :, width // 2 :] = True
    binary = full[0] >= 0.5
    assert (binary == quarter).mean() > 0.995
    assert unletterbox_masks(np.zeros((0, mask_h, mask_w)), height, width).shape == (0, height, width)


@pytest.mark.parametrize("photo", sorted(EXPECTED_FACES))
def test_face_onnx_finds_the_faces(face_onnx: FaceDetector, photo: str):
    image = getattr(assets, photo)()
    detections = face_onnx.detect(image, FACE_THRESHOLD)
    expected = EXPECTED_FACES[photo]
    found = [tuple(round(value) for value in detection.bbox) for detection in detections]
    assert len(detections) == len(expected), found
    for box in expected:
        best = max(iou(box, detection.bbox) for detection in detections)
        assert best >= 0.5, (photo, box, found)
    assert all(detection.label == "face" and detection.mask is None for detection in detections)
    print_call_time(f"faceghost onnx {photo}", face_onnx, image, FACE_THRESHOLD)


def test_face_onnx_reads_its_task_from_the_export_metadata(face_onnx: FaceDetector):
    info = face_onnx.info()
    assert info["format"] == "onnx" and info["task"] == "detect" and info["class_names"] == {0: "face"}
    face_onnx.check_health()


def test_rgb_arrays_give_what_ultralytics_gives_for_the_file(face_onnx: FaceDetector):
    """Ultralytics reads a file path with OpenCV (BGR): our RGB array must give the same boxes."""
    path = assets.ultralytics_asset("zidane.jpg")
    reference = face_onnx._yolo.predict(str(path), conf=FACE_THRESHOLD, verbose=False)[0]
    ours = face_onnx.detect(assets.zidane(), FACE_THRESHOLD)
    np.testing.assert_allclose([d.bbox for d in ours], reference.boxes.xyxy.numpy(), atol=0.5)
    np.testing.assert_allclose([d.confidence for d in ours], reference.boxes.conf.numpy(), atol=1e-3)


@pytest.mark.parametrize("name", ["missing.pt", "missing.onnx"])
def test_missing_weights_name_the_path(tmp_path: Path, name: str):
    path = tmp_path / name
    with pytest.raises(WeightsNotFoundError, match=str(path)):
        FaceDetector(str(path))


@pytest.mark.parametrize("name", ["random.pt", "random.onnx"])
def test_corrupt_weights_name_the_path(tmp_path: Path, name: str):
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CorruptWeightsError, match=str(path)):
        FaceDetector(str(path))


def test_a_checkpoint_that_is_not_a_yolo_model_is_corrupt(tmp_path: Path, tiny_sam: dict):
    path = tmp_path / "sam_renamed.pt"
    shutil.copy(tiny_sam["checkpoint"], path)
    with pytest.raises(CorruptWeightsError, match=str(path)):
        FaceDetector(str(path))


def test_unsupported_suffix_is_rejected(tmp_path: Path, tiny_yolo: dict):
    path = tmp_path / "model.safetensors"
    shutil.copy(tiny_yolo["bbox"], path)
    with pytest.raises(CorruptWeightsError, match="unsupported format"):
        FaceDetector(str(path))


def url_cache_entry(cache_dir: Path, url: str) -> Path:
    """Where deployments.weights keeps a downloaded URL (mirrors its cache layout)."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return cache_dir / "url" / digest / Path(urlparse(url).path).name


def test_url_not_in_the_cache_fails_offline_naming_it(tmp_path: Path):
    assert os.environ.get("FACEDETAILER_OFFLINE") == "1"
    url = "https://models.example.invalid/face/face_yolov8n.pt"
    with pytest.raises(WeightsNotFoundError, match=url):
        FaceDetector(url, cache_dir=str(tmp_path))


def test_url_in_the_cache_is_loaded_without_network(tmp_path: Path, tiny_yolo: dict):
    url = "https://models.example.invalid/face/face_yolov8n.pt"
    entry = url_cache_entry(tmp_path, url)
    entry.parent.mkdir(parents=True)
    shutil.copy(tiny_yolo["bbox"], entry)
    detector = FaceDetector(url, imgsz=TINY_IMGSZ, cache_dir=str(tmp_path))
    assert detector.model_path == entry and detector.info()["model"] == url


def test_hub_file_in_the_cache_keeps_its_suffix(tmp_path: Path):
    """Hub cache files are symlinks to suffix-less blobs; the ONNX must still be recognised as ONNX."""
    repo_dir = tmp_path / "hf" / "models--acme--faces"
    commit = "0" * 40
    blob = repo_dir / "blobs" / "f00d"
    blob.parent.mkdir(parents=True)
    shutil.copy(assets.faceghost_face_onnx(), blob)
    snapshot = repo_dir / "snapshots" / commit / "face.onnx"
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(blob)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    detector = FaceDetector("hf://acme/faces/face.onnx", cache_dir=str(tmp_path))
    assert detector.info()["format"] == "onnx"
    assert len(detector.detect(assets.astronaut(), FACE_THRESHOLD)) == 1

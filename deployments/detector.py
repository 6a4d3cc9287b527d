"""Face detector deployment: an ultralytics YOLO model (bbox or segm, ``.pt`` or ``.onnx``).

A plain class so the lead can wrap it with ``serve.deployment(FaceDetector)``: constructor
arguments are JSON-able and methods are synchronous. Behaviour follows reference §3.2–3.3: the
image goes in as an 8-bit RGB PIL image, ultralytics runs at ``conf=threshold`` with its defaults
otherwise (imgsz 640, NMS IoU 0.7, max_det 300), and detections come back in ultralytics order
(descending confidence). Segm masks have the letterbox padding removed and are resized bilinearly
to the image, so their edges are soft values in [0, 1].
"""

from __future__ import annotations

import ast
import os
import threading
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from deployments.runtime_env import configure_ultralytics_offline
from deployments.weights import CorruptWeightsError, WeightsNotFoundError, resolve_weights
from facedetailer.segs import Detection

Task = Literal["detect", "segment"]
SUPPORTED_TASKS: tuple[str, ...] = ("detect", "segment")
SUPPORTED_SUFFIXES: tuple[str, ...] = (".pt", ".onnx")
# Read by ultralytics when it is first imported: no DNS "online" probe, no pip auto-install of
# missing packages (it would try to install ``onnx`` for ONNX models).
_ULTRALYTICS_OFFLINE_DEFAULTS: dict[str, str] = {"YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "0"}
WARMUP_SIZE = 64  # letterboxed to imgsz like any image: one full-size inference


def default_device() -> str:
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def to_uint8_rgb(image: np.ndarray) -> np.ndarray:
    """An RGB uint8 [H, W, 3] array; floats in [0, 1] become ``clip(255·x)`` truncated (reference §3.2)."""
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or 0 in array.shape:
        raise ValueError(f"expected an RGB image of shape [H, W, 3], got {array.shape}")
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        return np.clip(255.0 * array, 0, 255).astype(np.uint8)
    raise ValueError(f"expected a uint8 or float image, got dtype {array.dtype}")


def unletterbox_masks(masks: np.ndarray, height: int, width: int) -> np.ndarray:
    """Map masks at the letterboxed inference size back onto an image of ``height`` × ``width``.

    Cuts away the centred padding that ultralytics' LetterBox added (same rounding as LetterBox),
    then resizes bilinearly (align_corners=False) to the image, giving float32 [n, H, W] in [0, 1].
    """
    count, mask_height, mask_width = masks.shape
    if count == 0:
        return np.zeros((0, height, width), dtype=np.float32)
    gain = min(mask_height / height, mask_width / width)
    content_height = max(round(height * gain), 1)
    content_width = max(round(width * gain), 1)
    top = round((mask_height - content_height) / 2 - 0.1)
    left = round((mask_width - content_width) / 2 - 0.1)
    content = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.float32))
    content = content[:, top : top + content_height, left : left + content_width]
    resized = F.interpolate(content[:, None], size=(height, width), mode="bilinear", align_corners=False)
    return resized[:, 0].clamp_(0.0, 1.0).numpy()


def read_onnx_metadata(path: Path) -> dict[str, str]:
    """The ultralytics export metadata of an ONNX file; raises CorruptWeightsError if ORT cannot read it."""
    import onnxruntime

    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as error:
        raise CorruptWeightsError(f"{path}: not a loadable ONNX model: {error}") from error
    return dict(session.get_modelmeta().custom_metadata_map)


def prepare_ultralytics_offline() -> None:
    """Set the offline defaults ultralytics reads at import time, then turn off its hub sync."""
    for name, value in _ULTRALYTICS_OFFLINE_DEFAULTS.items():
        os.environ.setdefault(name, value)
    configure_ultralytics_offline()


def _import_yolo() -> type:
    prepare_ultralytics_offline()
    from ultralytics import YOLO

    return YOLO


def _fp16_args() -> dict[str, Any]:
    """fp16 inference: ``quantize=16`` where ultralytics has it (it deprecates ``half``), else ``half``."""
    from ultralytics.cfg import DEFAULT_CFG_DICT

    return {"quantize": 16} if "quantize" in DEFAULT_CFG_DICT else {"half": True}


class FaceDetector:
    """A YOLO face detector: ``detect(image, threshold) -> list[Detection]``."""

    def __init__(
        self,
        model: str,
        *,
        task: Task | None = None,
        imgsz: int = 640,
        device: str | None = None,
        cache_dir: str | None = None,
    ) -> None:
        if task is not None and task not in SUPPORTED_TASKS:
            raise ValueError(f"task must be one of {SUPPORTED_TASKS} or None, got {task!r}")
        started = time.perf_counter()
        self.model_reference = model
        # absolute() not resolve(): a hub cache entry is a symlink to a blob without the file suffix.
        self.model_path = resolve_weights(model, Path(cache_dir) if cache_dir else None).absolute()
        if not self.model_path.is_file():
            raise WeightsNotFoundError(f"{self.model_path}: not a file")
        suffix = self.model_path.suffix.lower()
        if suffix not in SUPPORTED_SUFFIXES:
            raise CorruptWeightsError(
                f"{self.model_path}: unsupported format {suffix!r}, expected one of {SUPPORTED_SUFFIXES}"
            )
        self.imgsz = imgsz
        self.device = device or default_device()
        self._lock = threading.Lock()  # an ultralytics predictor is not safe to share between threads
        # fp16 only where it pays and where the model is ours to convert: a .pt model on a GPU.
        self.half = suffix == ".pt" and self.device.startswith("cuda")
        load_task: str | None = None  # a .pt checkpoint carries its task; ultralytics reads it
        if suffix == ".onnx":
            # ultralytics cannot tell an ONNX model's task from the graph; its export metadata can.
            load_task = read_onnx_metadata(self.model_path).get("task") or task or "detect"
        yolo_class = _import_yolo()
        self._precision_args = _fp16_args() if self.half else {}
        try:
            # An absolute path: ultralytics re-downloads a corrupt file only when given a bare asset name.
            self._yolo = yolo_class(str(self.model_path), task=load_task)
            self.model_task: str = str(self._yolo.task)
        except Exception as error:
            raise CorruptWeightsError(
                f"{self.model_path}: cannot be loaded as an ultralytics YOLO model: {error}"
            ) from error
        if self.model_task not in SUPPORTED_TASKS:
            raise CorruptWeightsError(f"{self.model_path}: a {self.model_task!r} model, not a detector")
        # ONNX models are opened on first use, and the predictor (device, fp16) is set up on the first
        # call: run once now so a device or runtime problem fails the load, not the first request.
        self._predict(np.zeros((WARMUP_SIZE, WARMUP_SIZE, 3), dtype=np.uint8), threshold=1.0)
        self.names: dict[int, str] = {int(k): str(v) for k, v in self._names().items()}
        # task="detect" on a segm model serves boxes only, as the reference's UltraBBoxDetector does
        # with a segm/ model; a bbox model cannot serve masks.
        self.task: str = task or self.model_task
        if self.task == "segment" and self.model_task != "segment":
            raise ValueError(f"{self.model_path}: a {self.model_task!r} model cannot serve task='segment'")
        self.load_seconds = time.perf_counter() - started

    def _names(self) -> dict[Any, Any]:
        names = self._yolo.names
        if isinstance(names, str):  # ONNX metadata stores the dict as its repr
            names = ast.literal_eval(names)
        return dict(names)

    def _predict(self, image: np.ndarray, threshold: float) -> Any:
        """One ultralytics ``Results``; RGB goes in as PIL, which ultralytics converts to its BGR itself."""
        import torch

        # ultralytics' device selection sets torch's thread count for the whole process
        # (cpu_count - 1); restore it so SAM and the inpainter in the same process keep theirs.
        threads = torch.get_num_threads()
        try:
            with self._lock:
                results = self._yolo.predict(
                    Image.fromarray(image),
                    conf=threshold,
                    imgsz=self.imgsz,
                    device=self.device,
                    verbose=False,
                    **self._precision_args,
                )
        finally:
            torch.set_num_threads(threads)
        return results[0]

    @property
    def is_segmentation(self) -> bool:
        return self.task == "segment"

    def detect(
        self, image: np.ndarray, threshold: float, *, with_masks: bool | None = None
    ) -> list[Detection]:
        """Detections at ``conf=threshold``, in ultralytics order (descending confidence).

        ``with_masks`` (default: ``is_segmentation``) lets one segm model serve as both the bbox
        and the segm detector, as the reference's ``segm/`` models do.
        """
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        want_masks = self.is_segmentation if with_masks is None else with_masks
        if want_masks and self.model_task != "segment":
            raise ValueError(f"{self.model_path}: a bbox model has no masks")
        rgb = to_uint8_rgb(image)
        height, width = rgb.shape[:2]
        result = self._predict(rgb, threshold)
        boxes = result.boxes
        if boxes is None or len(boxes) == 0:
            return []
        xyxy = boxes.xyxy.cpu().numpy().astype(np.float64)
        confidences = boxes.conf.cpu().numpy().astype(np.float64)
        classes = boxes.cls.cpu().numpy().astype(int)
        masks: np.ndarray | None = None
        if want_masks and result.masks is not None:
            masks = unletterbox_masks(result.masks.data.cpu().numpy(), height, width)
        return [
            Detection(
                label=self.names.get(int(classes[i]), str(classes[i])),
                bbox=(float(xyxy[i, 0]), float(xyxy[i, 1]), float(xyxy[i, 2]), float(xyxy[i, 3])),
                confidence=float(confidences[i]),
                mask=None if masks is None else masks[i],
            )
            for i in range(len(xyxy))
        ]

    def info(self) -> dict[str, Any]:
        return {
            "model": self.model_reference,
            "model_path": str(self.model_path),
            "format": self.model_path.suffix.lower().lstrip("."),
            "task": self.task,
            "model_task": self.model_task,
            "class_names": dict(self.names),
            "imgsz": self.imgsz,
            "device": self.device,
            "half": self.half,
            "load_seconds": round(self.load_seconds, 3),
        }

    def check_health(self) -> None:
        """Raise if the model cannot run: one inference on a blank image (one normal call's cost)."""
        self._predict(np.zeros((WARMUP_SIZE, WARMUP_SIZE, 3), dtype=np.uint8), threshold=1.0)

"""Tiny one-class ("face") YOLOv8 detectors with random weights, saved as ultralytics checkpoints.

They have the real YOLOv8n architecture (bbox and -seg heads) and the checkpoint layout that
ultralytics' trainer writes, so ``ultralytics.YOLO(path)`` and :class:`deployments.detector.FaceDetector`
load them exactly as they load trained weights. Random weights detect nothing meaningful: tests
call them with a threshold of 0 and check shapes and types only.
"""

from __future__ import annotations

import datetime
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch

CLASS_NAMES: dict[int, str] = {0: "face"}
# model yaml (scale "n" is taken from the name) -> (output key, file name). "-seg" in the file
# name is what ultralytics and our loader use to tell a segm checkpoint apart at a glance.
MODELS: dict[str, tuple[str, str]] = {
    "yolov8n.yaml": ("bbox", "tiny_face_yolov8n.pt"),
    "yolov8n-seg.yaml": ("segm", "tiny_face_yolov8n-seg.pt"),
}
SEED = 0


def _checkpoint(model: torch.nn.Module, yaml_name: str, task: str) -> dict[str, Any]:
    """The subset of the trainer's checkpoint dict that ``ultralytics.nn.tasks.load_checkpoint`` reads."""
    import ultralytics

    return {
        "epoch": -1,
        "best_fitness": None,
        "model": deepcopy(model).half(),  # the trainer stores fp16 weights; the loader calls .float()
        "ema": None,
        "updates": None,
        "optimizer": None,
        "train_args": {"model": yaml_name, "task": task, "imgsz": 640, "single_cls": True},
        "date": datetime.datetime.now(datetime.UTC).isoformat(),
        "version": ultralytics.__version__,
        "license": "AGPL-3.0 (random weights built for tests)",
    }


def build_tiny_yolo(directory: Path) -> dict[str, str]:
    """Write the bbox and segm checkpoints into ``directory``; return their absolute paths."""
    from deployments.detector import prepare_ultralytics_offline

    prepare_ultralytics_offline()  # building needs no network: no DNS probe at import
    from ultralytics.nn.tasks import DetectionModel, SegmentationModel

    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    paths: dict[str, str] = {}
    for yaml_name, (key, file_name) in MODELS.items():
        model_class, task = (SegmentationModel, "segment") if key == "segm" else (DetectionModel, "detect")
        model = model_class(yaml_name, nc=len(CLASS_NAMES), verbose=False)
        model.names = dict(CLASS_NAMES)
        model.task = task
        path = directory / file_name
        torch.save(_checkpoint(model, yaml_name, task), path)
        paths[key] = str(path)
    return paths

"""ControlNet in the per-image cycle and the ``cnet_images`` output (fake stages: no Ray, no models)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from facedetailer.blend import resize_image
from facedetailer.params import FaceDetailerParams
from serve_app.pipeline import PipelineInputError, detail_batch, resolve_control
from tests.serve.test_pipeline import FakeStages, Job, face, textured

PREPROCESSORS = {"tile": "tile", "pose": "control_image"}


@dataclass
class ControlJob(Job):
    control: Any = None


def run(images: list[np.ndarray], stages: FakeStages, control_image: np.ndarray | None = None, **params: Any):
    resolved = FaceDetailerParams(**params)
    control = resolve_control(resolved, PREPROCESSORS, lambda text: control_image)
    return asyncio.run(detail_batch(images, resolved, stages, make_job=ControlJob, settings=None, control=control))


def test_tile_control_images_are_the_upscaled_crops_in_processing_order():
    # the first face's crop (taller box) is the larger one: sorting would not change the order,
    # but the reference's list is simply in the order the faces were refined
    boxes = [face(40, 40, 80, 90, 0.9), face(200, 40, 260, 80, 0.8)]
    stages = FakeStages(boxes)
    controlnet = {"name": "tile", "strength": 0.7, "start_percent": 0.1, "end_percent": 0.9}
    result = run([textured(300, 400)], stages, controlnet=controlnet)
    assert len(stages.refine_calls) == 2 and len(result.cnet_images) == 2
    for job, cnet_image in zip(stages.refine_calls, result.cnet_images, strict=True):
        assert job.control.name == "tile" and job.control.strength == 0.7
        assert (job.control.start_percent, job.control.end_percent) == (0.1, 0.9)
        assert np.array_equal(cnet_image, job.image)  # the upscaled crop the inpainter samples
        assert np.array_equal(job.control.image, job.image)
    # the node's list is in processing order, not sorted by size like cropped_refined
    assert [image.shape for image in result.cnet_images] == [job.image.shape for job in stages.refine_calls]
    assert result.cnet_images[0].shape[0] > result.cnet_images[1].shape[0]
    assert "control_image" not in result.detailer_pipe["params"]["controlnet"]


def test_strength_zero_sends_no_controlnet_but_still_lists_the_control_image():
    stages = FakeStages([face(40, 40, 80, 90)])
    result = run([textured()], stages, controlnet={"name": "tile", "strength": 0.0})
    assert stages.refine_calls[0].control is None
    assert np.array_equal(result.cnet_images[0], stages.refine_calls[0].image)


def test_a_request_control_image_is_resized_to_the_image_and_cut_to_each_crop_region():
    image = textured(200, 300)
    control = textured(100, 150, seed=5)  # half size: Lanczos to 300 × 200 first
    stages = FakeStages([face(100, 60, 140, 110)])
    result = run([image], stages, control_image=control, controlnet={"name": "pose", "control_image": "x"})
    [seg] = result.per_image[0].segments
    x1, y1, x2, y2 = seg.crop_region
    expected = resize_image(control, (300, 200))[y1:y2, x1:x2]
    assert np.array_equal(result.cnet_images[0], expected)
    assert np.array_equal(stages.refine_calls[0].control.image, expected)
    assert stages.refine_calls[0].image.shape != expected.shape  # the hint is resized in the inpainter


def test_no_refined_face_lists_one_placeholder_per_image():
    result = run([textured(seed=1), textured(seed=2)], FakeStages([]), controlnet={"name": "tile"})
    assert [item.shape for item in result.cnet_images] == [(64, 64, 3), (64, 64, 3)]
    assert not any(item.any() for item in result.cnet_images)


def test_unknown_controlnet_and_missing_control_image_are_input_errors():
    with pytest.raises(PipelineInputError, match="unknown 'canny'; configured: tile, pose"):
        resolve_control(FaceDetailerParams(controlnet={"name": "canny"}), PREPROCESSORS, lambda text: None)
    with pytest.raises(PipelineInputError, match="controlnet.control_image"):
        resolve_control(FaceDetailerParams(controlnet={"name": "pose"}), PREPROCESSORS, lambda text: None)
    assert resolve_control(FaceDetailerParams(), PREPROCESSORS, lambda text: None) is None
    # a form field carries the object as JSON text
    assert FaceDetailerParams(controlnet='{"name": "tile", "strength": 0.5}').controlnet.strength == 0.5

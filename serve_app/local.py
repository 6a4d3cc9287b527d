"""The pipeline's stages backed by in-process model objects (no Ray): tests, benchmarks, scripts."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np

from deployments.detector import FaceDetector
from deployments.inpainter import Inpainter, RefineJob, RefineResult, SamplingSettings
from deployments.sam import SamPrediction, SamSegmenter
from facedetailer.params import FaceDetailerParams
from facedetailer.sam_prompts import SamPrompt
from facedetailer.segs import Detection
from serve_app.pipeline import DetailResult, detail_batch


class LocalStages:
    """Calls the plain model classes directly, in this process."""

    def __init__(
        self,
        detector: FaceDetector,
        inpainter: Inpainter,
        sam: SamSegmenter | None = None,
        segm_detector: FaceDetector | None = None,
    ) -> None:
        self.detector, self.inpainter, self.sam, self.segm_detector = detector, inpainter, sam, segm_detector

    async def detect(self, image: np.ndarray, threshold: float) -> list[Detection]:
        return self.detector.detect(image, threshold)

    async def detect_segm(self, image: np.ndarray, threshold: float) -> list[Detection]:
        assert self.segm_detector is not None
        return self.segm_detector.detect(image, threshold)

    async def segment(self, image: np.ndarray, prompts: Sequence[SamPrompt]) -> list[SamPrediction]:
        assert self.sam is not None
        return self.sam.predict(image, list(prompts))

    async def refine(self, jobs: Sequence[RefineJob], settings: SamplingSettings) -> RefineResult:
        return self.inpainter.refine_result(list(jobs), settings)

    def detail(
        self, images: Sequence[np.ndarray], params: FaceDetailerParams, *, batch_faces: bool = True
    ) -> DetailResult:
        """The same FaceDetailer cycle the ingress runs, without any hop."""
        from serve_app.ingress import sampling_settings

        self.inpainter.validate_settings(sampling_settings(params))
        return asyncio.run(
            detail_batch(
                list(images),
                params,
                self,
                make_job=RefineJob,
                settings=sampling_settings(params),
                has_sam=self.sam is not None,
                has_segm=self.segm_detector is not None,
                batch_faces=batch_faces,
            )
        )

"""The pipeline's stages backed by in-process model objects (no Ray): tests, benchmarks, scripts."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from deployments.detector import FaceDetector
from deployments.inpainter import Inpainter, RefineJob, RefineResult, SamplingSettings
from deployments.sam import SamPrediction, SamSegmenter
from facedetailer.params import FaceDetailerParams
from facedetailer.sam_prompts import SamPrompt
from facedetailer.segs import Detection
from serve_app.config import Limits
from serve_app.images import decode_base64_image
from serve_app.model_choice import ModelChoice, NamedModels
from serve_app.pipeline import DetailResult, detail_batch, resolve_control


class LocalStages:
    """Calls the plain model classes directly, in this process.

    Each model kind may be one model or several by name, as in the served app; a request's
    ``bbox_detector``/``segm_detector``/``sam_model`` picks one (the first by default); so does
    ``model`` among several inpainters (checkpoints) by name.
    """

    def __init__(
        self,
        detector: FaceDetector | Mapping[str, FaceDetector],
        inpainter: Inpainter | Mapping[str, Inpainter],
        sam: SamSegmenter | Mapping[str, SamSegmenter] | None = None,
        segm_detector: FaceDetector | Mapping[str, FaceDetector] | None = None,
    ) -> None:
        self.models = ModelChoice.of(detector, segm_detector, sam)
        self.detector = self.models.detectors.default
        self.sam = self.models.sam_models.default
        self.segm_detector = self.models.segm_detectors.default
        self.inpainters = NamedModels.of("model", inpainter)
        self.inpainter = self.inpainters.default

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

        inpainter = self.inpainters.resolve(params.model)  # ModelChoiceError for an unknown name
        inpainter.validate_settings(sampling_settings(params))
        served = getattr(inpainter, "controlnets", None)
        preprocessors = {name: loaded.preprocessor for name, loaded in (served.models if served else {}).items()}
        control = resolve_control(params, preprocessors, lambda text: decode_base64_image(text, Limits()))
        chosen = self.models.select(params)  # ModelChoiceError (a ValueError) for an unknown name
        stages = LocalStages(chosen.detector, inpainter, chosen.sam, chosen.segm_detector)
        return asyncio.run(
            detail_batch(
                list(images),
                params,
                stages,
                make_job=RefineJob,
                settings=sampling_settings(params),
                has_sam=stages.sam is not None,
                has_segm=stages.segm_detector is not None,
                batch_faces=batch_faces,
                control=control,
            )
        )

    def detail_video(
        self,
        data: bytes,
        params: FaceDetailerParams,
        video: Any = None,
        *,
        limits: Limits | None = None,
        container: str = "mp4",
        keep_result: bool = False,
    ) -> Any:
        """A video file's bytes detailed in-process (serve_app/video): a ``VideoResponse``."""
        from facedetailer.video_params import VideoParams
        from serve_app.ingress import sampling_settings
        from serve_app.video.service import detail_video_file

        inpainter = self.inpainters.resolve(params.model)
        inpainter.validate_settings(sampling_settings(params))
        chosen = self.models.select(params)
        stages = LocalStages(chosen.detector, inpainter, chosen.sam, chosen.segm_detector)
        return asyncio.run(
            detail_video_file(
                data,
                params,
                video if isinstance(video, VideoParams) else VideoParams.model_validate(video or {}),
                stages,
                limits or Limits(),
                make_job=RefineJob,
                settings=sampling_settings(params),
                container=container,  # type: ignore[arg-type]
                has_sam=stages.sam is not None,
                has_segm=stages.segm_detector is not None,
                keep_result=keep_result,
            )
        )

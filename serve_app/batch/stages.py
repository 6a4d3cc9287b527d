"""The Ray Data stages of a bulk job: read → detect → (SAM) → refine and blend → write.

Each model stage is a class-based ``map_batches`` UDF, so Ray Data runs it as an actor pool
(sized and placed from the config's deployment options) and the model loads once per actor:

- :class:`DetectFaces` — :class:`~deployments.detector.FaceDetector` (and the segm detector when
  ``use_segm``); every model is loaded as the Serve deployments load it
  (:mod:`deployments.model_loading`: real, or a ``sim://`` stand-in);
- :class:`SegmentFaces` — :class:`~deployments.sam.SamSegmenter`, only when ``use_sam``; it plans
  the faces (:func:`serve_app.pipeline.prepare_image` with the detections already made);
- :class:`RefineFaces` — :class:`~deployments.inpainter.Inpainter` with its step-level engine
  running in a background thread (:class:`~deployments.checkpoints.LoadedCheckpoint`). Its
  ``__call__`` is a coroutine and the actor takes several batches at once, so every face crop of
  every image in flight is in the one engine: crops of many images share UNet calls. Each image
  goes through :func:`serve_app.pipeline.refine_image` — the service's own refine-and-blend
  cycle (faces whose crops overlap wait for the blend of the earlier face, as in the reference),
  so blending happens here, between the waves of one image.

Reading (:func:`read_images`) and writing (:func:`write_outputs`) are plain tasks. A stage that
fails on one image records the error in that image's :class:`~serve_app.batch.work.ImageWork` and
passes it on; the write stage turns every image into a manifest row.
"""

from __future__ import annotations

import asyncio
import os
import posixpath
import time
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from facedetailer.params import FaceDetailerParams
from facedetailer.sam_prompts import SamPrompt
from facedetailer.segs import Detection
from serve_app.batch.manifest import OK, TIMING_FIELDS, Manifest, now_utc, rows_table
from serve_app.batch.outputs import face_report, output_files, seeds_of
from serve_app.batch.storage import Location, read_bytes, write_atomic
from serve_app.batch.work import ImageWork, pending, table_of, works_of
from serve_app.config import CheckpointArgs, DetectorArgs, InpainterArgs, Limits, SamArgs
from serve_app.pipeline import ControlChoice, PreparedImage, planned_faces, prepare_image, refine_image

# The engine's queue bound protects an HTTP service from floods (beyond it: 503). In a bulk job
# Ray Data's backpressure bounds the images in flight, so the bound must never refuse crops.
BULK_QUEUE_BOUND = 100_000


# ------------------------------------------------------------------------------------ read


def read_images(
    batch: pa.Table, *, filesystems: Mapping[str, pafs.FileSystem], limits: Limits
) -> pa.Table:
    """Read and decode each input as the service decodes an upload (its limits first)."""
    from serve_app.images import ImageInputError, decode_image

    works = []
    for row in batch.to_pylist():
        work = ImageWork(input=row["input"], key=row["key"], path=row["path"], source=row["source"], size=row["size"])
        works.append(work)
        name = posixpath.basename(work.path)
        try:
            started = time.perf_counter()
            filesystem = filesystems[work.source]
            size = work.size
            if size is None:
                info = filesystem.get_file_info(work.path)
                if info.type != pafs.FileType.File:
                    raise FileNotFoundError(f"{work.input}: no such file")
                size = info.size
            if size is not None and size > limits.max_upload_bytes:
                raise ImageInputError(
                    f"{name}: {size} bytes exceeds the limit of {limits.max_upload_bytes} bytes", 413
                )
            data = read_bytes(filesystem, work.path)
            work.add_time("read", time.perf_counter() - started)
            started = time.perf_counter()
            work.image = decode_image(data, limits, name)
            work.height, work.width = work.image.shape[:2]
            work.add_time("decode", time.perf_counter() - started)
        except Exception as error:  # a bad input is a row, not a failed job
            work.fail(error)
    return table_of(works)


# ------------------------------------------------------------------------------------ detect


def load_detector(args: DetectorArgs, default_task: str | None = None) -> Any:
    """The detector as the service's binder builds it (``serve_app.app``)."""
    from deployments.model_loading import load_detector as load

    return load(args.model, task=args.task or default_task, imgsz=args.imgsz, device=args.device)


class DetectFaces:
    """Detection (and the segm detector's, when the job uses it) of each image."""

    def __init__(self, detector: DetectorArgs, segm_detector: DetectorArgs | None, threshold: float) -> None:
        self.detector = load_detector(detector)
        self.segm_detector = load_detector(segm_detector, "segment") if segm_detector is not None else None
        self.threshold = threshold

    def __call__(self, batch: pa.Table) -> pa.Table:
        works = works_of(batch)
        for work in pending(works):
            try:
                started = time.perf_counter()
                work.detections = self.detector.detect(work.image, self.threshold)
                work.add_time("detect", time.perf_counter() - started)
                if self.segm_detector is not None:
                    started = time.perf_counter()
                    work.segm_detections = self.segm_detector.detect(work.image, self.threshold)
                    work.add_time("detect_segm", time.perf_counter() - started)
            except Exception as error:
                work.fail(error)
        return table_of(works)


# ------------------------------------------------------------------------------------ plan (+ SAM)


class RecordedStages:
    """The pipeline's :class:`~serve_app.pipeline.Stages` with the detections the detect stage made."""

    def __init__(self, work: ImageWork, sam: Any = None) -> None:
        self.work, self.sam = work, sam

    async def detect(self, image: Any, threshold: float) -> list[Detection]:
        return list(self.work.detections or [])

    async def detect_segm(self, image: Any, threshold: float) -> list[Detection]:
        return list(self.work.segm_detections or [])

    async def segment(self, image: Any, prompts: Sequence[SamPrompt]) -> list[Any]:
        return self.sam.predict(image, list(prompts))

    async def refine(self, jobs: Sequence[Any], settings: Any) -> Any:
        raise RuntimeError("refining is the refine stage's")


class FacePlanner:
    """Plans an image's faces as the ingress does: masks, wildcard prompts, then the work limits.

    ``prompt_windows`` (the checkpoint's tokenizers, in the refine actor) adds the faces' prompt
    tokens to the limits checked; the SAM stage plans without it and the refine stage checks again.
    """

    def __init__(
        self,
        params: FaceDetailerParams,
        limits: Limits,
        wildcards_dir: str | None,
        has_segm: bool,
        prompt_windows: Any = None,
    ) -> None:
        from serve_app.wildcard_files import WildcardFolder

        self.params, self.limits, self.has_segm = params, limits, has_segm
        self.wildcards = WildcardFolder(wildcards_dir) if wildcards_dir else None
        self.prompt_windows = prompt_windows

    async def prepare(self, work: ImageWork, sam: Any = None) -> PreparedImage:
        prepared = await prepare_image(
            work.image,
            0,  # each input is a request of its own: image 0, the request's seed (as POST /v1/detail)
            self.params,
            RecordedStages(work, sam),
            has_sam=sam is not None,
            has_segm=self.has_segm,
            wildcard_files=self.wildcards,
        )
        for stage in ("detect", "detect_segm"):  # replayed here; measured by the detect stage
            prepared.timings.pop(stage, None)
        self.check(prepared)
        return prepared

    def check(self, prepared: PreparedImage) -> None:
        """The ingress's check of the planned faces: work and prompt limits, LoRA and wildcard names."""
        from serve_app.limits import check_planned_names, check_planned_work

        faces = planned_faces(prepared, self.params)
        check_planned_work(self.params, faces, self.limits, self.prompt_windows)
        check_planned_names(faces)


class SegmentFaces:
    """SAM's masks for the detected faces, then the face plan (only in jobs with ``use_sam``)."""

    def __init__(
        self, sam: SamArgs, params: FaceDetailerParams, limits: Limits, wildcards_dir: str | None, has_segm: bool
    ) -> None:
        from deployments.model_loading import load_segmenter

        self.sam = load_segmenter(sam.checkpoint, model_type=sam.model_type, device=sam.device)
        self.planner = FacePlanner(params, limits, wildcards_dir, has_segm)

    def __call__(self, batch: pa.Table) -> pa.Table:
        works = works_of(batch)
        for work in pending(works):
            try:
                work.prepared = asyncio.run(self.planner.prepare(work, self.sam))
                work.timings.update(work.prepared.timings)
            except Exception as error:
                work.fail(error)
        return table_of(works)


# ------------------------------------------------------------------------------------ refine + blend


class RefineFaces:
    """The inpainter and its engine; every image of every batch in flight feeds the same engine."""

    def __init__(
        self,
        checkpoint_name: str,
        checkpoint: CheckpointArgs,
        inpainter: InpainterArgs,
        controlnets: dict[str, Any] | None,
        params: FaceDetailerParams,
        limits: Limits,
        wildcards_dir: str | None,
        has_segm: bool,
        control: ControlChoice | None = None,
        stats: Any = None,
    ) -> None:
        import ray

        from deployments.checkpoints import LoadedCheckpoint
        from deployments.model_loading import load_inpainter
        from serve_app.ingress import sampling_settings
        from serve_app.prompt_tokens import PromptWindows

        model = load_inpainter(
            **checkpoint.model_dump(exclude_none=True),  # any family and layout, with its overrides
            device=inpainter.device,
            dtype=inpainter.dtype,
            lora_dir=inpainter.lora_dir,
            max_batch_size=inpainter.max_batch_size,
            max_queued_crops=BULK_QUEUE_BOUND,
            controlnets=controlnets,
        )
        self.settings = sampling_settings(params)
        model.validate_settings(self.settings)
        self.checkpoint = LoadedCheckpoint(checkpoint_name, model)  # starts the engine's thread
        self.params, self.limits, self.control = params, limits, control
        windows = PromptWindows(model.prompt_tokenizers())  # as the ingress counts them (max_prompt_tokens)
        self.planner = FacePlanner(params, limits, wildcards_dir, has_segm, windows)
        self.stats = stats
        # a restarted actor keeps its id: the process id keeps the dead one's counters apart
        self.actor_id = f"{ray.get_runtime_context().get_actor_id() or 'local'}-{os.getpid()}"

    async def __call__(self, batch: pa.Table) -> pa.Table:
        works = works_of(batch)
        await asyncio.gather(*(self._detail(work) for work in pending(works)))
        if self.stats is not None:  # before the rows move on: the driver's summary sees every batch
            await self.stats.report.remote(self.actor_id, self.checkpoint.engine.snapshot())
        return table_of(works)

    async def _detail(self, work: ImageWork) -> None:
        from deployments.inpainter import RefineJob

        try:
            prepared = work.prepared
            if prepared is None:
                prepared = await self.planner.prepare(work)
            else:  # planned in the SAM stage: the prompt tokens are counted here
                self.planner.check(prepared)
            result = await asyncio.wait_for(
                refine_image(
                    prepared, self.params, self, make_job=RefineJob, settings=self.settings, control=self.control
                ),
                timeout=self.limits.request_timeout_s,
            )
        except Exception as error:
            work.fail(error)
            return
        for stage, seconds in result.timings.items():
            if stage not in ("detect", "detect_segm", "sam"):  # already in the work's timings
                work.timings[stage] = seconds
        work.result, work.image, work.prepared, work.detections = result, None, None, None

    async def refine(self, jobs: Sequence[Any], settings: Any) -> Any:
        """The pipeline's refine stage: this actor's engine (a cancelled image's crops leave it)."""
        return await self.checkpoint.refine(jobs, settings)

    def __del__(self) -> None:
        checkpoint = getattr(self, "checkpoint", None)
        if checkpoint is not None and checkpoint.engine is not None:
            checkpoint.engine.stop(timeout_s=1.0)


# ------------------------------------------------------------------------------------ write


def write_outputs(batch: pa.Table, *, output: Location, outputs: Sequence[str], run_id: str) -> pa.Table:
    """Commit each image's outputs (atomically), then its manifest row (one journal file per batch)."""
    works = works_of(batch)
    rows = []
    for work in works:
        written: list[str] = []
        if work.pending:
            try:
                started = time.perf_counter()
                report = face_report(work.input, work.result, work.timings)
                for name, data in output_files(work.key, work.result, outputs, report).items():
                    write_atomic(output.filesystem, output.join(name), data)
                    written.append(name)
                work.add_time("write", time.perf_counter() - started)
            except Exception as error:
                work.fail(error)
        rows.append(manifest_row(work, written if work.status == OK else [], run_id))
    Manifest(output).append(rows, run_id)
    return rows_table(rows)


def manifest_row(work: ImageWork, outputs: list[str], run_id: str) -> dict[str, Any]:
    result = work.result
    timings = {name: work.timings.get(name) for name in TIMING_FIELDS}
    nested = ("inpaint_engine", "inpaint_queue_wait")  # parts of "inpaint"
    return {
        "input": work.input,
        "key": work.key,
        "status": work.status,
        "error": work.error,
        "width": work.width,
        "height": work.height,
        "faces_detected": len(result.segments) if result is not None else None,
        "faces_refined": len(result.cropped_refined) if result is not None else None,
        "seeds": seeds_of(result.segments) if result is not None else None,
        "outputs": outputs,
        "seconds": sum(value for name, value in timings.items() if value is not None and name not in nested),
        "timings": timings,
        "run_id": run_id,
        "finished_at": now_utc(),
    }

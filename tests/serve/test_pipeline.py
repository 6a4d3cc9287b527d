"""The per-image cycle (serve_app/pipeline.py) with in-process fake stages: no Ray, no models.

The fakes are deterministic so each rule of spec §2–§8 that the cycle owns can be checked exactly:
seeds per face and per image, processing order on the live image, skips, the outputs' shapes.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from facedetailer.params import FaceDetailerParams
from facedetailer.segs import Detection
from serve_app.pipeline import BlackPatchError, PipelineInputError, detail_batch


@dataclass
class Job:
    image: np.ndarray
    noise_mask: np.ndarray | None
    positive: tuple[str, ...]
    negative: tuple[str, ...]
    seed: int
    loras: tuple = ()


@dataclass
class SamOutput:
    masks: np.ndarray
    scores: np.ndarray


@dataclass
class FakeStages:
    """Detector returns fixed boxes; the 'inpainter' paints each crop a colour derived from its seed."""

    detections: list[Detection]
    segm_detections: list[Detection] = field(default_factory=list)
    sam_masks: np.ndarray | None = None
    refine_calls: list[Job] = field(default_factory=list)
    seen_crops: list[np.ndarray] = field(default_factory=list)

    async def detect(self, image: np.ndarray, threshold: float) -> list[Detection]:
        return [d for d in self.detections if d.confidence >= threshold]

    async def detect_segm(self, image: np.ndarray, threshold: float) -> list[Detection]:
        return self.segm_detections

    async def segment(self, image: np.ndarray, prompts: Any) -> list[SamOutput]:
        assert self.sam_masks is not None
        return [SamOutput(self.sam_masks[None], np.array([0.99], np.float32)) for _ in prompts]

    async def refine(self, jobs: list[Job], settings: Any) -> list[np.ndarray]:
        results = []
        for job in jobs:
            self.refine_calls.append(job)
            self.seen_crops.append(job.image.copy())
            results.append(np.full_like(job.image, fill_value=self.colour(job.seed)))
        return results

    @staticmethod
    def colour(seed: int) -> int:
        return 40 + (seed * 53) % 200


def run(images: list[np.ndarray], stages: FakeStages, **params: Any):
    resolved = FaceDetailerParams(**params)
    return asyncio.run(
        detail_batch(
            images, resolved, stages, make_job=Job, settings=None, has_sam=stages.sam_masks is not None, has_segm=True
        )
    )


def textured(height: int = 256, width: int = 320, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def face(x1: float, y1: float, x2: float, y2: float, confidence: float = 0.9) -> Detection:
    return Detection("face", (x1, y1, x2, y2), confidence)


def test_no_detection_returns_image_unchanged_empty_mask_and_placeholders():
    image = textured()
    result = run([image], FakeStages([]))
    assert np.array_equal(result.images[0], image)
    assert result.masks.shape == (1, 256, 320) and not result.masks.any()
    assert [c.shape for c in result.cropped_refined] == [(64, 64, 3)]
    # the node's placeholder is empty_pil_tensor(): black, 64×64, three channels, in every list
    assert [c.shape for c in result.cropped_enhanced_alpha] == [(64, 64, 3)]
    assert [c.shape for c in result.cnet_images] == [(64, 64, 3)]
    assert not result.cropped_refined[0].any() and not result.cropped_enhanced_alpha[0].any()


def test_three_faces_three_refined_crops_and_outside_pixels_bit_identical():
    image = textured(300, 600)
    boxes = [face(40, 40, 80, 90), face(250, 100, 290, 150), face(480, 200, 530, 250)]
    stages = FakeStages(boxes)
    result = run([image], stages, feather=5, bbox_crop_factor=2.0)
    assert len(result.cropped_refined) == 3 and len(stages.refine_calls) == 3
    outside = np.ones(image.shape[:2], bool)
    for segment in result.per_image[0].segments:
        x1, y1, x2, y2 = segment.crop_region
        outside[y1:y2, x1:x2] = False
    assert outside.any()
    assert np.array_equal(result.images[0][outside], image[outside])
    assert not np.array_equal(result.images[0], image)


def test_seeds_are_seed_plus_position_and_seed_plus_image_index():
    boxes = [face(20, 20, 60, 70, 0.9), face(200, 20, 240, 70, 0.8)]
    stages = FakeStages(boxes)
    run([textured(seed=1), textured(seed=2)], stages, seed=100)
    assert [job.seed for job in stages.refine_calls] == [100, 101, 101, 102]


def test_seed_wraps_at_two_to_the_64():
    stages = FakeStages([face(20, 20, 60, 70, 0.9), face(200, 20, 240, 70, 0.8)])
    run([textured()], stages, seed=2**64 - 1)
    assert [job.seed for job in stages.refine_calls] == [2**64 - 1, 0]


def test_overlapping_faces_later_crop_sees_earlier_result():
    image = textured(200, 200)
    stages = FakeStages([face(60, 60, 100, 100, 0.9), face(90, 60, 130, 100, 0.8)])
    result = run([image], stages, feather=0, bbox_crop_factor=3.0, bbox_dilation=0)
    first_colour = FakeStages.colour(0)
    second_crop = stages.seen_crops[1]
    # the second crop was taken from the image after the first face was pasted (upscaled, so
    # look for the first face's colour in its upscaled crop)
    assert (second_crop == first_colour).all(axis=-1).mean() > 0.05
    # the final image carries the second face's colour over the second box (pasted last)
    assert (result.images[0][62:98, 92:128] == FakeStages.colour(1)).all()


def test_force_inpaint_off_skips_big_faces_and_reports_why():
    stages = FakeStages([face(10, 10, 200, 220)])
    result = run([textured(256, 256)], stages, force_inpaint=False, guide_size=128)
    [segment] = result.per_image[0].segments
    assert segment.skipped and segment.skip_reason is not None
    assert not stages.refine_calls
    assert result.masks.any(), "the mask output keeps faces later skipped"


def test_upscale_and_sizes_reported():
    stages = FakeStages([face(100, 100, 132, 140)])
    result = run([textured(512, 512)], stages, guide_size=384, max_size=1024, bbox_crop_factor=3.0)
    [segment] = result.per_image[0].segments
    # crop 96x120; 384/32 = 12 gives 1152x1440 > max_size, so capped: 12 * 1024/1440
    assert segment.crop_region == (68, 60, 164, 180)
    assert segment.upscale == pytest.approx(12 * 1024 / 1440)
    assert segment.upscaled_size == (819, 1024)
    assert stages.refine_calls[0].image.shape[:2] == (segment.upscaled_size[1], segment.upscaled_size[0])
    assert result.cropped_refined[0].shape[:2] == (
        segment.crop_region[3] - segment.crop_region[1],
        segment.crop_region[2] - segment.crop_region[0],
    )


def test_wildcard_prompts_per_face_in_asc_order_with_concat():
    boxes = [face(200, 20, 240, 70, 0.9), face(20, 20, 60, 70, 0.8)]
    stages = FakeStages(boxes)
    run([textured()], stages, positive="photo", wildcard="[CONCAT][ASC]left[SEP]right", seed=5)
    assert [job.positive for job in stages.refine_calls] == [("photo", "left"), ("photo", "right")]
    assert [job.seed for job in stages.refine_calls] == [5, 6]


def test_skip_and_stop_items():
    boxes = [face(20, 20, 60, 70, 0.9), face(120, 20, 160, 70, 0.8), face(220, 20, 260, 70, 0.7)]
    stages = FakeStages(boxes)
    result = run([textured()], stages, wildcard="[ASC][SKIP][SEP]b[SEP][STOP]")
    assert [job.positive for job in stages.refine_calls] == [("b",)]
    reasons = [(s.index, s.skip_reason) for s in result.per_image[0].segments]
    assert reasons[0] == (0, "[SKIP]")


def test_no_noise_mask_sends_none():
    stages = FakeStages([face(20, 20, 60, 70)])
    run([textured()], stages, noise_mask=False)
    assert stages.refine_calls[0].noise_mask is None


def test_sam_and_segm_requested_without_deployment_are_input_errors():
    stages = FakeStages([face(20, 20, 60, 70)])
    with pytest.raises(PipelineInputError):
        asyncio.run(
            detail_batch([textured()], FaceDetailerParams(use_sam=True), stages, make_job=Job, settings=None)
        )


def test_sam_mask_restricts_face_mask():
    image = textured(200, 200)
    sam = np.zeros((200, 200), bool)
    sam[70:90, 70:90] = True
    stages = FakeStages([face(60, 60, 100, 100)], sam_masks=sam)
    result = run([image], stages, use_sam=True, bbox_dilation=0)
    assert result.masks[0].sum() == 400
    changed = np.any(result.images[0] != image, axis=-1)
    ys, xs = np.nonzero(changed)
    # feather 5 blurs a few pixels beyond the SAM mask, never to the bbox corners
    assert ys.min() >= 60 and xs.min() >= 60 and not changed[61, 61]


def test_segm_union_and_override():
    image = textured(200, 200)
    segm_mask = np.zeros((200, 200), np.float32)
    segm_mask[65:80, 65:80] = 1.0
    stages = FakeStages([face(60, 60, 100, 100)], segm_detections=[Detection("face", (65, 65, 80, 80), 0.9, segm_mask)])
    anded = run([image], stages, use_segm=True, bbox_dilation=0)
    assert anded.masks[0].sum() == 15 * 15
    stages.refine_calls.clear()
    overridden = run([image], stages, use_segm=True, override_bbox_by_segm=True, bbox_dilation=0)
    [segment] = overridden.per_image[0].segments
    assert segment.bbox == (65, 65, 80, 80)


def test_crop_lists_sorted_by_height_then_width_descending():
    boxes = [face(20, 20, 40, 40, 0.9), face(150, 20, 210, 80, 0.8)]
    result = run([textured(300, 300)], FakeStages(boxes), bbox_crop_factor=2.0)
    heights = [crop.shape[0] for crop in result.cropped_refined]
    assert heights == sorted(heights, reverse=True)
    assert result.cropped_enhanced_alpha[0].shape[2] == 4


def run_mode(images, stages, batch_faces: bool, **params: Any):
    return asyncio.run(
        detail_batch(
            images, FaceDetailerParams(**params), stages, make_job=Job, settings=None, batch_faces=batch_faces
        )
    )


class CountingStages(FakeStages):
    """Also records the size of each inpainter call; output depends on the crop content too."""

    def __init__(self, detections: list[Detection]) -> None:
        super().__init__(detections)
        self.call_sizes: list[int] = []

    async def refine(self, jobs: list[Job], settings: Any) -> list[np.ndarray]:
        self.call_sizes.append(len(jobs))
        # the result depends on the crop it was given, so order semantics show in the output
        return [(255 - job.image) // 2 + self.colour(job.seed) // 2 for job in jobs]


def test_disjoint_faces_go_in_one_inpainter_call_with_identical_output():
    boxes = [face(40, 40, 80, 90, 0.9), face(250, 100, 290, 150, 0.8), face(480, 200, 530, 250, 0.7)]
    image = textured(300, 600)
    batched_stages, single_stages = CountingStages(boxes), CountingStages(boxes)
    batched = run_mode([image], batched_stages, True, bbox_crop_factor=2.0)
    single = run_mode([image], single_stages, False, bbox_crop_factor=2.0)
    assert batched_stages.call_sizes == [3] and single_stages.call_sizes == [1, 1, 1]
    assert np.array_equal(batched.images[0], single.images[0])


def test_overlapping_faces_refined_in_waves_equal_one_by_one():
    boxes = [face(60, 60, 100, 100, 0.9), face(90, 60, 130, 100, 0.8), face(300, 60, 340, 100, 0.7)]
    image = textured(200, 400)
    batched_stages, single_stages = CountingStages(boxes), CountingStages(boxes)
    batched = run_mode([image], batched_stages, True, feather=3)
    single = run_mode([image], single_stages, False, feather=3)
    assert batched_stages.call_sizes == [2, 1], "faces 0 and 2 first, then face 1 on the updated image"
    assert np.array_equal(batched.images[0], single.images[0])
    assert [s.seed for s in batched.per_image[0].segments] == [0, 1, 2]


# --- issue 12: hooks before sampling, the node's list outputs, prompts as text (Decision 9) -----------

THREE_SIZES = [face(40, 40, 60, 60, 0.9), face(150, 150, 190, 190, 0.8), face(300, 40, 330, 70, 0.7)]


def test_ordered_filter_hook_details_only_the_largest_face_and_masks_only_it():
    stages = FakeStages(THREE_SIZES)
    result = run([textured(400, 400)], stages, detailer_hooks=[{"type": "segs_ordered_filter"}])
    [segment] = result.per_image[0].segments
    assert segment.crop_region == (110, 110, 230, 230) and len(stages.refine_calls) == 1
    ys, xs = np.nonzero(result.masks[0])
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (146, 195, 146, 195)  # the 40-px box, dilated by 10


def test_label_and_range_filters_run_before_sam():
    sam = np.ones((400, 400), bool)
    stages = FakeStages(THREE_SIZES, sam_masks=sam)
    hooks = [{"type": "segs_range_filter", "min_value": 8100}, {"type": "segs_label_filter", "labels": "face"}]
    result = run([textured(400, 400)], stages, use_sam=True, detailer_hooks=hooks)
    assert [s.crop_region for s in result.per_image[0].segments] == [(110, 110, 230, 230), (270, 10, 360, 100)]


def test_coreml_hook_squares_the_crop_and_samples_at_its_fixed_size():
    stages = FakeStages([face(280, 250, 320, 310)])
    result = run([textured(600, 600)], stages, detailer_hooks=[{"type": "coreml", "mode": "512x512"}])
    [segment] = result.per_image[0].segments
    assert segment.crop_region == (240, 250, 360, 370) and segment.upscaled_size == (512, 512)
    assert stages.refine_calls[0].image.shape == (512, 512, 3)
    assert stages.refine_calls[0].noise_mask.shape == (120, 120), "the mask stays at crop size (reference §6.3)"
    assert result.cropped_refined[0].shape == (120, 120, 3)


@dataclass
class BlackStages(FakeStages):
    """The 'inpainter' returns a black crop for the seeds in ``black_seeds``."""

    black_seeds: set[int] = field(default_factory=set)

    async def refine(self, jobs: list[Job], settings: Any) -> list[np.ndarray]:
        results = await super().refine(jobs, settings)
        pairs = zip(jobs, results, strict=True)
        return [np.zeros_like(image) if job.seed in self.black_seeds else image for job, image in pairs]


TWO_FACES = [face(20, 20, 60, 70), face(220, 150, 260, 200)]


def test_black_patch_retry_samples_a_black_face_again_with_the_next_seed():
    stages = BlackStages(list(TWO_FACES), black_seeds={7, 8})
    hooks = [{"type": "black_patch_retry", "max_retries": 3}]
    result = run([textured()], stages, seed=7, detailer_hooks=hooks)
    # face 0 (seed 7) is black, then seed 8 black too, seed 9 is kept; face 1 (seed 8!) is black → 9
    assert [[job.seed for job in call] for call in _calls(stages)] == [[7, 8], [8, 9], [9]]
    assert [segment.seed for segment in result.per_image[0].segments] == [9, 9]
    colour = FakeStages.colour(9)
    assert all(np.all(crop == colour) for crop in result.cropped_refined)


def _calls(stages: FakeStages) -> list[list[Job]]:
    """refine_calls split per inpainter call (the fake records jobs flat; calls are 2, 2, 1 jobs here)."""
    sizes, calls, jobs = [2, 2, 1], [], list(stages.refine_calls)
    for size in sizes:
        calls.append(jobs[:size])
        jobs = jobs[size:]
    assert not jobs
    return calls


def test_black_patch_retry_stops_at_max_retries_and_fails_like_the_reference():
    stages = BlackStages([face(20, 20, 60, 70)], black_seeds={7, 8, 9})
    with pytest.raises(BlackPatchError, match=r"still a black patch after 2 attempt\(s\) \(seeds 7, 8\)"):
        run([textured()], stages, seed=7, detailer_hooks=[{"type": "black_patch_retry", "max_retries": 2}])
    assert [job.seed for job in stages.refine_calls] == [7, 8]


def test_black_patch_thresholds_and_no_retry_without_the_hook():
    dark = BlackStages([face(20, 20, 60, 70)], black_seeds={7})
    result = run([textured()], dark, seed=7)  # no hook: the black crop is kept
    assert len(dark.refine_calls) == 1 and not result.cropped_refined[0].any()
    # FakeStages paints 40 + 53·seed mod 200: seed 7 → 211 (bright), never "black" at mean_thresh 10
    bright = FakeStages([face(20, 20, 60, 70)])
    run([textured()], bright, seed=7, detailer_hooks=[{"type": "black_patch_retry", "max_retries": 5}])
    assert len(bright.refine_calls) == 1
    # … but black at mean_thresh 255 (mean ≤ 1 and variance 0 ≤ 5/255): every attempt retried, then the error
    with pytest.raises(BlackPatchError):
        run([textured()], FakeStages([face(20, 20, 60, 70)]), seed=7,
            detailer_hooks=[{"type": "black_patch_retry", "mean_thresh": 255, "max_retries": 2}])  # fmt: skip


def test_segm_override_that_the_reference_would_ignore_is_refused():
    params = FaceDetailerParams(
        use_segm=True, override_bbox_by_segm=True, detailer_hooks=[{"type": "segs_ordered_filter"}]
    )
    with pytest.raises(PipelineInputError, match="override_bbox_by_segm"):
        asyncio.run(detail_batch([textured()], params, FakeStages([]), make_job=Job, settings=None, has_segm=True))


def test_each_image_without_a_refined_face_contributes_one_placeholder_to_every_list():
    empty = run([textured(seed=1), textured(seed=2)], FakeStages([]))
    for items in (empty.cropped_refined, empty.cropped_enhanced_alpha, empty.cnet_images):
        assert [item.shape for item in items] == [(64, 64, 3), (64, 64, 3)]
        assert not any(item.any() for item in items)

    class FirstImageOnly(FakeStages):
        async def detect(self, image, threshold):
            return self.detections if image[0, 0, 0] == self.first_pixel else []

    first = textured(seed=1)
    stages = FirstImageOnly([face(20, 20, 60, 70)])
    stages.first_pixel = first[0, 0, 0]
    second = textured(seed=2)
    assert second[0, 0, 0] != first[0, 0, 0]
    mixed = run([first, second], stages)
    assert [c.shape for c in mixed.cropped_refined] == [(150, 120, 3), (64, 64, 3)]
    assert [c.shape for c in mixed.cropped_enhanced_alpha] == [(150, 120, 4), (64, 64, 3)]
    assert len(mixed.cnet_images) == 2


def test_crops_of_equal_size_keep_the_processing_order_across_waves():
    # A and B overlap (B waits for A's wave), C is disjoint: waves [A, C], [B]; all crops 120×120
    boxes = [face(60, 60, 100, 100, 0.9), face(90, 60, 130, 100, 0.8), face(300, 60, 340, 100, 0.7)]
    stages = CountingStages(boxes)
    result = run_mode([textured(200, 400)], stages, True, feather=0)
    assert stages.call_sizes == [2, 1]
    expected = [FakeStages.colour(seed) for seed in (0, 1, 2)]  # A, B, C
    assert [crop.shape for crop in result.cropped_refined] == [(120, 120, 3)] * 3
    by_colour = FakeStages(boxes)
    ordered = run([textured(200, 400)], by_colour, feather=0)
    assert [int(crop[60, 60, 0]) for crop in ordered.cropped_refined] == expected
    assert [int(crop[60, 60, 0]) for crop in ordered.cropped_enhanced_alpha] == expected


def test_lora_tags_in_positive_and_negative_are_removed_and_applied():
    stages = FakeStages([face(20, 20, 60, 70)])
    run(
        [textured()],
        stages,
        positive="photo <lora:detail:0.5> BREAK sharp",
        negative="blurry <lora:bad:1:0.25>",
        wildcard="[CONCAT]smile <lora:detail>",
    )
    [job] = stages.refine_calls
    assert job.positive == ("photo", "sharp", "smile")
    assert job.negative == ("blurry",)
    assert job.loras == (("detail", 0.5, 0.5), ("bad", 1.0, 0.25), ("detail", 1.0, 1.0))


def test_coreml_region_that_leaves_the_image_skips_its_face_as_the_reference_does():
    # bottom gap 10 px, top gap 130 px: the reference's gap ratio 13 pushes the window off the image
    stages = FakeStages([face(200, 300, 260, 370)])
    result = run([textured(380, 600)], stages, detailer_hooks=[{"type": "coreml", "mode": "768x512"}])
    [segment] = result.per_image[0].segments
    assert segment.crop_region == (140, 380, 320, 380)
    assert segment.skipped and segment.skip_reason == "empty mask" and not stages.refine_calls
    assert not result.masks.any()
    with_sam = FakeStages([face(200, 300, 260, 370)], sam_masks=np.ones((380, 600), bool))
    coreml = [{"type": "coreml", "mode": "768x512"}]
    sam_result = run([textured(380, 600)], with_sam, use_sam=True, detailer_hooks=coreml)
    assert sam_result.per_image[0].segments[0].skip_reason == "empty mask" and not with_sam.refine_calls

"""Colour matching and multi-band blending in the per-image cycle, with in-process fake stages.

The bit-identity test pins today's reference-exact result: the digests below were computed with
the pipeline as it was before these options existed (commit 3e21882), on the fixture defined here,
then re-pinned when the final paste began to truncate as ComfyUI's SaveImage (Decision 11).
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from facedetailer.params import FaceDetailerParams
from facedetailer.segs import Detection
from serve_app.pipeline import detail_batch


@dataclass
class Job:
    image: np.ndarray
    noise_mask: np.ndarray | None
    positive: tuple[str, ...]
    negative: tuple[str, ...]
    seed: int
    loras: tuple = ()


def _ellipse_mask(shape: tuple[int, int], centre: tuple[float, float], radii: tuple[float, float]) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    distance = ((xx - centre[0]) / radii[0]) ** 2 + ((yy - centre[1]) / radii[1]) ** 2
    return np.clip(1.5 - distance, 0.0, 1.0).astype(np.float32)  # soft edge: values between 0 and 1


def golden_images() -> list[np.ndarray]:
    """Two textured photos-to-be: smooth gradients plus noise, so rounding and blur paths all show."""
    images = []
    for seed in (0, 1):
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[:240, :360].astype(np.float32)
        base = np.stack([80 + 0.3 * xx, 60 + 0.5 * yy, 140 - 0.2 * xx + 0.1 * yy], axis=-1)
        images.append(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))
    return images


@dataclass
class GoldenStages:
    """Fixed faces (two of them overlapping) and an 'inpainter' that casts and shifts each crop."""

    refine_calls: list[Job] = field(default_factory=list)

    async def detect(self, image: np.ndarray, threshold: float) -> list[Detection]:
        return [
            Detection("face", (50.0, 40.0, 100.0, 100.0), 0.9),
            Detection("face", (85.0, 50.0, 130.0, 105.0), 0.8),
            Detection("face", (250.0, 120.0, 300.0, 180.0), 0.7),
        ]

    async def detect_segm(self, image: np.ndarray, threshold: float) -> list[Detection]:
        mask = _ellipse_mask(image.shape[:2], (275.0, 150.0), (22.0, 28.0))
        return [Detection("face", (250.0, 120.0, 300.0, 180.0), 0.7, mask)]

    async def segment(self, image: np.ndarray, prompts: Any) -> list[Any]:
        raise AssertionError("no SAM in these tests")

    async def refine(self, jobs: list[Job], settings: Any) -> list[np.ndarray]:
        results = []
        for job in jobs:
            self.refine_calls.append(job)
            crop = job.image.astype(np.float32)
            gain = np.array([1.15, 0.95, 0.8], np.float32)
            ramp = np.linspace(0, 20, crop.shape[1], dtype=np.float32)[None, :, None]
            results.append(np.clip(crop * gain + 10 + (job.seed % 7) + ramp, 0, 255).astype(np.uint8))
        return results


GOLDEN_CASES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "feather0": {"feather": 0, "bbox_crop_factor": 2.0},
    "feather20": {"feather": 20, "noise_mask": False, "seed": 5},
    "segm": {"use_segm": True, "feather": 7, "bbox_dilation": 4},
}


def digest(images: list[np.ndarray]) -> str:
    hasher = hashlib.sha256()
    for image in images:
        hasher.update(str(image.shape).encode() + str(image.dtype).encode())
        hasher.update(np.ascontiguousarray(image).tobytes())
    return hasher.hexdigest()[:32]


def run_golden(params: dict[str, Any]):
    stages = GoldenStages()
    result = asyncio.run(
        detail_batch(
            golden_images(), FaceDetailerParams(**params), stages, make_job=Job, settings=None, has_segm=True
        )
    )
    return result, stages


# Digests of ``result.images`` from the pipeline before color_match/blend existed (commit 3e21882),
# with the paste truncating as SaveImage since 7dd7d43 (Decision 11); feather0's binary masks paste
# whole pixels, so its digest did not change.
TODAY = {
    "defaults": "4dad700a04d4e568ee0eff10842d8401",
    "feather0": "9e24aa385551600f075aece96b2beb7a",
    "feather20": "9b571c5305dc93265915ad531cf7e395",
    "segm": "0e77478d99b77b19b7f9fcce510fd931",
}


def test_options_unset_are_bit_identical_to_todays_pipeline():
    for name, params in GOLDEN_CASES.items():
        result, stages = run_golden(params)
        assert len(stages.refine_calls) >= 2, name
        assert not np.array_equal(result.images[0], golden_images()[0]), f"{name}: the fixture must paste something"
        assert digest(result.images) == TODAY[name], name


def test_explicit_defaults_and_any_strength_without_matching_are_the_same_bits():
    for params in (
        {"color_match": "none", "blend": "feather"},
        {"color_match": "none", "color_match_strength": 0.3},
        {"color_match": "mean_std", "color_match_strength": 0.0},
    ):
        result, _ = run_golden(params)
        assert digest(result.images) == TODAY["defaults"], params


def paste_masks(params: dict[str, Any]) -> list[np.ndarray]:
    """Image-sized union of every refined face's paste mask, per image, rebuilt from the SEGS."""
    from facedetailer.blend import feather_mask
    from facedetailer.seam_metric import mask_in_image
    from facedetailer.segs import detections_to_segs

    resolved = FaceDetailerParams(**params)
    masks = []
    for image in golden_images():
        detections = asyncio.run(GoldenStages().detect(image, 0.5))
        segs = detections_to_segs(
            image, detections, dilation=resolved.bbox_dilation, crop_factor=resolved.bbox_crop_factor, drop_size=10
        )
        union = np.zeros(image.shape[:2], np.float32)
        for seg in segs.segs:
            placed = mask_in_image(image.shape, feather_mask(seg.cropped_mask, resolved.feather), seg.crop_region)
            union = np.maximum(union, placed)
        masks.append(union)
    return masks


def test_colour_matching_removes_the_cast_on_every_face_and_touches_only_pasted_pixels():
    from facedetailer.seam_metric import seam_metric

    base = {"feather": 5}
    plain, _ = run_golden(base)
    for method in ("mean_std", "histogram"):
        matched, stages = run_golden({**base, "color_match": method})
        assert len(stages.refine_calls) == 6
        for k, (source, mask) in enumerate(zip(golden_images(), paste_masks(base), strict=True)):
            before = seam_metric(plain.images[k], source, mask).delta_e
            after = seam_metric(matched.images[k], source, mask).delta_e
            assert before > 5 and after < 0.3 * before, (method, k, before, after)
            assert np.array_equal(matched.images[k][mask == 0], source[mask == 0])
            for segment in matched.per_image[k].segments:  # every face was matched, not only the last
                x1, y1, x2, y2 = (int(v) for v in segment.bbox)
                face_plain = plain.images[k][y1 + 5 : y2 - 5, x1 + 5 : x2 - 5].astype(float)
                face_matched = matched.images[k][y1 + 5 : y2 - 5, x1 + 5 : x2 - 5].astype(float)
                face_source = source[y1 + 5 : y2 - 5, x1 + 5 : x2 - 5].astype(float)
                assert np.abs(face_matched.mean((0, 1)) - face_source.mean((0, 1))).max() < 4, (method, segment)
                assert np.abs(face_plain.mean((0, 1)) - face_source.mean((0, 1))).max() > 15
        # the crop lists carry the crops as pasted (matched), not the inpainter's
        pairs = zip(plain.cropped_refined, matched.cropped_refined, strict=True)
        assert not any(np.array_equal(a, b) for a, b in pairs)


def test_multiband_in_the_cycle_lowers_gradient_excess_and_stays_inside_the_crops():
    from facedetailer.seam_metric import seam_metric

    base = {"feather": 5}
    plain, _ = run_golden(base)
    multiband, _ = run_golden({**base, "blend": "multiband"})
    for k, (source, mask) in enumerate(zip(golden_images(), paste_masks(base), strict=True)):
        feather_score = seam_metric(plain.images[k], source, mask)
        band_score = seam_metric(multiband.images[k], source, mask)
        assert band_score.gradient_excess < feather_score.gradient_excess, (feather_score, band_score)
        assert band_score.delta_e < feather_score.delta_e, (feather_score, band_score)
        outside = np.ones(source.shape[:2], bool)
        for segment in multiband.per_image[k].segments:
            x1, y1, x2, y2 = segment.crop_region
            outside[y1:y2, x1:x2] = False
        assert np.array_equal(multiband.images[k][outside], source[outside])
    assert multiband.detailer_pipe["params"]["blend"] == "multiband"

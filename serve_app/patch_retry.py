"""The ``should_retry_patch`` hook point: sample a face again while its decoded crop is black.

As Impact's DetailerForEachAutoRetry: attempt r samples the face with ``seg_seed + r`` (its
cycles add c on top), up to ``max_retries`` attempts in all; the check runs on the refined crop
brought back to the crop's size (``enhance_detail``'s result). When every attempt is black the
reference raises; so does this (:class:`BlackPatchError`, a 422 over HTTP). Faces that are not
black keep their first result; the black ones of a wave are retried together in one call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np

from facedetailer.blend import resize_image
from facedetailer.cycle_hooks import retry_seeds
from facedetailer.hooks import DetailerHooks


class BlackPatchError(ValueError):
    """Every attempt of a face was a black patch (the reference raises here too)."""


async def refine_with_retries(
    faces: Sequence[Any],
    images: Sequence[np.ndarray],
    hooks: DetailerHooks,
    refine_again: Callable[[list[Any]], Awaitable[list[np.ndarray]]],
) -> list[np.ndarray]:
    """The wave's refined crops after the black-patch retries (``faces`` are the pipeline's RefinePlans).

    ``images`` are the first attempt's results; ``refine_again(jobs)`` refines jobs and returns
    their images in order. A face's report gets the seed that produced its kept result.
    """
    results = list(images)
    if not any(hook.type == "black_patch_retry" for hook in hooks.hooks):
        return results
    seeds = {index: retry_seeds(int(face.job.seed), hooks.max_retries) for index, face in enumerate(faces)}
    black = [index for index, face in enumerate(faces) if _is_black(hooks, face, results[index])]
    for attempt in range(1, hooks.max_retries):
        if not black:
            break
        jobs = [dataclasses.replace(faces[index].job, seed=seeds[index][attempt]) for index in black]
        for index, image in zip(black, await refine_again(jobs), strict=True):
            results[index] = image
            faces[index].report.seed = seeds[index][attempt]
        black = [index for index in black if _is_black(hooks, faces[index], results[index])]
    if black:
        face = faces[black[0]]
        raise BlackPatchError(
            f"black_patch_retry: face {face.position} is still a black patch after {hooks.max_retries} "
            f"attempt(s) (seeds {', '.join(str(seed) for seed in seeds[black[0]])})"
        )
    return results


def _is_black(hooks: DetailerHooks, face: Any, image: np.ndarray) -> bool:
    return hooks.should_retry_patch(resize_image(np.asarray(image), face.crop_size))

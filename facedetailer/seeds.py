"""Seed and step arithmetic (spec §5, §6, §8; reference §6.6–6.7, Q10)."""

from __future__ import annotations

import math
from dataclasses import dataclass

SEED_MODULUS = 2**64
FULL_SCHEDULE_DENOISE = 0.9999  # ComfyUI KSampler.set_steps: denoise above this runs the plain schedule


def sampling_seed(base_seed: int, image_index: int, segment_index: int, cycle_index: int) -> int:
    """``seed + k + i + c`` mod 2**64: the reference's formula, collisions included (Q10).

    With ``[SEP:n]`` pass ``base_seed = n`` and ``image_index = segment_index = 0``: n replaces
    seed + k + i, cycles still add c.
    """
    return (base_seed + image_index + segment_index + cycle_index) % SEED_MODULUS


@dataclass(frozen=True)
class DenoiseSchedule:
    """ComfyUI's denoise: a schedule of ``total_steps`` whose last ``steps`` steps are run.

    ``strength`` is the diffusers img2img strength that reproduces it with
    ``num_inference_steps = total_steps``: ``int(total_steps * strength) == executed_steps``,
    so diffusers starts at index ``total_steps - steps == start_index``.
    """

    total_steps: int
    start_index: int
    executed_steps: int
    strength: float


def comfy_denoise_schedule(steps: int, denoise: float) -> DenoiseSchedule:
    """T = floor(steps / denoise), run sigmas[T − steps:] (reference §6.7); steps always run in full.

    The floor is ComfyUI's own float ``int(steps / denoise)`` (Decision 7: steps/denoise exactly as
    the reference), so 20/0.1 → 200 but 7/0.07 → 99, as ComfyUI computes 7/0.07 = 99.999….
    Denoise above 0.9999 runs the plain schedule, as ``KSampler.set_steps``.
    """
    if steps < 1 or not 0 < denoise <= 1:
        raise ValueError(f"need steps >= 1 and 0 < denoise <= 1, got steps={steps}, denoise={denoise}")
    total = steps if denoise > FULL_SCHEDULE_DENOISE else max(math.floor(steps / denoise), steps)
    strength = 1.0 if total == steps else steps / total
    while int(total * strength) < steps:  # step up past float rounding, at most a few ulps
        strength = math.nextafter(strength, 2.0)
    return DenoiseSchedule(total_steps=total, start_index=total - steps, executed_steps=steps, strength=strength)


def track_seed(base_seed: int, track_position: int) -> int:
    """A video track's seed: ``seed + j`` for the track at position j, as faces of one image get."""
    return (base_seed + track_position) % SEED_MODULUS


def track_frame_seed(seed_of_track: int, frame_index: int, *, shared_noise: bool) -> int:
    """The seed a track's crop in frame k samples with: the track's own with shared noise (every
    frame then starts from the same noise tensor), else ``track seed + k`` (the batch rule)."""
    return seed_of_track if shared_noise else (seed_of_track + frame_index) % SEED_MODULUS

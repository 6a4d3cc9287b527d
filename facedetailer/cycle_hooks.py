"""The per-cycle arithmetic of the hooks that act inside sampling (reference §6.6, §9).

Pure functions: the inpainter's cycle loop calls them and does the tensor work itself.
Array arguments may be numpy arrays or torch tensors (only arithmetic is used), except
:func:`normalize_latent` and :func:`should_retry_patch`, which take numpy.

Where each one acts, for cycle ``c`` of ``cycle`` (the reference's ``set_steps((c, cycle))``):
- ``cycle_latent`` (before the cycle's sampling, on the previous cycle's latent):
  :func:`noise_injection_step` then :func:`inject_noise`; :func:`unsampler_step` then
  :func:`unsampler_sigmas` (and :func:`normalize_latent` when asked);
- ``pre_ksample``: :func:`scheduled_denoise`;
- ``get_custom_noise`` (the cycle's initial noise, from the cycle's seed ``seg_seed + c``):
  :func:`mix_variation_noise`;
- ``should_retry_patch`` (on the decoded crop, DetailerForEachAutoRetry's loop):
  :func:`should_retry_patch` and :func:`retry_seeds`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from facedetailer.seeds import SEED_MODULUS

UNSAMPLER_SIGMA_OFFSET = 1e-4  # the Unsampler adds this to every flipped sigma

CycleSchedule = Literal["skip_start", "from_start"]


def _cycle_progress(schedule: CycleSchedule, cycle_index: int, cycle: int) -> tuple[int, int] | None:
    """(current, total) step of a ``skip_start``/``from_start`` schedule; None = the hook rests.

    ``skip_start`` leaves cycle 0 alone and counts from cycle 1 (current = c − 1 of cycle − 1);
    ``from_start`` acts from cycle 0 (current = c of cycle).
    """
    if schedule == "from_start":
        return cycle_index, cycle
    if cycle_index == 0:
        return None
    return cycle_index - 1, cycle - 1


# --- denoise_scheduler (pre_ksample) -----------------------------------------------------------


def scheduled_denoise(denoise: float, target_denoise: float, cycle_index: int, cycle: int) -> float:
    """Denoise for cycle c: linear from the request's ``denoise`` (c = 0) to the target (last cycle).

    With a single cycle the hook does nothing. ``denoise`` is the value handed to the hook, which
    in the reference is the request's denoise every cycle (or the previous hook's output when
    hooks are combined), never the previous cycle's.
    """
    if cycle <= 1:
        return denoise
    progress = cycle_index / (cycle - 1)
    return denoise + (target_denoise - denoise) * progress


# --- noise_injection (cycle_latent) ------------------------------------------------------------


@dataclass(frozen=True)
class NoiseInjectionStep:
    """Add ``strength`` × N(0, 1) noise drawn from ``seed`` on ``source`` to the latent.

    The reference (ComfyUI Noise's NoisyLatentImage + InjectNoise) seeds torch's global generator
    with ``seed`` (``torch.manual_seed``), draws ``randn([B, 4, H/8, W/8])`` on the CPU or the GPU
    as ``source`` says, and mixes it in with :func:`inject_noise` under the latent's noise mask.
    """

    seed: int
    strength: float
    source: Literal["CPU", "GPU"]


def noise_injection_step(
    schedule: CycleSchedule,
    seed: int,
    start_strength: float,
    end_strength: float,
    source: Literal["CPU", "GPU"],
    cycle_index: int,
    cycle: int,
) -> NoiseInjectionStep | None:
    """What noise injection does before cycle c (None: nothing).

    With current step k of total T: seed = k + seed + k (the reference's arithmetic, taken modulo
    2**64 so it stays a valid torch seed) and strength = start + (end − start)·k / T.
    """
    progress = _cycle_progress(schedule, cycle_index, cycle)
    if progress is None:
        return None
    current, total = progress
    strength = start_strength + (end_strength - start_strength) * current / total
    return NoiseInjectionStep(seed=(current + seed + current) % SEED_MODULUS, strength=strength, source=source)


def inject_noise(latent: Any, noise: Any, strength: float, mask: Any | None = None) -> Any:
    """``latent + strength·noise``, only where the mask is (InjectNoise): m·noised + (1 − m)·latent.

    ``mask`` must already have the latent's shape (the reference resizes the noise mask
    bilinearly to the latent grid and repeats it over channels first).
    """
    noised = latent + noise * strength
    if mask is None:
        return noised
    return mask * noised + (1 - mask) * latent


# --- unsampler (cycle_latent) ------------------------------------------------------------------


@dataclass(frozen=True)
class UnsampleStep:
    """Run the sampler backwards over ``sigmas`` (ascending) from the latent, with zero noise.

    The Unsampler builds ComfyUI's schedule for ``steps`` steps at denoise 1 with ``sampler_name``/
    ``scheduler``, flips it and adds 1e-4 (:func:`unsampler_sigmas`), then samples from step 0 to
    ``last_step`` with ``cfg``, the request's prompts and the latent's noise mask; ``normalize``
    then rescales the result to mean 0 and std 1 (:func:`normalize_latent`).
    """

    end_at_step: int
    last_step: int
    steps: int
    cfg: float
    sampler_name: str
    scheduler: str
    normalize: bool


def unsampler_step(
    schedule: CycleSchedule,
    steps: int,
    start_end_at_step: int,
    end_end_at_step: int,
    cfg: float,
    sampler_name: str,
    scheduler: str,
    normalize: bool,
    cycle_index: int,
    cycle: int,
) -> UnsampleStep | None:
    """What the unsampler does before cycle c (None: nothing).

    end_at_step = int(start + (end − start)·k / T) for current step k of total T; the Unsampler
    then clamps it to steps − 1 and runs up to ``last_step = steps − min(end_at_step, steps − 1)``.
    """
    progress = _cycle_progress(schedule, cycle_index, cycle)
    if progress is None:
        return None
    current, total = progress
    end_at_step = int(start_end_at_step + (end_end_at_step - start_end_at_step) * current / total)
    last_step = steps - min(end_at_step, steps - 1)
    return UnsampleStep(
        end_at_step=end_at_step,
        last_step=last_step,
        steps=steps,
        cfg=cfg,
        sampler_name=sampler_name,
        scheduler=scheduler,
        normalize=normalize,
    )


def unsampler_sigmas(sigmas: Sequence[float], last_step: int) -> np.ndarray:
    """The Unsampler's ascending schedule: ComfyUI's sigmas (descending, ending at 0) flipped,
    plus 1e-4, cut as KSampler cuts at ``last_step`` (``sigmas[: last_step + 1]``).
    """
    ascending = np.asarray(sigmas, dtype=np.float64)[::-1] + UNSAMPLER_SIGMA_OFFSET
    if last_step < len(ascending) - 1:
        ascending = ascending[: last_step + 1]
    return ascending


def normalize_latent(latent: np.ndarray) -> np.ndarray:
    """``(x − mean) / std`` over the whole tensor; torch's std is the unbiased one (n − 1)."""
    centred = latent - latent.mean()
    return centred / centred.std(ddof=1)


# --- variation_noise (get_custom_noise) --------------------------------------------------------


def mix_variation_noise(noise: Any, variation: Any, strength: float) -> Any:
    """``((1 − s)·n(seed) + s·n(vseed)) / √((1 − s)² + s²)``: unit variance for any s in [0, 1]."""
    scale = math.sqrt((1 - strength) ** 2 + strength**2)
    return ((1 - strength) * noise + strength * variation) / scale


# --- black_patch_retry (should_retry_patch) ----------------------------------------------------


def should_retry_patch(patch: np.ndarray, mean_thresh: int, var_thresh: int) -> bool:
    """Whether a decoded crop is a black patch: grey mean ≤ mean_thresh/255 and variance ≤ var_thresh/255.

    ``patch`` is RGB [H, W, 3] (or grey [H, W]) as uint8 0–255 or floats in [0, 1]. The grey value is
    the plain channel average; the variance is torch's unbiased one, and it is compared with
    var_thresh/255 (not /255²), as the reference does.
    """
    array = np.asarray(patch)
    # float32 throughout, as the reference's tensors: a uint8 crop becomes k/255 in float32, and the
    # thresholds are compared in float32 (torch casts the Python float to the tensor's dtype)
    if array.dtype == np.uint8:
        values = array.astype(np.float32) / np.float32(255.0)
    else:
        values = array.astype(np.float32)
    if values.ndim == 4:
        if values.shape[0] != 1:
            raise ValueError(f"expected one patch, got a batch of {values.shape[0]}")
        values = values[0]
    if values.ndim == 3:
        values = values.mean(axis=-1, dtype=np.float32)
    if values.size < 2:
        raise ValueError("a patch needs at least two pixels")
    mean = values.mean(dtype=np.float32)
    variance = values.var(ddof=1, dtype=np.float32)
    return bool(mean <= np.float32(mean_thresh / 255) and variance <= np.float32(var_thresh / 255))


def retry_seeds(seg_seed: int, max_retries: int) -> list[int]:
    """Attempt r samples the face again with seed seg_seed + r (cycles add c on top), r < max_retries."""
    return [(seg_seed + retry) % SEED_MODULUS for retry in range(max_retries)]

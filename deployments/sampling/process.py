"""One KSampler run as a generator: ComfyUI's ``KSampler.sample`` → ``KSAMPLER.sample`` path.

:func:`sampling_process` is the core: it builds the sigmas, the initial noise and the noised start
latent, runs the named sampler through a :class:`~deployments.sampling.base.Denoiser` and yields a
:class:`~deployments.sampling.base.DenoiseCall` per model evaluation. Two drivers sit on top:
:func:`crop_process` (the engine's: turns calls into raw-UNet :class:`UNetRequest` s) and
:func:`sample` (standalone: a denoiser function ``D(x, σ)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from deployments.sampling.base import DenoiseCall, Denoiser, Prediction, SamplerEnv, SamplerProcess, no_device_sync
from deployments.sampling.contract import CropProcess, UNetRequest, UNetResponse, UnsupportedSamplerError
from deployments.sampling.model_sampling import ModelSampling
from deployments.sampling.noise import SEED_MODULUS, initial_noise, inpaint_random_noise
from deployments.sampling.registry import COMFY_SAMPLER_NAMES, SAMPLERS
from deployments.sampling.schedulers import (
    SCHEDULERS,
    SLICINGS,
    Slicing,
    impact_schedule,
    ksampler_sigmas,
    schedule_length,
)

__all__ = [
    "DenoiserFunction",
    "OUTPUTS",
    "Output",
    "SAMPLER_NAMES",
    "SCHEDULER_NAMES",
    "SLICINGS",
    "Slicing",
    "crop_process",
    "sample",
    "sampling_process",
    "sigmas_for",
    "validate",
]

# What we run, in ComfyUI's order.
SAMPLER_NAMES: tuple[str, ...] = tuple(name for name in COMFY_SAMPLER_NAMES if name in SAMPLERS)
SCHEDULER_NAMES: tuple[str, ...] = tuple(SCHEDULERS)
MAX_STEPS = 10000  # KSampler's own limit
# Impact's ``ksampler()`` hands these a Brownian tree over the WHOLE schedule's range (its
# ``total_sigmas``); every other sampler (dpmpp_2m_sde_heun included) is ComfyUI's own.
IMPACT_WHOLE_RANGE_TREE = frozenset(
    {"dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu"}
)

# What a run returns: "latent", the sampler's final latent (ComfyUI's KSampler); "denoised", the
# x0 the sampler last passed to ComfyUI's progress callback (Impact's ``separated_sample`` with
# ``return_with_leftover_noise`` off, FaceDetailer's path), or the final latent if it passed none.
Output = Literal["latent", "denoised"]
OUTPUTS: tuple[str, ...] = ("latent", "denoised")

# D(x, σ, need_uncond) → (cond denoised, uncond denoised or None)
DenoiserFunction = Callable[[torch.Tensor, torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor | None]]


def validate(sampler_name: str, scheduler: str, steps: int, denoise: float) -> None:
    """Raise :class:`UnsupportedSamplerError` for anything we would not run exactly as ComfyUI.

    Cheap (no model work): call it when a request arrives.
    """
    if sampler_name not in SAMPLERS:
        known = "a ComfyUI sampler we do not support yet" if sampler_name in COMFY_SAMPLER_NAMES else "unknown"
        raise UnsupportedSamplerError(
            f"sampler_name {sampler_name!r} is {known}; supported: {', '.join(SAMPLER_NAMES)}"
        )
    if scheduler not in SCHEDULERS:
        raise UnsupportedSamplerError(f"scheduler {scheduler!r} is unknown; supported: {', '.join(SCHEDULER_NAMES)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise UnsupportedSamplerError(f"steps must be an integer in 1…{MAX_STEPS}, got {steps!r}")
    if not isinstance(denoise, int | float) or not math.isfinite(denoise) or not 0.0 < denoise <= 1.0:
        raise UnsupportedSamplerError(f"denoise must be in (0, 1], got {denoise!r}")
    total = schedule_length(steps, float(denoise))
    if total > MAX_STEPS * 100:
        raise UnsupportedSamplerError(f"steps/denoise = {total} schedule steps is too long (denoise too small)")
    if scheduler == "kl_optimal" and total + int(SAMPLERS[sampler_name].discard_penultimate) < 2:
        raise UnsupportedSamplerError(
            "kl_optimal needs a schedule of at least 2 steps (ComfyUI divides by steps − 1 and returns NaN)"
        )


def sigmas_for(
    model_sampling: ModelSampling,
    sampler_name: str,
    scheduler: str,
    steps: int,
    denoise: float,
    slicing: Slicing = "ksampler",
) -> torch.Tensor:
    """The sigmas a run uses (penultimate discard and denoise cut).

    ``slicing="ksampler"``: ComfyUI's KSampler node (``KSampler.set_steps``); ``"impact"``:
    Impact Pack's ``ksampler_wrapper`` → ``separated_sample``, the path FaceDetailer samples
    through. May be empty in impact mode (Impact then returns the latent unsampled).
    """
    return _schedule(model_sampling, sampler_name, scheduler, steps, denoise, slicing)[0]


def _schedule(
    model_sampling: ModelSampling, sampler_name: str, scheduler: str, steps: int, denoise: float, slicing: str
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """(run sigmas, Brownian-tree range override or None)."""
    validate(sampler_name, scheduler, steps, denoise)
    if slicing not in SLICINGS:
        raise ValueError(f"slicing must be one of {', '.join(SLICINGS)}, got {slicing!r}")
    spec = SAMPLERS[sampler_name]
    if slicing == "ksampler":
        return ksampler_sigmas(model_sampling, scheduler, steps, float(denoise), spec.discard_penultimate), None
    sigmas, whole = impact_schedule(model_sampling, scheduler, steps, float(denoise), spec.discard_penultimate)
    tree_range = None
    positive = whole[whole > 0]
    if sampler_name in IMPACT_WHOLE_RANGE_TREE and len(positive):
        tree_range = (positive.min(), whole.max())
    return sigmas, tree_range


def prepare_mask(noise_mask: torch.Tensor | None, latent: torch.Tensor) -> torch.Tensor | None:
    """A float mask broadcastable to the latent; resized bilinearly if it is not on the latent grid."""
    if noise_mask is None:
        return None
    mask = torch.as_tensor(noise_mask, dtype=torch.float32)
    mask = mask.reshape((-1, 1) + tuple(mask.shape[-2:]))
    if tuple(mask.shape[-2:]) != tuple(latent.shape[-2:]):
        mask = F.interpolate(mask, size=tuple(latent.shape[-2:]), mode="bilinear")
    if not torch.isfinite(mask).all():
        raise ValueError("noise_mask has non-finite values")
    return mask.to(latent.device)


def sampling_process(
    model_sampling: ModelSampling,
    *,
    sampler_name: str,
    scheduler: str,
    steps: int,
    denoise: float,
    cfg: float,
    seed: int,
    latent_image: torch.Tensor,
    noise_mask: torch.Tensor | None = None,
    differential: bool = False,
    noise: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    slicing: Slicing = "ksampler",
    sigmas: torch.Tensor | None = None,
    output: Output = "latent",
    synchronize: Callable[[], None] = no_device_sync,
    on_step: Callable[[int, int, torch.Tensor], None] | None = None,
) -> SamplerProcess:
    """Validate now, and return the generator of one run's :class:`DenoiseCall` s.

    ``latent_image`` is in the model's latent space (VAE latent × scaling factor), [1, C, h, w];
    zeros for text-to-image. The generator's return value is the final latent. ``slicing``: see
    :func:`sigmas_for`; ``"impact"`` also gives Impact's six wrapped SDE samplers their Brownian
    tree over the whole schedule's sigma range. ``sigmas`` replaces the schedule altogether
    (``KSampler.sample(sigmas=...)``, e.g. the Unsampler's ascending one; the names are still
    validated, ``steps``/``denoise``/``slicing`` are then not used). ``output``: see :data:`Output`;
    an unsampled run (fewer than two sigmas) returns ``latent_image`` either way, as Impact.
    ``synchronize`` is called where the sampler reads a device value on the host
    (:attr:`SamplerEnv.synchronize`; only the simulated accelerator needs it). ``on_step(i, n,
    x0)`` is called where ComfyUI's sampler calls its progress callback (:attr:`SamplerEnv.on_step`).
    """
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
    if sigmas is None:
        sigmas, tree_range = _schedule(model_sampling, sampler_name, scheduler, steps, denoise, slicing)
    else:
        validate(sampler_name, scheduler, steps, 1.0)
        sigmas, tree_range = torch.as_tensor(sigmas).clone(), None  # uni_pc writes its last sigma
        if sigmas.ndim != 1 or not torch.isfinite(sigmas).all():
            raise ValueError(f"sigmas must be a finite 1-D schedule, got shape {tuple(sigmas.shape)}")
    if not math.isfinite(cfg):
        raise ValueError(f"cfg must be finite, got {cfg}")
    device = torch.device(device) if device is not None else latent_image.device
    latent = latent_image.to(device=device, dtype=torch.float32)
    if latent.ndim != 4:
        raise ValueError(f"latent_image must be [B, C, h, w], got {tuple(latent.shape)}")
    seed = int(seed) % SEED_MODULUS
    if noise is None:
        noise = initial_noise(latent.shape, seed)
    elif tuple(noise.shape) != tuple(latent.shape):
        raise ValueError(f"noise {tuple(noise.shape)} does not match the latent {tuple(latent.shape)}")
    if tree_range is not None:
        tree_range = (tree_range[0].to(device), tree_range[1].to(device))
    return _run(model_sampling, sampler_name, sigmas.to(device), cfg, seed, latent, prepare_mask(noise_mask, latent),
                differential, noise.to(device=device, dtype=torch.float32), tree_range, output,
                synchronize, on_step)  # fmt: skip


def _run(
    model_sampling: ModelSampling,
    sampler_name: str,
    sigmas: torch.Tensor,
    cfg: float,
    seed: int,
    latent: torch.Tensor,
    mask: torch.Tensor | None,
    differential: bool,
    noise: torch.Tensor,
    tree_range: tuple[torch.Tensor, torch.Tensor] | None = None,
    output: Output = "latent",
    synchronize: Callable[[], None] = no_device_sync,
    on_step: Callable[[int, int, torch.Tensor], None] | None = None,
) -> SamplerProcess:
    spec = SAMPLERS[sampler_name]
    if len(sigmas) <= 1:
        return latent
    if spec.inpaint_random_noise:
        inpaint_noise = inpaint_random_noise(noise.shape, seed).to(noise.device)
    else:
        inpaint_noise = noise
    model = Denoiser(
        model_sampling,
        cfg=cfg,
        sigmas=sigmas,
        latent_image=latent,
        inpaint_noise=inpaint_noise,
        denoise_mask=mask,
        differential=differential and mask is not None,
        always_uncond=spec.needs_uncond,
    )
    max_denoise = _is_max_denoise(model_sampling, sigmas)
    x = model_sampling.noise_scaling(sigmas[0], noise, latent, max_denoise)
    env = SamplerEnv(
        model_sampling=model_sampling,
        seed=seed,
        brownian_range=tree_range,
        synchronize=synchronize,
        on_step=on_step,
        total_steps=len(sigmas) - 1,
    )
    samples = yield from spec.function(model, x, sigmas, env)
    if output == "denoised" and env.last_denoised is not None:
        return env.last_denoised  # Impact: process_latent_out(x0) only; no inverse noise scaling
    return model_sampling.inverse_noise_scaling(sigmas[-1], samples)


def _is_max_denoise(model_sampling: ModelSampling, sigmas: torch.Tensor) -> bool:
    """``Sampler.max_denoise``: the run starts at (or above) the model's sigma_max."""
    max_sigma, sigma = float(model_sampling.sigma_max), float(sigmas[0])
    return math.isclose(max_sigma, sigma, rel_tol=1e-05) or sigma > max_sigma


def crop_process(
    model_sampling: ModelSampling,
    *,
    sampler_name: str,
    scheduler: str,
    steps: int,
    denoise: float,
    cfg: float,
    seed: int,
    latent_image: torch.Tensor,
    noise_mask: torch.Tensor | None,
    differential: bool,
    noise: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    slicing: Slicing = "ksampler",
    sigmas: torch.Tensor | None = None,
    output: Output = "latent",
    synchronize: Callable[[], None] = no_device_sync,
    on_step: Callable[[int, int, torch.Tensor], None] | None = None,
) -> CropProcess:
    """The engine's view of one crop's KSampler run: yields :class:`UNetRequest`, returns the latent.

    ``output="denoised"`` returns the last callback x0 instead (Impact's choice, see :data:`Output`).

    Raises :class:`UnsupportedSamplerError` / ``ValueError`` at once (not at the first ``next``).
    """
    core = sampling_process(
        model_sampling,
        sampler_name=sampler_name,
        scheduler=scheduler,
        steps=steps,
        denoise=denoise,
        cfg=cfg,
        seed=seed,
        latent_image=latent_image,
        noise_mask=noise_mask,
        differential=differential,
        noise=noise,
        device=device,
        slicing=slicing,
        sigmas=sigmas,
        output=output,
        synchronize=synchronize,
        on_step=on_step,
    )
    return _unet_driver(model_sampling, core)


def _unet_driver(model_sampling: ModelSampling, core: SamplerProcess) -> CropProcess:
    """Translate denoiser calls into raw UNet requests (c_in, timestep) and outputs back (c_out)."""
    try:
        call = next(core)
        while True:
            request = UNetRequest(
                x_in=model_sampling.calculate_input(call.sigma, call.x),
                timestep=float(model_sampling.timestep(call.sigma)),
                sigma=float(call.sigma),
                uncond=call.uncond,
            )
            response = yield request
            call = core.send(_prediction(model_sampling, call, response))
    except StopIteration as stop:
        return stop.value


def _prediction(model_sampling: ModelSampling, call: DenoiseCall, response: UNetResponse) -> Prediction:
    for name, output in (("cond", response.cond), ("uncond", response.uncond)):
        if output is not None and tuple(output.shape) != tuple(call.x.shape):
            raise ValueError(f"UNet {name} output {tuple(output.shape)} does not match its input {tuple(call.x.shape)}")
    cond = model_sampling.calculate_denoised(call.sigma, response.cond.float(), call.x)
    if not call.uncond:
        return Prediction(cond=cond)
    if response.uncond is None:
        raise ValueError("the request asked for the uncond output and the response has none")
    return Prediction(cond=cond, uncond=model_sampling.calculate_denoised(call.sigma, response.uncond.float(), call.x))


def drive(process: SamplerProcess, denoiser: DenoiserFunction) -> torch.Tensor:
    """Run a :func:`sampling_process` to the end with a denoiser function."""
    try:
        call = next(process)
        while True:
            cond, uncond = denoiser(call.x, call.sigma, call.uncond)
            call = process.send(Prediction(cond=cond, uncond=uncond if call.uncond else None))
    except StopIteration as stop:
        return stop.value


def sample(
    denoiser: DenoiserFunction,
    sigma_table: ModelSampling | torch.Tensor | Sequence[float],
    *,
    sampler_name: str = "euler",
    scheduler: str = "normal",
    steps: int = 20,
    denoise: float = 1.0,
    cfg: float = 1.0,
    seed: int = 0,
    latent_image: torch.Tensor | None = None,
    noise_mask: torch.Tensor | None = None,
    differential: bool = False,
    shape: Sequence[int] = (1, 4, 8, 8),
    prediction_type: str = "epsilon",
    table_kind: str = "alphas_cumprod",
    noise: torch.Tensor | None = None,
    slicing: Slicing = "ksampler",
    output: Output = "latent",
) -> torch.Tensor:
    """Standalone KSampler: ComfyUI's sampling of ``denoiser`` with these settings → final latent.

    ``denoiser(x, sigma, need_uncond)`` returns the denoised (x0) predictions for the positive
    and, when ``need_uncond``, the negative conditioning (else ``None``); x is the model input
    in the VE view (before c_in), sigma a 0-dim tensor. ``sigma_table`` is a
    :class:`ModelSampling`, or the model's ``alphas_cumprod`` (``table_kind="alphas_cumprod"``)
    or its 1000 sigmas (``table_kind="sigmas"``). Without ``latent_image`` the run starts from a
    zero latent of ``shape`` (text-to-image).
    """
    if isinstance(sigma_table, ModelSampling):
        model_sampling = sigma_table
    elif table_kind == "alphas_cumprod":
        model_sampling = ModelSampling.from_alphas_cumprod(torch.as_tensor(sigma_table), prediction_type)
    elif table_kind == "sigmas":
        model_sampling = ModelSampling(torch.as_tensor(sigma_table, dtype=torch.float64), prediction_type)
    else:
        raise ValueError(f"table_kind must be 'alphas_cumprod' or 'sigmas', got {table_kind!r}")
    latent = latent_image if latent_image is not None else torch.zeros(tuple(shape))
    process = sampling_process(
        model_sampling,
        sampler_name=sampler_name,
        scheduler=scheduler,
        steps=steps,
        denoise=denoise,
        cfg=cfg,
        seed=seed,
        latent_image=latent,
        noise_mask=noise_mask,
        differential=differential,
        noise=noise,
        slicing=slicing,
        output=output,
    )
    return drive(process, denoiser)


def unsupported_names() -> list[str]:
    """ComfyUI sampler names we refuse (documented in docs/samplers.md)."""
    return [name for name in COMFY_SAMPLER_NAMES if name not in SAMPLERS]


__all__ += ["drive", "prepare_mask", "unsupported_names", "UnsupportedSamplerError"]

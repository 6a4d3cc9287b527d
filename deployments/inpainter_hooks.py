"""The detailer hooks whose hook points are inside sampling, as the inpainter's engine stages.

For cycle ``c`` of ``cycle`` of one crop, in the reference's order (§6.6, §9):

1. ``cycle_latent``: each noise injection / unsampler hook, in list order, changes the latent
   the cycle starts from — each one a stage of its own (:func:`hook_stages`). Noise injection
   needs no model call; the unsampler is a sampler run over an ascending schedule, whose UNet
   calls batch with every other crop's like any cycle's.
2. ``pre_ksample``: the cycle's settings (:func:`hooked_cycle`; the denoise schedule). A cycle
   whose denoise reaches 0 samples nothing (the reference divides by zero there).
3. ``get_custom_noise``: the cycle's initial noise (:func:`cycle_noise`; variation noise).

The arithmetic is the pure core's (:mod:`facedetailer.hooks`, :mod:`facedetailer.cycle_hooks`);
this module does the tensor work. The crop's result never depends on which crops it shares
UNet calls with: every stage depends only on the crop's own latent, mask, seed and hooks.
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Sequence
from typing import Any

import torch

from deployments.sampling import crop_process, sigmas_for, validate
from deployments.sampling.inpaint import inpaint_concat
from deployments.sampling.noise import initial_noise
from facedetailer.cycle_hooks import UNSAMPLER_SIGMA_OFFSET, NoiseInjectionStep, UnsampleStep, inject_noise
from facedetailer.hooks import CycleSettings, DetailerHooks, UnsamplerHook, VariationNoiseHook

__all__ = [
    "INJECTED_NOISE_CHANNELS",
    "check_cycle_plan",
    "cycle_noise",
    "hook_stages",
    "hooked_cycle",
    "injection_noise",
    "unsampler_schedule",
]

logger = logging.getLogger(__name__)

SEED_MODULUS = 2**64
INJECTED_NOISE_CHANNELS = 4  # ComfyUI Noise's NoisyLatentImage always draws 4 latent channels


def hooked_cycle(hooks: DetailerHooks, settings: Any, seed: int, cycle_index: int) -> dict[str, Any]:
    """The fields of cycle c's ``CycleSpec``: settings after ``pre_ksample`` and its ``cycle_latent`` steps."""
    cycle_seed = (seed + cycle_index) % SEED_MODULUS
    values = CycleSettings(
        seed=cycle_seed,
        steps=settings.steps,
        cfg=settings.cfg,
        sampler_name=settings.sampler_name,
        scheduler=settings.scheduler,
        denoise=settings.denoise,
    )
    if hooks:
        values = hooks.pre_ksample(values, cycle_index, settings.cycle)
    return {
        "sampler_name": values.sampler_name,
        "scheduler": values.scheduler,
        "steps": values.steps,
        "denoise": values.denoise,
        "cfg": values.cfg,
        "seed": values.seed,
        "latent_steps": tuple(hooks.cycle_latent_steps(cycle_index, settings.cycle)) if hooks else (),
        "noise_seed": cycle_seed,
    }


def check_cycle_plan(settings: Any) -> None:
    """Refuse, before any model work, a cycle or an unsampler that could not run as ComfyUI runs it.

    Cheap (no model): the ingress calls it when a request arrives, the inpainter again per call.
    An unsampler's names are checked even when no cycle would run it (a bad name is bad input).
    """
    hooks = DetailerHooks.of(settings.detailer_hooks)
    for index, hook in enumerate(hooks.hooks):
        if isinstance(hook, UnsamplerHook):
            try:
                validate(hook.sampler_name, hook.scheduler, hook.steps, 1.0)
            except ValueError as error:
                raise type(error)(f"detailer_hooks[{index}] unsampler: {error}") from None
    for number in range(settings.cycle):
        spec = hooked_cycle(hooks, settings, 0, number)
        if spec["denoise"] > 0.0:
            try:
                validate(spec["sampler_name"], spec["scheduler"], spec["steps"], spec["denoise"])
            except ValueError as error:
                raise type(error)(f"cycle {number} (after the detailer hooks): {error}") from None


# --- get_custom_noise --------------------------------------------------------------------------


def cycle_noise(hooks: Sequence[Any], spec: Any, latent: torch.Tensor) -> torch.Tensor | None:
    """The cycle's initial noise: the spec's, the variation hooks' mix, or None (the sampler's randn(seed))."""
    if spec.noise is not None:
        return spec.noise
    combined = DetailerHooks.of(hooks)
    if not any(isinstance(hook, VariationNoiseHook) for hook in combined.hooks):
        return None
    shape = tuple(latent.shape)
    return combined.custom_noise(spec.noise_seed, lambda seed: initial_noise(shape, seed))


# --- cycle_latent ------------------------------------------------------------------------------


def hook_stages(inpainter: Any, spec: Any) -> list[Any]:
    """The engine stages of a cycle's ``cycle_latent`` steps, in order."""
    stages: list[Any] = []
    for step in spec.latent_steps:
        if isinstance(step, NoiseInjectionStep):
            stages.append(NoiseInjectionStage(step, inpainter.device))
        elif isinstance(step, UnsampleStep):
            stages.append(UnsampleStage(inpainter, step, spec.noise_seed))
        else:  # pragma: no cover - the hook types are a closed union
            raise TypeError(f"unknown cycle_latent step {type(step).__name__}")
    return stages


def injection_noise(shape: Sequence[int], seed: int, source: str, device: torch.device | str) -> torch.Tensor:
    """NoisyLatentImage: ``manual_seed(seed)`` then a float32 ``randn`` on the CPU or the torch device, moved to CPU.

    ``source="GPU"`` draws on the replica's device, as ComfyUI draws on its torch device; on a
    GPU-less replica that is the CPU, exactly what ComfyUI does on a machine without a GPU.
    """
    draw_on = torch.device(device) if source == "GPU" else torch.device("cpu")
    generator = torch.Generator(draw_on).manual_seed(int(seed) % SEED_MODULUS)
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32, device=draw_on).cpu()


class NoiseInjectionStage:
    """InjectNoise: latent + strength·noise where the noise mask is (no model call)."""

    def __init__(self, step: NoiseInjectionStep, device: torch.device | str) -> None:
        self.step, self.device = step, device

    def __call__(self, crop: Any, latent: torch.Tensor) -> Generator[Any, Any, torch.Tensor]:
        batch, channels, height, width = latent.shape
        if channels != INJECTED_NOISE_CHANNELS:
            raise ValueError(
                f"noise_injection draws {INJECTED_NOISE_CHANNELS}-channel latent noise (ComfyUI Noise); "
                f"this model's latent has {channels}"
            )
        noise = injection_noise((batch, channels, height, width), self.step.seed, self.step.source, self.device)
        mask = crop.state.get("mask")
        injected = inject_noise(latent, noise.to(latent.device), self.step.strength, mask)
        yield from ()
        return injected


def unsampler_schedule(model_sampling: Any, step: UnsampleStep) -> torch.Tensor:
    """The Unsampler's sigmas: KSampler's at denoise 1, flipped, + 1e-4, cut at ``last_step``.

    Done in the schedule's own dtype (float32), as ComfyUI does it on its tensor.
    """
    descending = sigmas_for(model_sampling, step.sampler_name, step.scheduler, step.steps, 1.0)
    ascending = descending.flip(0) + UNSAMPLER_SIGMA_OFFSET
    if step.last_step < len(ascending) - 1:
        ascending = ascending[: step.last_step + 1]
    return ascending


class UnsampleStage:
    """The Unsampler: the sampler run from the latent up an ascending schedule with zero noise.

    Reference (ComfyUI Noise's ``Unsampler`` as Impact's hook calls it): the request's prompts
    and cfg of the hook, the latent's noise mask (without differential diffusion: the hook's
    model is not the detailer's patched one), ``normalize`` rescales the result to mean 0,
    std 1. The reference passes no seed (an ancestral sampler's noise is then unseeded); we seed
    it with the cycle's seed so a request reproduces.
    """

    def __init__(self, inpainter: Any, step: UnsampleStep, seed: int) -> None:
        self.inpainter, self.step, self.seed = inpainter, step, seed

    def __call__(self, crop: Any, latent: torch.Tensor) -> Generator[Any, Any, torch.Tensor]:
        step = self.step
        if crop.state.get("concat_per_cycle"):  # an inpainting UNet's concat_cond from this run's input
            crop.state["concat"] = inpaint_concat(latent, crop.state["mask"])
        process = crop_process(
            self.inpainter.model_sampling,
            sampler_name=step.sampler_name,
            scheduler=step.scheduler,
            steps=step.steps,
            denoise=1.0,
            cfg=step.cfg,
            seed=self.seed,
            latent_image=latent,
            noise_mask=crop.state.get("mask"),
            differential=False,
            noise=torch.zeros_like(latent, device="cpu"),
            device=self.inpainter.device,
            sigmas=unsampler_schedule(self.inpainter.model_sampling, step),
            synchronize=self.inpainter.synchronize,
        )
        return _normalized(process) if step.normalize else process


def _normalized(process: Generator[Any, Any, torch.Tensor]) -> Generator[Any, Any, torch.Tensor]:
    latent = yield from process
    centred = latent - latent.mean()
    return centred / centred.std()  # torch's unbiased std, as the reference

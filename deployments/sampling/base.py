"""What every sampler is built on: the denoiser a sampler calls, and the per-run environment.

A sampler is a generator function ``sampler(model, x, sigmas, env)``: where a k-diffusion sampler
would call ``denoised = model(x, sigma)`` it writes ``denoised = yield from model(x, sigma)``.
:class:`Denoiser` is ComfyUI's ``KSamplerX0Inpaint`` around its CFG ``sampling_function``: at
EVERY model call it blends x with the noised original outside the (per-step) mask, asks for the
cond (and uncond) denoised predictions by yielding a :class:`DenoiseCall`, combines them with cfg,
and replaces the prediction outside the mask with the original latent.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass

import torch

from deployments.sampling.model_sampling import ModelSampling
from deployments.sampling.noise import NoiseSampler, brownian_tree_noise, gaussian_noise

__all__ = [
    "DenoiseCall",
    "Denoiser",
    "Prediction",
    "SamplerEnv",
    "SamplerFunction",
    "SamplerProcess",
    "ancestral_step",
    "model_half_log_snr",
    "model_sigma_from_half_log_snr",
    "offset_first_sigma",
    "to_d",
]


@dataclass(frozen=True)
class DenoiseCall:
    """One model evaluation at the sampler level: x is the model input before c_in."""

    x: torch.Tensor
    sigma: torch.Tensor  # 0-dim float32
    uncond: bool  # also predict with the negative conditioning


@dataclass(frozen=True)
class Prediction:
    """Denoised (x0) predictions for a :class:`DenoiseCall`."""

    cond: torch.Tensor
    uncond: torch.Tensor | None = None


SamplerProcess = Generator[DenoiseCall, Prediction, torch.Tensor]


class Denoiser:
    """``KSamplerX0Inpaint`` ∘ cfg: what a sampler calls as ``model(x, sigma)``.

    ``uncond_denoised`` holds the last call's unguided prediction (cfg++ samplers read it; it is
    NOT replaced outside the mask, as in ComfyUI's post-cfg hook).
    """

    def __init__(
        self,
        model_sampling: ModelSampling,
        *,
        cfg: float,
        sigmas: torch.Tensor,
        latent_image: torch.Tensor,
        inpaint_noise: torch.Tensor,
        denoise_mask: torch.Tensor | None,
        differential: bool,
        always_uncond: bool,
    ) -> None:
        self.model_sampling = model_sampling
        self.cfg = float(cfg)
        self.sigmas = sigmas
        self.latent_image = latent_image
        self.inpaint_noise = inpaint_noise
        self.denoise_mask = denoise_mask
        self.differential = differential
        # cfg == 1 skips the uncond evaluation, unless the sampler needs the uncond prediction.
        self.use_uncond = always_uncond or not math.isclose(self.cfg, 1.0)
        self.uncond_denoised: torch.Tensor | None = None
        self.calls = 0

    def step_mask(self, sigma: torch.Tensor) -> torch.Tensor | None:
        """The denoise mask at this sigma: the mask itself, or differential diffusion's binary cut."""
        mask = self.denoise_mask
        if mask is None or not self.differential:
            return mask
        return differential_mask(self.model_sampling, self.sigmas, sigma, mask)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float) -> SamplerProcess:
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(())
        mask = self.step_mask(sigma)
        keep = None
        if mask is not None:
            keep = 1.0 - mask
            noised = self.model_sampling.noise_scaling(sigma, self.inpaint_noise, self.latent_image)
            x = x * mask + noised * keep
        prediction = yield DenoiseCall(x=x, sigma=sigma, uncond=self.use_uncond)
        self.calls += 1
        if self.use_uncond:
            if prediction.uncond is None:
                raise ValueError("the sampler asked for the uncond prediction and got none")
            uncond = prediction.uncond
            denoised = uncond + (prediction.cond - uncond) * self.cfg
        else:
            uncond = None
            denoised = prediction.cond * self.cfg  # ComfyUI: 0 + (cond − 0) · cfg, cfg ≈ 1
        self.uncond_denoised = uncond
        if mask is not None:
            denoised = denoised * mask + self.latent_image * keep
        return denoised


def differential_mask(
    model_sampling: ModelSampling, sigmas: torch.Tensor, sigma: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """ComfyUI's DifferentialDiffusion (strength 1): ``mask >= threshold`` as a 0/1 mask.

    threshold = (t(σ) − t(σ_to)) / (t(σ_from) − t(σ_to)) in whole timesteps, σ_from the run's first
    sigma and σ_to its last (at least sigma_min): 1 at the first step, 0 at sigma_min, so a cell
    joins the denoising once its mask value reaches the threshold and every cell (mask 0
    included) takes the final step to sigma 0 when the last evaluated sigma is sigma_min.
    """
    sigma_to = model_sampling.sigma_min
    if sigmas[-1] > sigma_to:
        sigma_to = sigmas[-1]
    ts_from = model_sampling.timestep(sigmas[0])
    ts_to = model_sampling.timestep(sigma_to)
    current = model_sampling.timestep(sigma.reshape(-1)[0])
    threshold = (current - ts_to) / (ts_from - ts_to)
    return (mask >= threshold.to(mask.device)).to(mask.dtype)


def no_device_sync() -> None:
    """The device-sync hook of real devices: torch synchronises by itself where the host reads."""


@dataclass
class SamplerEnv:
    """Per-run facts a sampler may need besides the model: model sampling, seed, noise sources."""

    model_sampling: ModelSampling
    seed: int
    # (sigma_min, sigma_max) of the Brownian tree when it is not the run's own range (Impact's
    # SDE samplers take the whole schedule's range); None: the run's sigmas, as ComfyUI.
    brownian_range: tuple[torch.Tensor, torch.Tensor] | None = None
    # The x0 ComfyUI's sampler last passed to its progress callback (``callback({"denoised": …})``):
    # what Impact's ``separated_sample`` returns. None until the sampler reports one.
    last_denoised: torch.Tensor | None = None
    # Called before the sampler reads a device value on the host (``float(t)``, ``.cpu()``): where
    # a CUDA replica synchronises. A no-op for torch devices (CUDA syncs inside those reads by
    # itself); the ``sim://`` accelerator, whose results exist before its modelled time has
    # passed, waits there until its device is idle.
    synchronize: Callable[[], None] = no_device_sync
    # Told of each callback as ComfyUI's progress bar is: (steps reported so far, the run's
    # steps, that step's x0). None: nobody listens (the default; costs nothing).
    on_step: Callable[[int, int, torch.Tensor], None] | None = None
    total_steps: int = 0
    steps_reported: int = 0

    def report(self, denoised: torch.Tensor) -> None:
        """Where the ComfyUI sampler calls its callback: remember the x0 it hands over."""
        self.last_denoised = denoised
        self.steps_reported += 1
        if self.on_step is not None:
            self.on_step(min(self.steps_reported, self.total_steps), self.total_steps, denoised)

    def gaussian_noise(self, x: torch.Tensor) -> NoiseSampler:
        return gaussian_noise(x, self.seed)

    def read(self, value: torch.Tensor) -> float:
        """A device scalar on the host (a synchronisation point)."""
        self.synchronize()
        return float(value)

    def brownian_noise(self, x: torch.Tensor, sigmas: torch.Tensor, cpu: bool) -> NoiseSampler:
        if cpu:
            self.synchronize()  # the tree is built from a host copy of a device tensor
        if self.brownian_range is not None:
            return brownian_tree_noise(x, *self.brownian_range, self.seed, cpu=cpu)
        positive = sigmas[sigmas > 0]
        return brownian_tree_noise(x, positive.min(), sigmas.max(), self.seed, cpu=cpu)


SamplerFunction = Callable[[Denoiser, torch.Tensor, torch.Tensor, SamplerEnv], SamplerProcess]


# ---------------------------------------------------------------------- shared math


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The Karras ODE derivative dx/dσ = (x − D(x; σ)) / σ."""
    return (x - denoised) / sigma


def ancestral_step(
    sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor | float]:
    """(σ_down, σ_up) of an ancestral step: deterministic part to σ_down, fresh noise of σ_up.

    σ_up is the smaller of σ_to and the ancestral spread the way Python's ``min`` picks it (as
    k-diffusion does): σ_to unless the spread is smaller, so a NaN spread (σ_from = ∞, a CONST
    model's α = 0 at σ = 1 in the cfg++ step) gives σ_to, not NaN.
    """
    if not eta:
        return sigma_to, 0.0
    spread = eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    sigma_up = spread if spread < sigma_to else sigma_to
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def half_log_snr(sigma: torch.Tensor) -> torch.Tensor:
    """λ = log(α/σ) in the VE view, −log σ: what the samplers without a CONST branch always use."""
    return sigma.log().neg()


def sigma_from_half_log_snr(lam: torch.Tensor) -> torch.Tensor:
    return lam.neg().exp()


# ComfyUI's model-aware conversions (k_diffusion.sampling.sigma_to_half_log_snr & co.), used by the
# samplers that call them there: the DPM++ SDE family, euler(_ancestral)_cfg_pp, er_sde, seeds_2/3
# (exp_heun_2_x0) and sa_solver. A CONST (rectified-flow) model has α = 1 − σ.


def model_half_log_snr(model_sampling: ModelSampling, sigma: torch.Tensor) -> torch.Tensor:
    """λ = log(α/σ): −log σ for eps/v, log((1 − σ)/σ) = −logit σ for CONST."""
    if model_sampling.is_const:
        return sigma.logit().neg()
    return sigma.log().neg()


def model_sigma_from_half_log_snr(model_sampling: ModelSampling, lam: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`model_half_log_snr`: e^−λ, or sigmoid(−λ) for CONST."""
    if model_sampling.is_const:
        return lam.neg().sigmoid()
    return lam.neg().exp()


def offset_first_sigma(model_sampling: ModelSampling, sigmas: torch.Tensor, percent: float = 1e-4) -> torch.Tensor:
    """A CONST run starting at σ ≥ 1 (λ = −∞) starts at ``percent_to_sigma(1e-4)`` instead.

    Returns a copy when it changes anything (the model calls of that sampler then use it; the
    noise mask's differential schedule and the Brownian tree keep the original, as in ComfyUI).
    """
    if len(sigmas) <= 1 or not model_sampling.is_const or not sigmas[0] >= 1:
        return sigmas
    sigmas = sigmas.clone()
    sigmas[0] = model_sampling.percent_to_sigma(percent)
    return sigmas

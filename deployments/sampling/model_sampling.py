"""The noise table of a discrete-time SD model, and its conversions, as ComfyUI computes them.

ComfyUI's ``ModelSamplingDiscrete`` turns a model's 1000 training betas into a float32 table of
sigmas (the k-diffusion "VE" view, x = x0 + σ·ε) and feeds the UNet the whole timestep whose
log-sigma is nearest to the current sigma. Everything here reproduces that arithmetic, in the
same dtypes (float64 betas → float32 table), so sigma grids and timesteps match to the bit.

Build one from a diffusers ``scheduler_config.json`` (:meth:`ModelSampling.from_scheduler_config`),
from ``alphas_cumprod`` or from a sigma table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["ModelSampling", "PREDICTION_TYPES"]

# diffusers ``prediction_type`` values we can convert to a denoised prediction.
PREDICTION_TYPES = ("epsilon", "v_prediction")


def _betas(schedule: str, count: int, start: float, end: float) -> torch.Tensor:
    """Training betas in float64 under diffusers' schedule names (ComfyUI's names in comments)."""
    if schedule == "scaled_linear":  # ComfyUI "linear": linear in sqrt(beta)
        return torch.linspace(start**0.5, end**0.5, count, dtype=torch.float64) ** 2
    if schedule == "linear":  # ComfyUI "sqrt_linear"
        return torch.linspace(start, end, count, dtype=torch.float64)
    if schedule == "squaredcos_cap_v2":  # the cosine schedule, betas capped at 0.999

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / count) / alpha_bar(i / count), 0.999) for i in range(count)]
        return torch.from_numpy(np.array(betas, dtype=np.float64))
    raise ValueError(f"unsupported beta_schedule {schedule!r} (scaled_linear, linear, squaredcos_cap_v2)")


def _rescale_zero_terminal_snr(sigmas: torch.Tensor) -> torch.Tensor:
    """Zero-terminal-SNR rescaling (Lin et al. 2023) in sigma space, with ComfyUI's finite last value."""
    alphas_bar_sqrt = (1 / (sigmas * sigmas + 1)).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas_bar[-1] = 4.8973451890853435e-08
    return ((1 - alphas_bar) / alphas_bar) ** 0.5


_TIMESTEP_MEMO_SIZE = 4096  # distinct scalar sigmas remembered by ModelSampling.timestep


class ModelSampling:
    """Sigma table and the model's input/output conversions (eps or v prediction).

    ``sigmas[t]`` is the float32 sigma of training timestep t (ascending). All methods take and
    return tensors like ComfyUI's, so callers can mirror its arithmetic exactly.
    """

    sigma_data = 1.0

    def __init__(self, sigmas: torch.Tensor, prediction_type: str = "epsilon") -> None:
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"unsupported prediction_type {prediction_type!r}; supported: {', '.join(PREDICTION_TYPES)}"
            )
        if sigmas.ndim != 1 or sigmas.numel() < 2:
            raise ValueError("need a 1-D table of at least 2 sigmas")
        self.prediction_type = prediction_type
        # ComfyUI keeps float32 sigmas and float32(log(sigma)) taken before the cast.
        self.sigmas = sigmas.float()
        self.log_sigmas = sigmas.log().float()
        self._timestep_memo: dict[tuple[float, tuple[int, ...], str], torch.Tensor] = {}
        # calculate_sigmas' schedules by (scheduler, steps): a service sees the same few settings
        self.schedule_memo: dict[tuple[str, int], torch.Tensor] = {}

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon") -> ModelSampling:
        alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        return cls(((1 - alphas_cumprod) / alphas_cumprod) ** 0.5, prediction_type)

    @classmethod
    def from_betas(cls, betas: torch.Tensor, prediction_type: str = "epsilon", zero_snr: bool = False) -> ModelSampling:
        alphas_cumprod = torch.cumprod(1.0 - torch.as_tensor(betas, dtype=torch.float64), dim=0)
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        if zero_snr:
            sigmas = _rescale_zero_terminal_snr(sigmas)
        return cls(sigmas, prediction_type)

    @classmethod
    def from_scheduler_config(cls, config: Mapping[str, Any]) -> ModelSampling:
        """From a diffusers scheduler config (``beta_start``, ``beta_end``, ``beta_schedule``, …).

        Missing keys take the SD 1.x values ComfyUI also defaults to (scaled_linear 0.00085 →
        0.012 over 1000 steps, epsilon prediction).
        """
        prediction_type = str(config.get("prediction_type") or "epsilon")
        trained = config.get("trained_betas")
        if trained is not None:
            betas = torch.tensor(list(trained), dtype=torch.float64)
        else:
            betas = _betas(
                str(config.get("beta_schedule") or "scaled_linear"),
                int(config.get("num_train_timesteps") or 1000),
                float(config.get("beta_start", 0.00085)),
                float(config.get("beta_end", 0.012)),
            )
        return cls.from_betas(betas, prediction_type, zero_snr=bool(config.get("rescale_betas_zero_snr", False)))

    # ------------------------------------------------------------------ table

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The training timestep (int64) whose log-sigma is nearest: what the UNet is fed."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        if sigma.numel() != 1:
            return self._nearest_timesteps(sigma)
        # A run asks for the same few sigmas at every evaluation (the step's, differential
        # diffusion's first and last): remember them instead of searching the table each time.
        key = (float(sigma), tuple(sigma.shape), str(sigma.device))
        found = self._timestep_memo.get(key)
        if found is None:
            if len(self._timestep_memo) >= _TIMESTEP_MEMO_SIZE:
                self._timestep_memo.clear()
            found = self._timestep_memo[key] = self._nearest_timesteps(sigma)
        return found.clone()

    def _nearest_timesteps(self, sigma: torch.Tensor) -> torch.Tensor:
        distances = sigma.log().to(self.log_sigmas.device).reshape(1, -1) - self.log_sigmas[:, None]
        return distances.abs().argmin(dim=0).view(sigma.shape).to(sigma.device)

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        """Sigma at a (fractional) timestep, interpolated linearly in log-sigma."""
        timestep = torch.as_tensor(timestep)
        t = torch.clamp(timestep.float().to(self.log_sigmas.device), min=0, max=len(self.sigmas) - 1)
        low, high, weight = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - weight) * self.log_sigmas[low] + weight * self.log_sigmas[high]).exp().to(timestep.device)

    def sigma_values(self, timesteps: torch.Tensor) -> list[float]:
        """``[float(self.sigma(t)) for t in timesteps]``, bit for bit, at a fraction of the cost.

        The clamp, floor/ceil/frac, gathers, products and sum are exact or correctly rounded
        float32 operations, the same for one element as for many; ``exp`` is not (PyTorch
        computes a lone element with the scalar libm routine, a longer tensor with a vectorised
        one), so it runs element by element, as ComfyUI's per-timestep calls do.
        """
        t = torch.clamp(torch.as_tensor(timesteps).float().cpu(), min=0, max=len(self.sigmas) - 1)
        low, high, weight = t.floor().long(), t.ceil().long(), t.frac()
        log_sigmas = self.log_sigmas.cpu()
        exponents = (1 - weight) * log_sigmas[low] + weight * log_sigmas[high]
        return [float(exponent.exp()) for exponent in exponents]

    def percent_to_sigma(self, percent: float) -> float:
        """Sigma at a fraction of the sampling run (ControlNet/conditioning start and end)."""
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return float(self.sigma(torch.tensor((1.0 - percent) * 999.0)).item())

    # ------------------------------------------------------------------ conversions

    def calculate_input(self, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """c_in: the UNet sees x / √(σ² + σ_data²)."""
        sigma = _like(sigma, x)
        return x / (sigma**2 + self.sigma_data**2) ** 0.5

    def calculate_denoised(self, sigma: torch.Tensor, model_output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The x0 prediction from the raw UNet output at model input x (before c_in)."""
        sigma = _like(sigma, model_output)
        if self.prediction_type == "v_prediction":
            total = sigma**2 + self.sigma_data**2
            return x * self.sigma_data**2 / total - model_output * sigma * self.sigma_data / total**0.5
        return x - model_output * sigma

    def noise_scaling(
        self, sigma: torch.Tensor, noise: torch.Tensor, latent_image: torch.Tensor, max_denoise: bool = False
    ) -> torch.Tensor:
        """The latent noised to sigma; at full denoise the noise is scaled by √(1 + σ²) instead of σ."""
        sigma = _like(sigma, noise)
        scaled = noise * torch.sqrt(1.0 + sigma**2.0) if max_denoise else noise * sigma
        return scaled + latent_image

    def inverse_noise_scaling(self, sigma: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """Identity for eps/v models (flow models would undo their scaling here)."""
        return latent


def _like(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """A scalar or per-sample sigma shaped to broadcast against x (ComfyUI's reshape_sigma)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    if sigma.numel() == 1:
        return sigma.reshape(())
    return sigma.reshape(sigma.shape[:1] + (1,) * (x.ndim - 1))

"""A model's noise table and its input/output conversions, as ComfyUI's ``comfy/model_sampling.py``.

ComfyUI composes a model's sampling from two parts (``model_base.model_sampling``), and so do we
(:meth:`ModelSampling.from_comfy`):

- the *kind*, how sigmas relate to the timesteps the model is fed:

  ``"discrete"`` (``ModelSamplingDiscrete``, SD 1.x/2.x/XL)
      1000 training betas → a float32 table of sigmas in the k-diffusion "VE" view
      (x = x0 + σ·ε); the model gets the whole timestep whose log-sigma is nearest. Settings
      ``beta_schedule`` (ComfyUI's ``make_beta_schedule`` names: ``"linear"`` — what diffusers
      calls ``scaled_linear`` —, ``"sqrt_linear"`` — diffusers' ``linear`` —, ``"cosine"``,
      ``"sqrt"``), ``linear_start`` 0.00085, ``linear_end`` 0.012, ``timesteps`` 1000, and
      ``zsnr`` (rescaled to zero terminal SNR, ComfyUI's last sigma ≈ 4518.8 instead of ∞).
  ``"discrete_flow"`` (``ModelSamplingDiscreteFlow``, SD3/3.5, AuraFlow, Flux.1 schnell)
      σ(t) = shift·t / (1 + (shift − 1)·t) on t = k/1000, k = 1…1000; the model gets
      σ·``multiplier``. SD3/3.5: shift 3, multiplier 1000; AuraFlow: 1.73, 1; Flux.1 schnell: 1, 1.
  ``"flux"`` (``ModelSamplingFlux``, Flux.1 dev and Fill)
      σ(t) = e^shift / (e^shift + 1/t − 1) on t = k/10000, k = 1…10000; the model gets σ.
      Flux.1 dev/Fill: shift 1.15 (ComfyUI's default; its ``ModelSamplingFlux`` node computes
      another one from the image size, :func:`flux_shift`).

- the *prediction*, what the model outputs: ``"eps"`` (``EPS``), ``"v_prediction"``
  (``V_PREDICTION``), ``"const"`` (``CONST``, rectified flow: the model input is x itself, x0 =
  x − σ·out, the start latent is σ·noise + (1 − σ)·latent and the end divides by 1 − σ_last).
  ComfyUI builds eps/v on ``discrete`` and const on the flow kinds; those are the combinations
  accepted here. Samplers that branch on CONST read :attr:`ModelSampling.is_const`.

Everything is computed in ComfyUI's dtypes and order of operations, so tables, timesteps and
conversions match it to the bit (measured by ``benchmarks/comfy_parity.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = [
    "BETA_SCHEDULES",
    "COMFY_MODELS",
    "DiscreteFlowModelSampling",
    "FluxModelSampling",
    "KINDS",
    "KIND_PREDICTIONS",
    "ModelSampling",
    "PREDICTIONS",
    "PREDICTION_TYPES",
    "flux_shift",
]

KINDS: tuple[str, ...] = ("discrete", "discrete_flow", "flux")
PREDICTIONS: tuple[str, ...] = ("eps", "v_prediction", "const")
# The combinations ComfyUI builds (model_base.model_sampling and the ModelSampling* nodes).
KIND_PREDICTIONS: dict[str, tuple[str, ...]] = {
    "discrete": ("eps", "v_prediction"),
    "discrete_flow": ("const",),
    "flux": ("const",),
}
# ComfyUI's make_beta_schedule names that ModelSamplingDiscrete can run.
BETA_SCHEDULES: tuple[str, ...] = ("linear", "sqrt_linear", "cosine", "sqrt")
# diffusers ``prediction_type`` values (and ComfyUI's names) the plain constructor accepts.
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction")
_PREDICTION_NAMES = {"epsilon": "eps", "eps": "eps", "v_prediction": "v_prediction", "const": "const"}

# ComfyUI's supported_models settings per model class: (kind, prediction, settings). SD/SDXL
# checkpoints marked v-prediction (``v_pred``/``ztsnr`` keys) take prediction="v_prediction"
# (and zsnr=True) as overrides, as ComfyUI's model detection does.
COMFY_MODELS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "SD15": ("discrete", "eps", {}),
    "SD20": ("discrete", "eps", {}),
    "SDXL": ("discrete", "eps", {}),
    "SD3": ("discrete_flow", "const", {"shift": 3.0, "multiplier": 1000}),
    "AuraFlow": ("discrete_flow", "const", {"shift": 1.73, "multiplier": 1.0}),
    "Flux": ("flux", "const", {"shift": 1.15}),
    "FluxInpaint": ("flux", "const", {"shift": 1.15}),
    "FluxSchnell": ("discrete_flow", "const", {"shift": 1.0, "multiplier": 1.0}),
}

_DISCRETE_DEFAULTS: dict[str, Any] = {
    "beta_schedule": "linear",
    "linear_start": 0.00085,
    "linear_end": 0.012,
    "timesteps": 1000,
    "zsnr": False,
}
_COSINE_S = 8e-3  # ComfyUI passes cosine_s=8e-3 to make_beta_schedule


def _comfy_betas(schedule: str, count: int, start: float, end: float) -> torch.Tensor:
    """ComfyUI's ``make_beta_schedule`` (float64) for the schedules ModelSamplingDiscrete can run."""
    if schedule == "linear":  # linear in sqrt(beta): diffusers' scaled_linear
        return torch.linspace(start**0.5, end**0.5, count, dtype=torch.float64) ** 2
    if schedule == "sqrt_linear":  # linear in beta: diffusers' linear
        return torch.linspace(start, end, count, dtype=torch.float64)
    if schedule == "sqrt":
        return torch.linspace(start, end, count, dtype=torch.float64) ** 0.5
    if schedule == "cosine":  # Nichol & Dhariwal's alpha-bar, betas clamped to [0, 0.999]
        positions = torch.arange(count + 1, dtype=torch.float64) / count + _COSINE_S
        angles = positions / (1 + _COSINE_S) * np.pi / 2
        alphas = torch.cos(angles).pow(2)
        alphas = alphas / alphas[0]
        return torch.clamp(1 - alphas[1:] / alphas[:-1], min=0, max=0.999)
    hint = " (ComfyUI's 'linear' is diffusers' scaled_linear)" if schedule == "scaled_linear" else ""
    raise ValueError(f"unsupported beta_schedule {schedule!r}{hint}; supported: {', '.join(BETA_SCHEDULES)}")


def _betas(schedule: str, count: int, start: float, end: float) -> torch.Tensor:
    """Training betas in float64 under diffusers' schedule names (ComfyUI's names in comments)."""
    if schedule == "scaled_linear":  # ComfyUI "linear"
        return _comfy_betas("linear", count, start, end)
    if schedule == "linear":  # ComfyUI "sqrt_linear"
        return _comfy_betas("sqrt_linear", count, start, end)
    if schedule == "squaredcos_cap_v2":  # diffusers' cosine (ComfyUI's own raises for this name)

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / count) / alpha_bar(i / count), 0.999) for i in range(count)]
        return torch.from_numpy(np.array(betas, dtype=np.float64))
    raise ValueError(f"unsupported beta_schedule {schedule!r} (scaled_linear, linear, squaredcos_cap_v2)")


def _diffusers_to_comfy_schedule(schedule: str) -> str | None:
    return {"scaled_linear": "linear", "linear": "sqrt_linear"}.get(schedule)


def _rescale_zero_terminal_snr(sigmas: torch.Tensor) -> torch.Tensor:
    """Zero-terminal-SNR rescaling (Lin et al. 2023) in sigma space, with ComfyUI's finite last value."""
    alphas_bar_sqrt = (1 / (sigmas * sigmas + 1)).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas_bar[-1] = 4.8973451890853435e-08
    return ((1 - alphas_bar) / alphas_bar) ** 0.5


def flux_shift(max_shift: float = 1.15, base_shift: float = 0.5, width: int = 1024, height: int = 1024) -> float:
    """The shift ComfyUI's ``ModelSamplingFlux`` node sets: linear in the image's 2×2-patch count.

    base_shift at 256 patches (256² pixels), max_shift at 4096 (1024²), extrapolated beyond.
    """
    slope = (max_shift - base_shift) / (4096 - 256)
    return (width * height / (8 * 8 * 2 * 2)) * slope + (base_shift - slope * 256)


def _check_settings(kind: str, settings: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {kind} setting(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")


_TIMESTEP_MEMO_SIZE = 4096  # distinct scalar sigmas remembered by ModelSampling.timestep


class ModelSampling:
    """ComfyUI's model sampling: sigma table, model timesteps and the prediction's conversions.

    The class itself is ``ModelSamplingDiscrete`` (``ModelSampling(sigmas, prediction_type)`` takes
    a table of training sigmas); :class:`DiscreteFlowModelSampling` and
    :class:`FluxModelSampling` are the flow kinds. Build any of them with :meth:`from_comfy`,
    :meth:`for_comfy_model` or :meth:`from_scheduler_config`. ``sigmas[t]`` is the float32 sigma
    of table index t (ascending). All methods take and return tensors like ComfyUI's, so callers
    can mirror its arithmetic exactly.
    """

    kind = "discrete"
    sigma_data = 1.0

    def __init__(self, sigmas: torch.Tensor, prediction_type: str = "epsilon") -> None:
        if prediction_type not in ("epsilon", "eps", "v_prediction"):
            raise ValueError(
                f"unsupported prediction_type {prediction_type!r} for a discrete model sampling; "
                f"supported: {', '.join(PREDICTION_TYPES)}"
            )
        if sigmas.ndim != 1 or sigmas.numel() < 2:
            raise ValueError("need a 1-D table of at least 2 sigmas")
        # ComfyUI keeps float32 sigmas and float32(log(sigma)) taken before the cast.
        self._setup(sigmas.float(), _PREDICTION_NAMES[prediction_type], {})
        self.log_sigmas = sigmas.log().float()
        self._timestep_memo: dict[tuple[float, tuple[int, ...], str], torch.Tensor] = {}

    def _setup(self, sigmas: torch.Tensor, prediction: str, settings: dict[str, Any]) -> None:
        self.prediction = prediction
        self.sigmas = sigmas
        self.settings = settings
        # calculate_sigmas' schedules by (scheduler, steps): a service sees the same few settings
        self.schedule_memo: dict[tuple[str, int], torch.Tensor] = {}

    # ------------------------------------------------------------------ constructors

    @staticmethod
    def from_comfy(kind: str, prediction: str, **settings: Any) -> ModelSampling:
        """ComfyUI's model sampling class ``kind`` with ``prediction``, as its model configs set them.

        ``discrete``: ``beta_schedule``, ``linear_start``, ``linear_end``, ``timesteps``, ``zsnr``;
        ``discrete_flow``: ``shift`` (1.0), ``multiplier`` (1000); ``flux``: ``shift`` (1.15).
        Missing settings take ComfyUI's defaults. Raises ``ValueError`` for a kind, prediction,
        combination or setting ComfyUI does not build.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown model sampling kind {kind!r}; supported: {', '.join(KINDS)}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; supported: {', '.join(PREDICTIONS)}")
        if prediction not in KIND_PREDICTIONS[kind]:
            combos = "; ".join(f"{k}: {', '.join(p)}" for k, p in KIND_PREDICTIONS.items())
            raise ValueError(f"ComfyUI does not build {kind!r} with {prediction!r} prediction; it builds {combos}")
        if kind == "discrete_flow":
            _check_settings(kind, settings, ("shift", "multiplier"))
            return DiscreteFlowModelSampling(**settings)
        if kind == "flux":
            _check_settings(kind, settings, ("shift",))
            return FluxModelSampling(**settings)
        _check_settings(kind, settings, tuple(_DISCRETE_DEFAULTS))
        merged = {**_DISCRETE_DEFAULTS, **settings}
        count = int(merged["timesteps"])
        if count < 2:
            raise ValueError(f"timesteps must be at least 2, got {merged['timesteps']!r}")
        betas = _comfy_betas(
            str(merged["beta_schedule"]), count, float(merged["linear_start"]), float(merged["linear_end"])
        )
        merged = {**merged, "timesteps": count, "zsnr": bool(merged["zsnr"])}
        return ModelSampling._discrete(betas, prediction, merged)

    @classmethod
    def for_comfy_model(cls, model_class: str, **overrides: Any) -> ModelSampling:
        """The model sampling ComfyUI gives a ``supported_models`` class (``"SD3"``, ``"Flux"``,
        ``"FluxSchnell"``…, see :data:`COMFY_MODELS`); ``overrides`` may set ``prediction`` or settings."""
        if model_class not in COMFY_MODELS:
            raise ValueError(f"unknown ComfyUI model class {model_class!r}; known: {', '.join(COMFY_MODELS)}")
        kind, prediction, settings = COMFY_MODELS[model_class]
        prediction = overrides.pop("prediction", prediction)
        return cls.from_comfy(kind, prediction, **{**settings, **overrides})

    @staticmethod
    def _discrete(betas: torch.Tensor, prediction: str, settings: dict[str, Any]) -> ModelSampling:
        """ComfyUI's ``_register_schedule`` from float64 betas."""
        alphas_cumprod = torch.cumprod(1.0 - torch.as_tensor(betas, dtype=torch.float64), dim=0)
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        if settings.get("zsnr"):
            sigmas = _rescale_zero_terminal_snr(sigmas)
        sampling = ModelSampling(sigmas, prediction)
        sampling.settings = settings
        return sampling

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon") -> ModelSampling:
        alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        return ModelSampling(((1 - alphas_cumprod) / alphas_cumprod) ** 0.5, prediction_type)

    @classmethod
    def from_betas(cls, betas: torch.Tensor, prediction_type: str = "epsilon", zero_snr: bool = False) -> ModelSampling:
        if prediction_type not in _PREDICTION_NAMES or _PREDICTION_NAMES[prediction_type] == "const":
            supported = ", ".join(PREDICTION_TYPES)
            raise ValueError(f"unsupported prediction_type {prediction_type!r}; supported: {supported}")
        settings = {"timesteps": int(torch.as_tensor(betas).numel()), "zsnr": bool(zero_snr)}
        return ModelSampling._discrete(torch.as_tensor(betas), _PREDICTION_NAMES[prediction_type], settings)

    @classmethod
    def from_scheduler_config(
        cls, config: Mapping[str, Any], *, prediction: str | None = None, **overrides: Any
    ) -> ModelSampling:
        """From a diffusers ``scheduler_config.json``, mapped to the kind ComfyUI uses for that model.

        - A flow-matching config (``FlowMatch*`` class, or ``shift`` / ``use_dynamic_shifting``
          keys): with ``use_dynamic_shifting`` (Flux.1 dev/Fill) → ``flux`` with shift =
          ``max_shift`` (diffusers' μ at the largest image, ComfyUI's Flux default 1.15);
          without (SD3/3.5, Flux.1 schnell) → ``discrete_flow`` with its ``shift`` and
          multiplier 1000 — Flux.1 schnell's transformer takes σ itself: pass ``multiplier=1.0``
          (ComfyUI's FluxSchnell setting).
        - Otherwise ``discrete`` from ``beta_start``, ``beta_end``, ``beta_schedule``,
          ``num_train_timesteps``, ``trained_betas``, ``prediction_type`` (epsilon,
          v_prediction) and ``rescale_betas_zero_snr`` (→ zsnr). Missing keys take the SD 1.x
          values ComfyUI also defaults to (scaled_linear 0.00085 → 0.012 over 1000 steps, eps).

        ``prediction`` and ``overrides`` (settings of :meth:`from_comfy`, e.g. ``zsnr=True`` for an
        SDXL v-prediction finetune whose files do not say it) replace what the config gives.
        """
        if _is_flow_config(config):
            if config.get("shift_terminal") or config.get("time_shift_type", "exponential") != "exponential":
                raise ValueError(
                    "flow-matching configs with shift_terminal or a linear time shift have no ComfyUI "
                    "model sampling; supported: fixed shift (discrete_flow) or exponential dynamic shift (flux)"
                )
            if config.get("use_dynamic_shifting"):
                kind, settings = "flux", {"shift": float(config.get("max_shift", 1.15))}
            else:
                kind, settings = "discrete_flow", {"shift": float(config.get("shift", 1.0)), "multiplier": 1000}
            return cls.from_comfy(kind, prediction or "const", **{**settings, **overrides})
        config_prediction = str(config.get("prediction_type") or "epsilon")
        if config_prediction not in PREDICTION_TYPES:
            raise ValueError(
                f"unsupported prediction_type {config_prediction!r}; supported: {', '.join(PREDICTION_TYPES)}"
            )
        prediction = prediction or _PREDICTION_NAMES[config_prediction]
        schedule = str(config.get("beta_schedule") or "scaled_linear")
        count = int(config.get("num_train_timesteps") or 1000)
        start, end = float(config.get("beta_start", 0.00085)), float(config.get("beta_end", 0.012))
        zsnr = bool(config.get("rescale_betas_zero_snr", False))
        comfy_schedule = _diffusers_to_comfy_schedule(schedule)
        if config.get("trained_betas") is None and comfy_schedule is not None:
            settings = {"beta_schedule": comfy_schedule, "linear_start": start, "linear_end": end,
                        "timesteps": count, "zsnr": zsnr}  # fmt: skip
            return cls.from_comfy("discrete", prediction, **{**settings, **overrides})
        # trained betas, or diffusers' own cosine: a table ComfyUI's settings cannot name
        _check_settings("discrete (given betas)", overrides, ("zsnr",))
        if config.get("trained_betas") is not None:
            betas = torch.tensor(list(config["trained_betas"]), dtype=torch.float64)
            described = "trained_betas"
        else:
            betas = _betas(schedule, count, start, end)
            described = f"diffusers {schedule}"
        zsnr = bool(overrides.get("zsnr", zsnr))
        if prediction not in KIND_PREDICTIONS["discrete"]:
            raise ValueError(f"a discrete table takes eps or v_prediction, not {prediction!r}")
        settings = {"beta_schedule": described, "timesteps": int(betas.numel()), "zsnr": zsnr}
        return ModelSampling._discrete(betas, prediction, settings)

    # ------------------------------------------------------------------ description

    @property
    def is_const(self) -> bool:
        """ComfyUI's ``isinstance(model_sampling, CONST)``: a rectified-flow model."""
        return self.prediction == "const"

    def describe(self) -> dict[str, Any]:
        """kind, prediction and settings (JSON-able), e.g. for ``GET /v1/info``."""
        return {"kind": self.kind, "prediction": self.prediction, **self.settings,
                "sigma_min": float(self.sigma_min), "sigma_max": float(self.sigma_max)}  # fmt: skip

    def __repr__(self) -> str:
        settings = ", ".join(f"{key}={value!r}" for key, value in self.settings.items())
        return f"ModelSampling({self.kind}, {self.prediction}{', ' if settings else ''}{settings})"

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
        """Sigma at a fraction of the sampling run (ControlNet/conditioning start and end, SA-Solver)."""
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return float(self.sigma(torch.tensor((1.0 - percent) * 999.0)).item())

    # ------------------------------------------------------------------ conversions

    def calculate_input(self, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """c_in: eps/v models see x / √(σ² + σ_data²); const (flow) models see x itself."""
        if self.is_const:
            return x
        sigma = _like(sigma, x)
        return x / (sigma**2 + self.sigma_data**2) ** 0.5

    def calculate_denoised(self, sigma: torch.Tensor, model_output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The x0 prediction from the raw model output at model input x (before c_in)."""
        sigma = _like(sigma, model_output)
        if self.prediction == "v_prediction":
            total = sigma**2 + self.sigma_data**2
            return x * self.sigma_data**2 / total - model_output * sigma * self.sigma_data / total**0.5
        return x - model_output * sigma  # eps: noise; const: velocity (noise − x0)

    def noise_scaling(
        self, sigma: torch.Tensor, noise: torch.Tensor, latent_image: torch.Tensor, max_denoise: bool = False
    ) -> torch.Tensor:
        """The latent noised to sigma.

        eps/v: latent + σ·noise (√(1 + σ²)·noise at full denoise); const: σ·noise + (1 − σ)·latent.
        """
        sigma = _like(sigma, noise)
        if self.is_const:
            return sigma * noise + (1.0 - sigma) * latent_image
        scaled = noise * torch.sqrt(1.0 + sigma**2.0) if max_denoise else noise * sigma
        return scaled + latent_image

    def inverse_noise_scaling(self, sigma: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """The end of a run: identity for eps/v; const divides by 1 − σ_last (1 when it ends at 0)."""
        if self.is_const:
            return latent / (1.0 - _like(sigma, latent))
        return latent


class DiscreteFlowModelSampling(ModelSampling):
    """ComfyUI's ``ModelSamplingDiscreteFlow`` (always with CONST prediction).

    Table: σ(k/1000 · multiplier), k = 1…1000, σ(t) = shift·t / (1 + (shift − 1)·t) on t =
    timestep / multiplier; the model is fed σ·multiplier.
    """

    kind = "discrete_flow"

    def __init__(self, shift: float = 1.0, multiplier: float = 1000) -> None:
        shift, multiplier = float(shift), float(multiplier)
        if not math.isfinite(shift) or shift <= 0 or not math.isfinite(multiplier) or multiplier <= 0:
            raise ValueError(f"shift and multiplier must be positive and finite, got {shift!r}, {multiplier!r}")
        self.shift, self.multiplier = shift, multiplier
        table = self.sigma((torch.arange(1, 1000 + 1, 1) / 1000) * multiplier)
        self._setup(table, "const", {"shift": shift, "multiplier": multiplier})

    def _shifted(self, t: Any) -> Any:
        """ComfyUI's ``time_snr_shift(shift, t)`` (tensor or float)."""
        if self.shift == 1.0:
            return t
        return self.shift * t / (1 + (self.shift - 1) * t)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """σ·multiplier (a float32 tensor)."""
        return torch.as_tensor(sigma, dtype=torch.float32) * self.multiplier

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        return self._shifted(torch.as_tensor(timestep, dtype=torch.float32) / self.multiplier)

    def sigma_values(self, timesteps: torch.Tensor) -> list[float]:
        return [float(self.sigma(t)) for t in torch.as_tensor(timesteps)]

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return float(self._shifted(1.0 - percent))


class FluxModelSampling(ModelSampling):
    """ComfyUI's ``ModelSamplingFlux`` (always with CONST prediction).

    Table: σ(k/10000), k = 1…10000, σ(t) = e^shift / (e^shift + (1/t − 1)); the model is fed σ.
    """

    kind = "flux"

    def __init__(self, shift: float = 1.15) -> None:
        shift = float(shift)
        if not math.isfinite(shift):
            raise ValueError(f"shift must be finite, got {shift!r}")
        self.shift = shift
        table = self.sigma(torch.arange(1, 10000 + 1, 1) / 10000)
        self._setup(table, "const", {"shift": shift})

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """σ itself."""
        return torch.as_tensor(sigma, dtype=torch.float32)

    def _time_shift(self, t: Any) -> Any:
        """ComfyUI's ``flux_time_shift(shift, 1.0, t)`` (tensor or float), in its order of operations."""
        return math.exp(self.shift) / (math.exp(self.shift) + (1 / t - 1) ** 1.0)

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        return self._time_shift(torch.as_tensor(timestep, dtype=torch.float32))

    def sigma_values(self, timesteps: torch.Tensor) -> list[float]:
        return [float(self.sigma(t)) for t in torch.as_tensor(timesteps)]

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return float(self._time_shift(1.0 - percent))


def _is_flow_config(config: Mapping[str, Any]) -> bool:
    name = str(config.get("_class_name") or "")
    return name.startswith("FlowMatch") or "shift" in config or "use_dynamic_shifting" in config


def _like(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """A scalar or per-sample sigma shaped to broadcast against x (ComfyUI's reshape_sigma)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    if sigma.numel() == 1:
        return sigma.reshape(())
    return sigma.reshape(sigma.shape[:1] + (1,) * (x.ndim - 1))

"""ComfyUI ``sampler_name`` / ``scheduler`` names → diffusers scheduler configurations.

ComfyUI splits a sampler into an algorithm (``sampler_name``) and a noise schedule
(``scheduler``); diffusers puts both in one scheduler class plus config flags. Every supported
pair is built here from the checkpoint's own scheduler config (beta schedule, prediction type),
so the mapping is the only thing that changes. ``docs/samplers.md`` documents the table and
where a mapping is exact or only close. A name or pair without a faithful mapping is rejected
with the supported names: never replaced by something else.
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import diffusers
import numpy as np

# One error class across the old mapping and deployments.sampling, which replaces this module.
from deployments.sampling import UnsupportedSamplerError  # noqa: E402


@dataclass(frozen=True)
class SamplerSpec:
    """How one ComfyUI sampler maps onto a diffusers scheduler class."""

    scheduler_class: str
    options: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    # Draws fresh noise inside ``step`` (ancestral / SDE samplers).
    stochastic: bool = False
    # ``step`` draws its noise with diffusers' ``randn_tensor``, which accepts one generator per
    # sample; otherwise each sample is stepped with its own scheduler instance.
    per_sample_generators: bool = True
    # ComfyUI schedule name → config flags for this class (None: the k-diffusion-style
    # ``SCHEDULES``, each kept where the class has the flags).
    schedules: Mapping[str, Mapping[str, Any]] | None = None
    # A module the diffusers class needs (checked at start-up, never installed).
    requires: str | None = None


CUSTOM_TIMESTEPS = "_custom_timesteps"
# ComfyUI schedule name → scheduler config flags for the k-diffusion-style classes (Euler, Heun,
# DPM2, LMS) and DDIM/DDPM, whose "linspace" spacing is ComfyUI's "normal" (t = 999 … 0 in
# T equal steps, then sigma 0). It also gives the Karras / exponential / beta conversions
# ComfyUI's sigma_max … sigma_min range. A ``CUSTOM_TIMESTEPS`` entry names a grid computed
# here exactly as ComfyUI does and given to ``set_timesteps(timesteps=…)``.
SCHEDULES: dict[str, dict[str, Any]] = {
    "normal": {"timestep_spacing": "linspace"},
    "karras": {"timestep_spacing": "linspace", "use_karras_sigmas": True},
    "exponential": {"timestep_spacing": "linspace", "use_exponential_sigmas": True},
    "sgm_uniform": {"timestep_spacing": "trailing"},
    "simple": {"timestep_spacing": "trailing"},
    "ddim_uniform": {"timestep_spacing": "leading", "steps_offset": 1},
    # diffusers' use_beta_sigmas spaces a beta distribution in sigma; ComfyUI's in timesteps,
    # so its exact grid is passed as custom timesteps (only to classes that accept them).
    "beta": {CUSTOM_TIMESTEPS: "beta"},
}
# The multistep solvers (DPM-Solver++, DEIS, UniPC) space timesteps differently: their "linspace"
# is linspace(999, 0, T + 1)[:-1], i.e. ComfyUI's sgm_uniform, and their "leading" matches
# nothing in ComfyUI. "normal" needs custom timesteps, which only DPM-Solver++ accepts.
MULTISTEP_SCHEDULES: dict[str, dict[str, Any]] = {
    "karras": SCHEDULES["karras"],
    "exponential": SCHEDULES["exponential"],
    "sgm_uniform": {"timestep_spacing": "linspace"},
    "simple": {"timestep_spacing": "trailing"},
    "beta": SCHEDULES["beta"],
}
DPMSOLVER_SCHEDULES: dict[str, dict[str, Any]] = {
    "normal": {CUSTOM_TIMESTEPS: "normal"},
    **MULTISTEP_SCHEDULES,
}
# LCM always samples its own 50-step distillation grid, evenly skipped from t = 999: the
# trailing-style schedules are the ComfyUI names that describe it.
LCM_SCHEDULES: dict[str, dict[str, Any]] = {"sgm_uniform": {}, "simple": {}}

# Insertion order is the order reported to clients (ComfyUI's list order).
SAMPLERS: dict[str, SamplerSpec] = {
    "euler": SamplerSpec("EulerDiscreteScheduler", description="Euler (k-diffusion sample_euler)"),
    "euler_ancestral": SamplerSpec(
        "EulerAncestralDiscreteScheduler", description="Euler ancestral, eta 1", stochastic=True
    ),
    "heun": SamplerSpec("HeunDiscreteScheduler", description="Heun 2nd order (2 evaluations per step)"),
    "dpm_2": SamplerSpec("KDPM2DiscreteScheduler", description="DPM-Solver-2 (k-diffusion sample_dpm_2)"),
    "dpm_2_ancestral": SamplerSpec(
        "KDPM2AncestralDiscreteScheduler", description="DPM-Solver-2 ancestral", stochastic=True
    ),
    "lms": SamplerSpec("LMSDiscreteScheduler", description="linear multistep, order 4"),
    "dpmpp_sde": SamplerSpec(
        "DPMSolverSDEScheduler",
        description="DPM-Solver++ SDE with a Brownian-tree noise sampler (needs torchsde)",
        stochastic=True,
        per_sample_generators=False,  # seeded through config.noise_sampler_seed, one tree per scheduler
        requires="torchsde",
    ),
    "dpmpp_2m": SamplerSpec(
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2},
        schedules=DPMSOLVER_SCHEDULES,
        description="DPM-Solver++(2M), first-order final step",
    ),
    "dpmpp_2m_sde": SamplerSpec(
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "solver_type": "midpoint"},
        schedules=DPMSOLVER_SCHEDULES,
        description="DPM-Solver++(2M) SDE, midpoint, eta 1 (Gaussian noise instead of a Brownian tree)",
        stochastic=True,
    ),
    "ddpm": SamplerSpec("DDPMScheduler", description="DDPM ancestral sampling", stochastic=True),
    "lcm": SamplerSpec(
        "LCMScheduler",
        description="latent consistency sampling on LCM's 50-step distillation grid",
        stochastic=True,
        schedules=LCM_SCHEDULES,
    ),
    "deis": SamplerSpec(
        "DEISMultistepScheduler", {"solver_order": 3}, description="DEIS, order 3", schedules=MULTISTEP_SCHEDULES
    ),
    # ComfyUI's "ddim" is Euler on the same ODE; DDIM with eta 0 ending at alpha 1 is that step.
    "ddim": SamplerSpec("DDIMScheduler", {"set_alpha_to_one": True}, description="DDIM, eta 0, final step to sigma 0"),
    "uni_pc": SamplerSpec(
        "UniPCMultistepScheduler",
        {"solver_type": "bh1"},
        description="UniPC, B(h) = h (bh1)",
        schedules=MULTISTEP_SCHEDULES,
    ),
    "uni_pc_bh2": SamplerSpec(
        "UniPCMultistepScheduler",
        {"solver_type": "bh2"},
        description="UniPC, B(h) = e^h − 1 (bh2)",
        schedules=MULTISTEP_SCHEDULES,
    ),
}

# Flags that must be switched off unless the schedule sets them (a repository's scheduler
# config may turn one on, e.g. use_karras_sigmas in a DPM++ config).
_SIGMA_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
_SCHEDULE_REQUIREMENTS = {"beta": "scipy"}


def _available(module: str | None) -> bool:
    return module is None or importlib.util.find_spec(module) is not None


def _scheduler_class(class_name: str) -> type:
    return getattr(diffusers, class_name)


def _init_parameters(class_name: str) -> set[str]:
    return set(inspect.signature(_scheduler_class(class_name).__init__).parameters)


def supported_samplers() -> list[str]:
    """Sampler names this installation can run (dpmpp_sde only with torchsde)."""
    return [name for name, spec in SAMPLERS.items() if _available(spec.requires)]


def supported_schedulers() -> list[str]:
    """Every schedule name at least one supported sampler can run."""
    return [name for name in SCHEDULES if _available(_SCHEDULE_REQUIREMENTS.get(name))]


def _schedule_table(spec: SamplerSpec) -> dict[str, Mapping[str, Any]]:
    """The schedules ``spec``'s class can represent, with their flags."""
    cls = _scheduler_class(spec.scheduler_class)
    parameters = _init_parameters(spec.scheduler_class)
    accepts_timesteps = "timesteps" in inspect.signature(cls.set_timesteps).parameters
    table = spec.schedules if spec.schedules is not None else SCHEDULES
    return {
        name: flags
        for name, flags in table.items()
        if _available(_SCHEDULE_REQUIREMENTS.get(name))
        and all(key in parameters or (key == CUSTOM_TIMESTEPS and accepts_timesteps) for key in flags)
    }


def schedulers_for(sampler_name: str) -> list[str]:
    """The schedule names ``sampler_name`` supports, in ``SCHEDULES`` order."""
    table = _schedule_table(SAMPLERS[sampler_name])
    return [name for name in SCHEDULES if name in table]


def sampler_spec(sampler_name: str, scheduler: str) -> SamplerSpec:
    """Check a pair; raise :class:`UnsupportedSamplerError` naming what is supported."""
    samplers = supported_samplers()
    if sampler_name not in samplers:
        spec = SAMPLERS.get(sampler_name)
        missing = f" (needs the {spec.requires!r} package, not installed)" if spec and spec.requires else ""
        raise UnsupportedSamplerError(
            f"unsupported sampler_name {sampler_name!r}{missing}; supported: {', '.join(samplers)}"
        )
    schedulers = supported_schedulers()
    if scheduler not in schedulers:
        raise UnsupportedSamplerError(f"unsupported scheduler {scheduler!r}; supported: {', '.join(schedulers)}")
    allowed = schedulers_for(sampler_name)
    if scheduler not in allowed:
        spec = SAMPLERS[sampler_name]
        raise UnsupportedSamplerError(
            f"sampler {sampler_name!r} cannot use scheduler {scheduler!r}: diffusers' {spec.scheduler_class} "
            f"has no faithful equivalent (see docs/samplers.md); with {sampler_name!r} use one of: "
            f"{', '.join(allowed)}"
        )
    return SAMPLERS[sampler_name]


def build_scheduler(
    base_config: Mapping[str, Any],
    sampler_name: str,
    scheduler: str,
    overrides: Mapping[str, Any] | None = None,
) -> Any:
    """A fresh diffusers scheduler for the pair, keeping the checkpoint's noise schedule.

    Fresh per call because schedulers are stateful (step index, multistep history). Only the
    class's own parameters are taken from ``base_config`` (beta schedule, prediction type, …).
    """
    spec = sampler_spec(sampler_name, scheduler)
    parameters = _init_parameters(spec.scheduler_class)
    config = {key: value for key, value in base_config.items() if key in parameters}
    config.update({flag: False for flag in _SIGMA_FLAGS if flag in parameters})
    config.update(spec.options)
    flags = _schedule_table(spec)[scheduler]
    config.update({key: value for key, value in flags.items() if key != CUSTOM_TIMESTEPS})
    config.update({key: value for key, value in (overrides or {}).items() if key in parameters})
    instance = _scheduler_class(spec.scheduler_class).from_config(config)
    instance.comfy_custom_timesteps = flags.get(CUSTOM_TIMESTEPS)
    return instance


def comfy_timesteps(schedule: str, total_steps: int, num_train_timesteps: int) -> np.ndarray:
    """ComfyUI's timestep grid for the schedules passed as custom timesteps (descending, integers).

    normal: t = linspace(999, 0, T), rounded to the training grid (ComfyUI keeps it fractional);
    beta: t = rint(Beta(0.6, 0.6).ppf(1 − i/T) · 999), consecutive repeats dropped, as ComfyUI.
    """
    last = num_train_timesteps - 1
    if schedule == "normal":
        return np.linspace(last, 0, total_steps).round().astype(np.int64)
    if schedule == "beta":
        import scipy.stats

        quantiles = 1.0 - np.linspace(0.0, 1.0, total_steps, endpoint=False)
        grid = np.rint(scipy.stats.beta.ppf(quantiles, 0.6, 0.6) * last).astype(np.int64)
        return grid[np.concatenate([[True], grid[1:] != grid[:-1]])]
    raise ValueError(f"no custom timestep grid for {schedule!r}")


def set_timesteps(scheduler: Any, total_steps: int, device: Any = None) -> int:
    """Set the T-step schedule; return how many steps it has (fewer only if ComfyUI's grid dedups).

    Use this instead of ``scheduler.set_timesteps`` so that custom-grid schedules are honoured.
    """
    custom = getattr(scheduler, "comfy_custom_timesteps", None)
    if custom is None:
        scheduler.set_timesteps(total_steps, device=device)
        return total_steps
    grid = comfy_timesteps(custom, total_steps, scheduler.config.num_train_timesteps)
    scheduler.set_timesteps(timesteps=grid.tolist(), device=device)
    return len(grid)

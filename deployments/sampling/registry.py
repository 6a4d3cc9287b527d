"""ComfyUI sampler names → our generator samplers, with what KSampler does around each.

``COMFY_SAMPLER_NAMES`` is ComfyUI's ``SAMPLER_NAMES`` of a current release (KSAMPLER_NAMES +
ddim, uni_pc, uni_pc_bh2), in its order; ``SAMPLERS`` holds the ones we run. A name ComfyUI has
and we do not is refused by :func:`deployments.sampling.validate`, never approximated.
"""

from __future__ import annotations

from dataclasses import dataclass

from deployments.sampling import dpm_solver, unipc
from deployments.sampling import samplers_cfgpp as cfgpp
from deployments.sampling import samplers_dpmpp as dpmpp
from deployments.sampling import samplers_euler as euler
from deployments.sampling import samplers_multistep as multistep
from deployments.sampling.base import SamplerFunction

__all__ = ["COMFY_SAMPLER_NAMES", "SAMPLERS", "SamplerSpec"]

COMFY_SAMPLER_NAMES: tuple[str, ...] = (
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2",
    "exp_heun_2_x0", "exp_heun_2_x0_sde", "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive",
    "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m",
    "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu",
    "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm", "ipndm_v", "deis", "res_multistep",
    "res_multistep_cfg_pp", "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "gradient_estimation",
    "gradient_estimation_cfg_pp", "er_sde", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece",
    "ddim", "uni_pc", "uni_pc_bh2",
)  # fmt: skip


@dataclass(frozen=True)
class SamplerSpec:
    """One ComfyUI sampler name: the function and the KSampler options that go with it."""

    function: SamplerFunction
    # KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS: schedule one step more, drop the 2nd-to-last sigma.
    discard_penultimate: bool = False
    # cfg++ samplers read the unguided prediction, so cfg = 1 still evaluates the uncond.
    needs_uncond: bool = False
    # ComfyUI's "ddim" = euler with inpaint_options {"random": True}: outside the mask the latent
    # is re-noised with CPU noise from seed + 1 instead of the initial noise.
    inpaint_random_noise: bool = False
    # Draws noise during sampling (its result depends on the seed beyond the initial noise).
    stochastic: bool = False


_ancestral = {"stochastic": True}
SAMPLERS: dict[str, SamplerSpec] = {
    "euler": SamplerSpec(euler.euler),
    "euler_cfg_pp": SamplerSpec(cfgpp.euler_cfg_pp, needs_uncond=True),
    "euler_ancestral": SamplerSpec(euler.euler_ancestral, **_ancestral),
    "euler_ancestral_cfg_pp": SamplerSpec(cfgpp.euler_ancestral_cfg_pp, needs_uncond=True, **_ancestral),
    "heun": SamplerSpec(euler.heun),
    "heunpp2": SamplerSpec(euler.heunpp2),
    "exp_heun_2_x0": SamplerSpec(multistep.exp_heun_2_x0),
    "exp_heun_2_x0_sde": SamplerSpec(multistep.exp_heun_2_x0_sde, **_ancestral),
    "dpm_2": SamplerSpec(euler.dpm_2, discard_penultimate=True),
    "dpm_2_ancestral": SamplerSpec(euler.dpm_2_ancestral, discard_penultimate=True, **_ancestral),
    "lms": SamplerSpec(dpmpp.lms),
    "dpm_fast": SamplerSpec(dpm_solver.dpm_fast),
    "dpm_adaptive": SamplerSpec(dpm_solver.dpm_adaptive),
    "dpmpp_2s_ancestral": SamplerSpec(dpmpp.dpmpp_2s_ancestral, **_ancestral),
    "dpmpp_2s_ancestral_cfg_pp": SamplerSpec(cfgpp.dpmpp_2s_ancestral_cfg_pp, needs_uncond=True, **_ancestral),
    "dpmpp_sde": SamplerSpec(dpmpp.dpmpp_sde, **_ancestral),
    "dpmpp_sde_gpu": SamplerSpec(dpmpp.dpmpp_sde_gpu, **_ancestral),
    "dpmpp_2m": SamplerSpec(dpmpp.dpmpp_2m),
    "dpmpp_2m_cfg_pp": SamplerSpec(cfgpp.dpmpp_2m_cfg_pp, needs_uncond=True),
    "dpmpp_2m_sde": SamplerSpec(dpmpp.dpmpp_2m_sde, **_ancestral),
    "dpmpp_2m_sde_gpu": SamplerSpec(dpmpp.dpmpp_2m_sde_gpu, **_ancestral),
    "dpmpp_2m_sde_heun": SamplerSpec(dpmpp.dpmpp_2m_sde_heun, **_ancestral),
    "dpmpp_2m_sde_heun_gpu": SamplerSpec(dpmpp.dpmpp_2m_sde_heun_gpu, **_ancestral),
    "dpmpp_3m_sde": SamplerSpec(dpmpp.dpmpp_3m_sde, **_ancestral),
    "dpmpp_3m_sde_gpu": SamplerSpec(dpmpp.dpmpp_3m_sde_gpu, **_ancestral),
    "ddpm": SamplerSpec(dpmpp.ddpm, **_ancestral),
    "lcm": SamplerSpec(dpmpp.lcm, **_ancestral),
    "ipndm": SamplerSpec(multistep.ipndm),
    "ipndm_v": SamplerSpec(multistep.ipndm_v),
    "deis": SamplerSpec(multistep.deis),
    "res_multistep": SamplerSpec(cfgpp.res_multistep),
    "res_multistep_cfg_pp": SamplerSpec(cfgpp.res_multistep_cfg_pp, needs_uncond=True),
    "res_multistep_ancestral": SamplerSpec(cfgpp.res_multistep_ancestral, **_ancestral),
    "res_multistep_ancestral_cfg_pp": SamplerSpec(
        cfgpp.res_multistep_ancestral_cfg_pp, needs_uncond=True, **_ancestral
    ),
    "gradient_estimation": SamplerSpec(cfgpp.gradient_estimation),
    "gradient_estimation_cfg_pp": SamplerSpec(cfgpp.gradient_estimation_cfg_pp, needs_uncond=True),
    "er_sde": SamplerSpec(multistep.er_sde, **_ancestral),
    "seeds_2": SamplerSpec(multistep.seeds_2, **_ancestral),
    "seeds_3": SamplerSpec(multistep.seeds_3, **_ancestral),
    "sa_solver": SamplerSpec(multistep.sa_solver, **_ancestral),
    "sa_solver_pece": SamplerSpec(multistep.sa_solver_pece, **_ancestral),
    "ddim": SamplerSpec(euler.euler, inpaint_random_noise=True),
    "uni_pc": SamplerSpec(unipc.uni_pc, discard_penultimate=True),
    "uni_pc_bh2": SamplerSpec(unipc.uni_pc_bh2, discard_penultimate=True),
}

"""ComfyUI's KSampler, computed as ComfyUI computes it, as generators an engine can interleave.

Torch only (no diffusers, no Ray). ``docs/samplers.md`` lists every ComfyUI sampler and scheduler
with its status and the measured parity with ComfyUI's own code.

Model sampling
--------------
:class:`ModelSampling` is ComfyUI's model sampling: ``ModelSampling.from_comfy(kind, prediction,
**settings)`` with ``kind`` ``"discrete"`` (SD 1.x/2.x/XL: eps or v_prediction, ``zsnr``),
``"discrete_flow"`` (SD3/3.5 shift 3, AuraFlow, Flux.1 schnell: ``shift``, ``multiplier``) or
``"flux"`` (Flux.1 dev/Fill: ``shift``) and ``prediction`` ``"eps"``, ``"v_prediction"`` or
``"const"`` (rectified flow); ``ModelSampling.for_comfy_model("Flux")`` takes ComfyUI's settings
for a model class and ``from_scheduler_config`` maps a diffusers scheduler config. Every
sampler, scheduler, the noise mask and the start/end noise scaling follow it as ComfyUI does
(``docs/samplers.md`` has the table per kind).

The contract with the inpainter engine
--------------------------------------
A crop's whole KSampler run is one generator, :func:`crop_process`::

    process = crop_process(model_sampling, sampler_name=..., scheduler=..., steps=..., denoise=...,
                           cfg=..., seed=..., latent_image=latent, noise_mask=mask,
                           differential=feather > 0)          # raises UnsupportedSamplerError now
    request = next(process)                                    # UNetRequest
    while True:
        out = unet(request.x_in, request.timestep, cond[, uncond])   # batched with other crops
        try:
            request = process.send(UNetResponse(cond=out_cond, uncond=out_uncond or None))
        except StopIteration as done:
            final_latent = done.value                          # [1, C, h, w]
            break

- :class:`UNetRequest`: ``x_in`` [1, C, h, w] is the UNet's latent input with mask blending and
  c_in applied (an inpainting UNet's extra channels are the engine's to concatenate, see
  :func:`inpaint_concat`), ``timestep`` what the model receives (a whole timestep for discrete
  models, σ·multiplier or σ for flow models), ``sigma`` the call's
  sigma, ``uncond`` whether the negative conditioning must be evaluated too (False at the cfg = 1
  shortcut; cfg++ samplers always ask for it).
- :class:`UNetResponse`: the raw model outputs (eps, v or flow velocity, as the model predicts),
  shape of x_in.
- Everything between the raw outputs and the next input — cfg, cfg++, eps/v → x0, the noise
  mask at every call (``KSamplerX0Inpaint``), differential diffusion, ancestral / Brownian noise —
  happens inside the process, which depends on nothing but its own arguments: the same crop gives
  the same latent whatever it is interleaved with.
- ``latent_image`` is in the model's space (ComfyUI's ``process_latent_in``: VAE latent × scaling
  factor, (latent − shift) × scaling factor for SD3/Flux; the engine applies ``process_latent_out``
  to the result); ``noise_mask`` is on the
  latent grid [1, 1, h, w] (ComfyUI's bilinear resize of the crop mask); ``noise`` replaces the
  initial noise (CPU ``randn`` from the seed) for hooks such as variation noise; ``device`` is
  where the process keeps its tensors (the model's device: ancestral noise is drawn there);
  ``slicing`` picks how a denoise < 1 run is cut from its longer schedule: ``"ksampler"`` (the
  KSampler node, the default) or ``"impact"`` (Impact Pack's ``ksampler_wrapper``, which
  FaceDetailer uses; the inpainter passes it).

:func:`sample` is the standalone entry point over a denoiser function ``D(x, σ)``;
:func:`validate` checks names and values before any model work; :data:`SAMPLER_NAMES` /
:data:`SCHEDULER_NAMES` are what we run, in ComfyUI's order.
"""

from deployments.sampling.contract import CropProcess, UNetRequest, UNetResponse, UnsupportedSamplerError
from deployments.sampling.inpaint import inpaint_concat
from deployments.sampling.model_sampling import KINDS, PREDICTIONS, ModelSampling, flux_shift
from deployments.sampling.process import (
    OUTPUTS,
    SAMPLER_NAMES,
    SCHEDULER_NAMES,
    SLICINGS,
    DenoiserFunction,
    Output,
    Slicing,
    crop_process,
    sample,
    sampling_process,
    sigmas_for,
    unsupported_names,
    validate,
)
from deployments.sampling.registry import COMFY_SAMPLER_NAMES

__all__ = [
    "COMFY_SAMPLER_NAMES",
    "CropProcess",
    "DenoiserFunction",
    "KINDS",
    "ModelSampling",
    "OUTPUTS",
    "Output",
    "PREDICTIONS",
    "SAMPLER_NAMES",
    "SCHEDULER_NAMES",
    "SLICINGS",
    "Slicing",
    "UNetRequest",
    "UNetResponse",
    "UnsupportedSamplerError",
    "crop_process",
    "flux_shift",
    "inpaint_concat",
    "sample",
    "sampling_process",
    "sigmas_for",
    "unsupported_names",
    "validate",
]

"""``sim://``: a simulated accelerator, for capacity planning and for load tests without GPUs.

A ``sim://`` model reference loads stand-ins that cost what a GPU would cost — by sleeping, so
they hold no CPU core — and compute cheap, deterministic results derived from their input, so
that every line of serving code around them (batching, queues, autoscaling, limits,
cancellation, node loss) runs for real and its results can be checked.

References (options are ``?name=value&…``; unknown names are rejected):

- ``sim://sd15`` and ``sim://sd15-inpainting`` (inpainter, 4- or 9-channel UNet): stand-ins for
  what :func:`deployments.inpainter_loading.load_sd_components` returns — UNet, VAE, CLIP text
  encoder and tokenizer with diffusers'/transformers' call signatures, configs and outputs —
  so the real :class:`deployments.inpainter.Inpainter` samples with them. One UNet evaluation of
  a batch of ``n`` latents takes ``a + b·n`` seconds (``b`` scaled by the latent area relative to
  64×64, i.e. a 512×512 crop, unless ``area=0``); ``vae_encode`` / ``vae_decode`` seconds per
  512×512 image for each VAE encode / decode (area-scaled the same way; ``vae`` sets both);
  ``text`` seconds per text-encoder call.
- ``sim://detector``: a face detector of ``cost`` seconds per image that finds up to ``faces``
  faces (``size`` = box side as a fraction of a grid cell), in the highest-contrast cells of a
  grid over the image.
- ``sim://sam``: SAM with ``encoder`` seconds per image embedding plus ``decoder`` seconds per
  prompt, answering each prompt with three elliptical masks inside its box.

Default costs come from published GPU figures (see ``docs/simulated.md``): the UNet's from
diffusers' PyTorch 2.0 benchmark of the SD 1.5 inpainting pipeline on an A100 (22.24 it/s at
batch 1, 11.67 it/s at batch 4, classifier-free guidance doubling the UNet batch), the
detector's from ultralytics' YOLOv8m A100 TensorRT latency, SAM's from MobileSAM's table for the
original SAM (image encoder 452 ms, mask decoder 4 ms).

What the stand-ins compute:

- VAE: a latent is the 8×8 average of the pixels (RGB and their mean as channel 4, scaled so
  the inpainter's latents are in pixel units [-1, 1]); decoding repeats each latent pixel 8×8.
- Text encoder: each word gets a fixed pseudo-random vector (CRC32 token ids); special and
  padding tokens get zeros.
- UNet: an exact denoiser towards a target latent — the mean of the prompt's word vectors
  (first 4 dims) everywhere, or for the 9-channel UNet that colour inside its mask channel and the
  masked-image latent outside. Given the checkpoint's noise schedule it predicts the noise that
  makes every sampler's denoised estimate equal that target, so a refined face converges to the
  prompt's colour (with CFG: ``negative + cfg·(positive − negative)``) inside the noise mask and
  keeps the 8×8-blocky input outside it.

Load them through :mod:`deployments.model_loading` (``load_detector``, ``load_segmenter``,
``load_inpainter``), which picks this module for a ``sim://`` reference: the real model modules do
not import this one.

Each loaded model owns one :class:`SimulatedAccelerator`: its calls run one at a time, as on one
GPU. Contention between different models sharing one physical GPU is not modelled.
"""

from __future__ import annotations

import math
import re
import threading
import time
import zlib
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deployments.detector import FaceDetector, to_uint8_rgb
from deployments.inpainter_loading import SDComponents
from deployments.sam import SamPrediction, SamSegmenter
from deployments.weights import SIM_SCHEME
from facedetailer.sam_prompts import SamPrompt
from facedetailer.segs import Detection

# ---------------------------------------------------------------------------- cost defaults

# diffusers, "Accelerated PyTorch 2.0 support in Diffusers" (docs/source/en/optimization/torch2.0.md),
# A100, "SD - inpaint", torch 2.0 without compile: 22.24 it/s at batch 1, 11.67 it/s at batch 4.
# Each iteration is one UNet evaluation of 2·batch latents (classifier-free guidance), so
# a + 2b = 1/22.24 s and a + 8b = 1/11.67 s. Batch 4 then gives 2.1× the images·it/s of batch 1.
SD15_A100_IT_PER_S = {1: 22.24, 4: 11.67}
UNET_B_S = (1 / SD15_A100_IT_PER_S[4] - 1 / SD15_A100_IT_PER_S[1]) / 6
UNET_A_S = 1 / SD15_A100_IT_PER_S[1] - 2 * UNET_B_S
REFERENCE_LATENT_AREA = 64 * 64  # the benchmark's 512×512 images
# ultralytics README, YOLOv8m at 640: 1.83 ms on an A100 with TensorRT.
DETECTOR_COST_S = 0.00183
# diffusers, "Hybrid Inference" VAE encode / decode tables (docs/source/en/hybrid_inference/vae_encode.md,
# vae_decode.md), SD v1.5 at 512×512 on an RTX 4090 (the tables have no A100 row): encode 0.015 s,
# decode 0.031 s. Not a default (the VAE is free unless set): ``vae_encode=0.015&vae_decode=0.031``.
SD15_VAE_ENCODE_S = 0.015
SD15_VAE_DECODE_S = 0.031
# MobileSAM README, original SAM on one GPU: image encoder 452 ms, mask decoder 4 ms.
SAM_ENCODER_S = 0.452
SAM_DECODER_S = 0.004

# ``sync=1``: the synchronous device of before (see SimulatedAccelerator), to reproduce old figures.
# ``vae_encode`` / ``vae_decode`` default to ``vae`` (NaN here: "not given").
INPAINTER_OPTIONS: dict[str, float] = {
    "a": UNET_A_S, "b": UNET_B_S, "area": 1.0, "vae": 0.0, "vae_encode": math.nan, "vae_decode": math.nan,
    "text": 0.0, "sync": 0.0,
}  # fmt: skip
DETECTOR_OPTIONS: dict[str, float] = {"cost": DETECTOR_COST_S, "faces": 1.0, "size": 0.5, "sync": 0.0}
SAM_OPTIONS: dict[str, float] = {"encoder": SAM_ENCODER_S, "decoder": SAM_DECODER_S, "sync": 0.0}
FLAG_OPTIONS = frozenset({"sync"})  # 0 or 1
INPAINTER_KINDS: dict[str, int] = {"sd15": 4, "sd15-inpainting": 9}  # kind → UNet input channels

# SD 1.5's noise schedule, as its repository's scheduler_config.json has it (PNDM).
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
    "prediction_type": "epsilon",
}
CLIP_VOCAB_SIZE = 49408
CLIP_BOS, CLIP_EOS = 49406, 49407
CLIP_MAX_LENGTH = 77
CLIP_HIDDEN_SIZE = 768
VAE_SCALING_FACTOR = 0.18215
VAE_FACTOR = 8
GOLDEN_RATIO_CONJUGATE = (5**0.5 - 1) / 2


def parse_sim_reference(
    reference: str, kinds: Sequence[str], defaults: Mapping[str, float]
) -> tuple[str, dict[str, float]]:
    """``sim://kind?name=value`` → (kind, options with defaults); ``ValueError`` says what is wrong."""
    parts = urlsplit(str(reference))
    if f"{parts.scheme}://" != SIM_SCHEME:
        raise ValueError(f"{reference!r} is not a {SIM_SCHEME} reference")
    kind = parts.netloc or parts.path.strip("/")
    if kind not in kinds:
        raise ValueError(f"{reference}: unknown simulated model {kind!r}; expected one of {', '.join(kinds)}")
    options = dict(defaults)
    for name, text in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query)):
        if name not in defaults:
            raise ValueError(f"{reference}: unknown option {name!r}; {kind} takes {', '.join(defaults)}")
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{reference}: option {name}={text!r} is not a number") from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{reference}: option {name} must be a finite number >= 0, got {text!r}")
        if name in FLAG_OPTIONS and value not in (0.0, 1.0):
            raise ValueError(f"{reference}: option {name} must be 0 or 1, got {text!r}")
        options[name] = value
    return kind, options


# ---------------------------------------------------------------------------- the device


# time.sleep wakes a thread 0.1–0.4 ms after its deadline on a shared box (measured: p50 0.15 ms
# for a 38 ms sleep); sleeping until this long before and yielding the core for the rest lands
# within ~0.05 ms for ~1 % of a core.
WAKE_MARGIN_S = 0.001


def wait_until(deadline: float) -> None:
    """Block until ``time.perf_counter()`` reaches ``deadline``: asleep, then yielding for the last ~1 ms."""
    while True:
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            return
        time.sleep(remaining - WAKE_MARGIN_S if remaining > WAKE_MARGIN_S else 0)


@dataclass(frozen=True)
class SimulatedCall:
    """One piece of work on a simulated accelerator, and when the device ran it (``perf_counter``)."""

    operation: str
    batch: int
    modelled_s: float
    elapsed_s: float  # device time it occupied: the modelled time (synchronous mode: as slept)
    started: float = 0.0
    ended: float = 0.0


class SimulatedAccelerator:
    """One simulated device: work runs one piece at a time, each taking its modelled time.

    **Asynchronous** (the default), like a CUDA stream: a piece of work starts on the device at
    ``max(launch time, the device's free time)``; its cheap stand-in arithmetic is done at once
    on the host (so results exist immediately) and the launch returns without waiting for the
    modelled time, so host work between launches (a sampler's arithmetic) overlaps the device.
    The host runs at most one call ahead: launching call k+1 blocks, asleep, until call k has
    ended — PyTorch's bounded launch queue (about one SD UNet forward of kernels), and what a
    blocking host→device copy before each step forces on CUDA anyway. Whoever reads a result
    on the host must call :meth:`synchronize` first, where a CUDA replica would synchronise
    (``.cpu()``, ``.item()``, ``float(t)``, ``bool(t)``).

    **Synchronous** (``sync=True``, a reference's ``sync=1``): the behaviour before, kept to
    reproduce old figures — the stand-in arithmetic runs, the rest of the modelled time is slept
    while the caller waits, and the call's busy time is what it actually took.

    Either way the device holds no CPU core while it "runs", and ``busy_s`` / ``calls`` record
    the device intervals.
    """

    def __init__(self, name: str, *, synchronous: bool = False) -> None:
        self.name = name
        self.synchronous = synchronous
        self._lock = threading.Lock()  # launches (and, synchronous, whole calls) one at a time
        self.calls: deque[SimulatedCall] = deque(maxlen=4096)  # the most recent calls
        self.call_count = 0
        self.busy_s = 0.0
        self._free_at = 0.0  # perf_counter time at which all launched work has ended

    @contextmanager
    def occupy(self, operation: str, seconds: float, batch: int = 1) -> Iterator[None]:
        """Run the body (the stand-in arithmetic) as one piece of ``seconds`` of device work."""
        if self.synchronous:
            with self._lock:
                started = time.perf_counter()
                yield
                remaining = seconds - (time.perf_counter() - started)
                if remaining > 0:
                    time.sleep(remaining)
                ended = time.perf_counter()
                self.busy_s += ended - started
                self.call_count += 1
                self._free_at = ended
                self.calls.append(SimulatedCall(operation, batch, seconds, ended - started, started, ended))
            return
        launched = time.perf_counter()
        yield  # the result is computed now, on the host; the device time is accounted below
        with self._lock:
            wait_until(self._free_at)  # the launch queue holds one call: the previous one must end
            started = max(launched, self._free_at)
            ended = started + seconds
            self._free_at = ended
            self.busy_s += seconds
            self.call_count += 1
            self.calls.append(SimulatedCall(operation, batch, seconds, seconds, started, ended))

    def synchronize(self) -> None:
        """Wait until every launched piece of work has ended (``torch.cuda.synchronize``)."""
        while (free_at := self._free_at) > time.perf_counter():
            wait_until(free_at)

    @property
    def idle_at(self) -> float:
        """``perf_counter`` time at which the device has finished all work launched so far."""
        return self._free_at

    def summary(self) -> dict[str, Any]:
        return {
            "device": self.name,
            "mode": "sync" if self.synchronous else "async",
            "calls": self.call_count,
            "busy_s": round(self.busy_s, 3),
        }


# ---------------------------------------------------------------------------- inpainter stand-ins


class _Config(dict):
    """A read-only config with attribute access, like diffusers' ``FrozenDict``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class _SimulatedModule(nn.Module):
    """What the inpainter expects of a diffusers/transformers module: ``dtype``, ``device``, ``config``."""

    def __init__(self, accelerator: SimulatedAccelerator) -> None:
        super().__init__()
        self.accelerator = accelerator
        # The output gain: 1, and the one weight a health check can inspect.
        self.gain = nn.Parameter(torch.ones(()))

    @property
    def dtype(self) -> torch.dtype:
        return self.gain.dtype

    @property
    def device(self) -> torch.device:
        return self.gain.device


class NoiseSchedule:
    """ᾱ(t) of a DDPM beta schedule, interpolated in log σ for fractional timesteps (as diffusers)."""

    def __init__(self, scheduler_config: Mapping[str, Any]) -> None:
        steps = int(scheduler_config.get("num_train_timesteps", 1000))
        start, end = float(scheduler_config["beta_start"]), float(scheduler_config["beta_end"])
        kind = scheduler_config.get("beta_schedule", "linear")
        if kind == "scaled_linear":
            betas = np.linspace(start**0.5, end**0.5, steps, dtype=np.float64) ** 2
        elif kind == "linear":
            betas = np.linspace(start, end, steps, dtype=np.float64)
        else:
            raise ValueError(f"simulated UNet: beta_schedule {kind!r} is not supported")
        alphas_cumprod = np.cumprod(1.0 - betas)
        self.log_sigmas = np.log(((1 - alphas_cumprod) / alphas_cumprod) ** 0.5)

    def alpha_bar(self, timestep: Any, batch: int) -> torch.Tensor:
        """[batch, 1, 1, 1] float64 ᾱ for a scalar or per-sample timestep."""
        t = np.broadcast_to(np.asarray(torch.as_tensor(timestep).detach().cpu().double(), np.float64), (batch,))
        index = np.arange(len(self.log_sigmas), dtype=np.float64)
        sigma = np.exp(np.interp(np.clip(t, 0, index[-1]), index, self.log_sigmas))
        return torch.from_numpy(1.0 / (1.0 + sigma**2)).reshape(batch, 1, 1, 1)


def prompt_target(context: torch.Tensor) -> torch.Tensor:
    """[n, L, D] text embeddings → [n, 4, 1, 1]: the mean of the word vectors' first 4 dims.

    Special and padding tokens embed to zeros and are not counted, so repeating a sequence (the
    inpainter's way of matching lengths) does not change the target.
    """
    head = context[..., :4].double()
    words = (head.abs().sum(-1, keepdim=True) > 0).double()
    mean = (head * words).sum(1) / words.sum(1).clamp(min=1.0)
    return mean[:, :, None, None]


class SimulatedUNet(_SimulatedModule):
    """``UNet2DConditionModel``'s call and config; an exact denoiser towards the prompt's colour."""

    def __init__(
        self, in_channels: int, scheduler_config: Mapping[str, Any], options: Mapping[str, float],
        accelerator: SimulatedAccelerator,
    ) -> None:
        super().__init__(accelerator)
        self.config = _Config(
            sample_size=64,
            in_channels=in_channels,
            out_channels=4,
            center_input_sample=False,
            flip_sin_to_cos=True,
            freq_shift=0,
            down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            mid_block_type="UNetMidBlock2DCrossAttn",
            up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            block_out_channels=[320, 640, 1280, 1280],
            layers_per_block=2,
            attention_head_dim=8,
            cross_attention_dim=CLIP_HIDDEN_SIZE,
            norm_num_groups=32,
            addition_embed_type=None,
            time_cond_proj_dim=None,
        )
        self.schedule = NoiseSchedule(scheduler_config)
        self.a, self.b, self.area_scaling = options["a"], options["b"], bool(options["area"])

    def evaluation_seconds(self, batch: int, height: int, width: int) -> float:
        """``a + b·n``, ``b`` per 64×64 latent unless area scaling is off."""
        area = height * width / REFERENCE_LATENT_AREA if self.area_scaling else 1.0
        return self.a + self.b * batch * area

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        down_intrablock_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> Any:
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        batch, channels, height, width = sample.shape
        if channels != self.config.in_channels:
            raise ValueError(f"simulated UNet takes {self.config.in_channels} channels, got {channels}")
        if encoder_hidden_states.shape[0] != batch:
            raise ValueError(f"encoder_hidden_states batch {encoder_hidden_states.shape[0]} != sample batch {batch}")
        with self.accelerator.occupy("unet", self.evaluation_seconds(batch, height, width), batch):
            noisy = sample[:, :4].double()
            target = prompt_target(encoder_hidden_states).to(noisy.device)
            if channels == 9:  # inside the mask the prompt's colour, outside the masked image's latent
                mask, masked_image = sample[:, 4:5].double(), sample[:, 5:9].double()
                target = mask * target + (1.0 - mask) * masked_image
            alpha_bar = self.schedule.alpha_bar(timestep, batch).to(noisy.device)
            noise = (noisy - alpha_bar.sqrt() * target) / (1.0 - alpha_bar).sqrt()
            output = (noise * self.gain.double()).to(sample.dtype)
        return UNet2DConditionOutput(sample=output) if return_dict else (output,)


def _block_means(x: torch.Tensor) -> torch.Tensor:
    """[n, c, H, W] → float64 [n, c, H/8, W/8]: each 8×8 block's mean, as ``F.avg_pool2d(x.double(), 8)``.

    On the host with sides divisible by 8 (the inpainter pads to the latent grid) OpenCV's area
    resize does it, ~2× faster at 512² than torch's float64 pooling; both sum in float64 and scale
    by 1/64, and for float32 pixels in [-1, 1] (the inpainter's) every partial sum is exact, so
    the means are bit-identical whatever the order.
    """
    n, c, height, width = x.shape
    if x.device.type != "cpu" or height % VAE_FACTOR or width % VAE_FACTOR or height * width < 128 * 128:
        return F.avg_pool2d(x.double(), VAE_FACTOR)
    size = (width // VAE_FACTOR, height // VAE_FACTOR)
    planes = x.detach().reshape(n * c, height, width).numpy()
    means = np.stack([cv2.resize(plane.astype(np.float64), size, interpolation=cv2.INTER_AREA) for plane in planes])
    return torch.from_numpy(means.reshape(n, c, size[1], size[0]))


class SimulatedVAE(_SimulatedModule):
    """``AutoencoderKL``'s ``encode``/``decode``: 8×8 averages of the pixels, and back."""

    def __init__(self, options: Mapping[str, float], accelerator: SimulatedAccelerator) -> None:
        super().__init__(accelerator)
        self.config = _Config(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=[128, 256, 512, 512],
            sample_size=512,
            scaling_factor=VAE_SCALING_FACTOR,
            shift_factor=None,
            force_upcast=True,
        )
        # seconds per 512×512 image; ``vae_encode`` / ``vae_decode`` not given → ``vae``
        given = {name: options.get(name, math.nan) for name in ("vae_encode", "vae_decode")}
        self.encode_s, self.decode_s = (options["vae"] if math.isnan(v) else v for v in given.values())
        self.area_scaling = bool(options["area"])

    def seconds(self, per_image: float, images: int, latent_height: float, latent_width: float) -> float:
        """``per_image`` for each image, scaled by its latent area relative to 64×64 unless ``area=0``.

        The published VAE times grow about with the pixel count (diffusers' tables: decode 0.031 s
        at 512², 0.148 s at 1024²; encode 0.004 / 0.015 / 0.078 s at 256² / 512² / 1024²).
        """
        area = latent_height * latent_width / REFERENCE_LATENT_AREA if self.area_scaling else 1.0
        return per_image * images * area

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> Any:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
        from diffusers.models.modeling_outputs import AutoencoderKLOutput

        n, _, height, width = x.shape
        seconds = self.seconds(self.encode_s, n, height / VAE_FACTOR, width / VAE_FACTOR)
        with self.accelerator.occupy("vae_encode", seconds, n):
            pooled = _block_means(x)
            mean = torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1) / VAE_SCALING_FACTOR
            log_variance = torch.full_like(mean, -30.0)  # a point distribution: its mean is the latent
            distribution = DiagonalGaussianDistribution(torch.cat([mean, log_variance], dim=1).to(x.dtype))
        return AutoencoderKLOutput(latent_dist=distribution) if return_dict else (distribution,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator: torch.Generator | None = None) -> Any:
        from diffusers.models.autoencoders.vae import DecoderOutput

        n, _, height, width = z.shape
        with self.accelerator.occupy("vae_decode", self.seconds(self.decode_s, n, height, width), n):
            rgb = (z[:, :3].double() * VAE_SCALING_FACTOR * self.gain.double()).clamp(-1.0, 1.0).to(z.dtype)
            # Nearest upsampling copies values, so clamping and casting first gives the same pixels
            # for 64× less stand-in arithmetic (CPU a real GPU decode would not spend).
            sample = F.interpolate(rgb, scale_factor=VAE_FACTOR, mode="nearest")
        return DecoderOutput(sample=sample) if return_dict else (sample,)


class SimulatedTokenizer:
    """A ``CLIPTokenizer``-shaped tokenizer: lower-cased words and punctuation → CRC32 ids (no vocabulary file)."""

    model_max_length = CLIP_MAX_LENGTH
    bos_token_id = CLIP_BOS
    eos_token_id = CLIP_EOS
    pad_token_id = CLIP_EOS
    vocab_size = CLIP_VOCAB_SIZE

    def __len__(self) -> int:
        return CLIP_VOCAB_SIZE

    def _ids(self, text: str, add_special_tokens: bool, max_length: int | None, padding: Any) -> list[int]:
        ids = [zlib.crc32(word.encode("utf-8")) % CLIP_BOS for word in re.findall(r"\w+|[^\w\s]", text.lower())]
        if add_special_tokens:
            ids = [CLIP_BOS, *ids, CLIP_EOS]
        if max_length is not None:
            ids = ids[:max_length]
            if padding == "max_length":
                ids += [self.pad_token_id] * (max_length - len(ids))
        return ids

    def __call__(
        self,
        text: str | Sequence[str],
        add_special_tokens: bool = True,
        truncation: bool = False,
        max_length: int | None = None,
        padding: bool | str = False,
        return_tensors: str | None = None,
        verbose: bool = True,
        **_: Any,
    ) -> Any:
        from transformers import BatchEncoding

        texts = [text] if isinstance(text, str) else list(text)
        limit = (max_length or self.model_max_length) if truncation or padding == "max_length" else None
        ids = [self._ids(item, add_special_tokens, limit, padding) for item in texts]
        encoding = {"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids]}
        if isinstance(text, str):
            encoding = {key: value[0] for key, value in encoding.items()}
        return BatchEncoding(encoding, tensor_type=return_tensors)


class SimulatedTextEncoder(_SimulatedModule):
    """``CLIPTextModel``'s call and config; each word id maps to a fixed pseudo-random vector."""

    def __init__(self, options: Mapping[str, float], accelerator: SimulatedAccelerator) -> None:
        from transformers import CLIPTextConfig

        super().__init__(accelerator)
        self.config = CLIPTextConfig(
            vocab_size=CLIP_VOCAB_SIZE,
            hidden_size=CLIP_HIDDEN_SIZE,
            max_position_embeddings=CLIP_MAX_LENGTH,
            bos_token_id=CLIP_BOS,
            eos_token_id=CLIP_EOS,
            pad_token_id=CLIP_EOS,
        )
        self.seconds_per_call = options["text"]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[..., L] ids → [..., L, D]: sin(2π·frac(id·φ·k) + k), zeros for special tokens.

        Computed in float64 for the distinct ids only (a prompt has few), so it stays cheap.
        """
        unique, inverse = torch.unique(input_ids.detach().cpu(), return_inverse=True)
        ids = unique.to(torch.float64)[:, None]
        frequencies = torch.arange(1, CLIP_HIDDEN_SIZE + 1, dtype=torch.float64) * GOLDEN_RATIO_CONJUGATE
        phase = torch.frac(ids * frequencies) * (2 * math.pi)
        vectors = torch.sin(phase + torch.arange(CLIP_HIDDEN_SIZE, dtype=torch.float64))
        vectors[unique >= CLIP_BOS] = 0.0
        return vectors[inverse].to(input_ids.device)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = True,
        **_: Any,
    ) -> Any:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        if input_ids is None:
            raise ValueError("simulated text encoder: input_ids is required")
        with self.accelerator.occupy("text_encoder", self.seconds_per_call, int(input_ids.shape[0])):
            hidden = self.embed(input_ids).to(self.dtype) * self.gain.detach()
            ends = (input_ids == CLIP_EOS).int().argmax(-1)
            pooled = hidden[torch.arange(hidden.shape[0]), ends]
        hidden_states = (hidden, hidden) if output_hidden_states else None
        if return_dict is False:
            return (hidden, pooled) + ((hidden_states,) if hidden_states else ())
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled, hidden_states=hidden_states)


# glibc's mallopt parameters, and the values that keep freed tensor memory for reuse
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEEP_FREED_BELOW_BYTES = 32 * 1024 * 1024  # glibc's largest mmap threshold on 64-bit
_device_memory_kept = False


def keep_device_memory() -> bool:
    """Let the process reuse freed tensor memory instead of handing it back to the OS (glibc only).

    The simulated device's tensors are host memory. A GPU replica's live in PyTorch's caching
    allocator, which keeps freed blocks: a crop's buffers (pixels, latents, the decoded image)
    are re-allocated without cost. glibc instead returns blocks above its mmap threshold to the
    OS and the next crop page-faults them back in (measured: about half of a lone crop's host
    time before its first UNet call, ~6 ms). Raising the mmap and trim thresholds makes host
    memory behave like that cache. Idempotent; False where it cannot be set.
    """
    global _device_memory_kept
    if _device_memory_kept:
        return True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        _device_memory_kept = bool(
            libc.mallopt(M_MMAP_THRESHOLD, KEEP_FREED_BELOW_BYTES)
            and libc.mallopt(M_TRIM_THRESHOLD, 4 * KEEP_FREED_BELOW_BYTES)
        )
    except (OSError, AttributeError):  # not glibc
        _device_memory_kept = False
    return _device_memory_kept


def load_simulated_components(reference: str, dtype: torch.dtype = torch.float32) -> SDComponents:
    """The inpainter's components for ``sim://sd15`` / ``sim://sd15-inpainting``."""
    kind, options = parse_sim_reference(reference, list(INPAINTER_KINDS), INPAINTER_OPTIONS)
    keep_device_memory()
    accelerator = SimulatedAccelerator(f"sim-{kind}", synchronous=bool(options["sync"]))
    unet = SimulatedUNet(INPAINTER_KINDS[kind], SD15_SCHEDULER_CONFIG, options, accelerator)
    parts = [unet, SimulatedVAE(options, accelerator), SimulatedTextEncoder(options, accelerator)]
    for module in parts:
        module.to(dtype=dtype)
    components = SDComponents(
        unet=unet,
        vae=parts[1],
        text_encoders=[parts[2]],
        tokenizers=[SimulatedTokenizer()],
        scheduler_config=dict(SD15_SCHEDULER_CONFIG),
        source=reference,
        format="simulated",
    )
    components.extra_info = lambda: {"simulated": describe_simulated(components)}
    return components


def describe_simulated(components: SDComponents) -> dict[str, Any]:
    """The cost model and accelerator use of simulated components (for ``info()``)."""
    unet = components.unet
    return {
        "unet_a_s": unet.a,
        "unet_b_s": unet.b,
        "area_scaling": unet.area_scaling,
        "vae_encode_s": components.vae.encode_s,  # per 512×512 image
        "vae_decode_s": components.vae.decode_s,
        **unet.accelerator.summary(),
    }


# ---------------------------------------------------------------------------- detector and SAM


def _ellipse(box: Sequence[float], height: int, width: int, shrink: float = 0.0) -> np.ndarray:
    """A filled ellipse inscribed in ``box`` (x1, y1, x2, y2), its radii reduced by ``shrink``."""
    x1, y1, x2, y2 = (float(v) for v in box)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    rx, ry = max((x2 - x1) / 2 * (1 - shrink), 0.5), max((y2 - y1) / 2 * (1 - shrink), 0.5)
    mask = np.zeros((height, width), dtype=bool)
    top, bottom = max(int(cy - ry) - 1, 0), min(int(cy + ry) + 2, height)
    left, right = max(int(cx - rx) - 1, 0), min(int(cx + rx) + 2, width)
    if top >= bottom or left >= right:
        return mask
    y, x = np.mgrid[top:bottom, left:right]
    mask[top:bottom, left:right] = ((x + 0.5 - cx) / rx) ** 2 + ((y + 0.5 - cy) / ry) ** 2 <= 1.0
    return mask


def _grey(image: np.ndarray) -> tuple[np.ndarray, int]:
    """Grey levels, subsampled to at most ~256 px on the long side (contrast needs no more), and the stride."""
    stride = max(1, max(image.shape[:2]) // 256)
    return image[::stride, ::stride].astype(np.float64).mean(axis=2), stride


def _contrast(grey: np.ndarray, stride: int, box: Sequence[float]) -> float:
    """Standard deviation of the grey levels inside ``box`` (image coordinates)."""
    x1, y1, x2, y2 = (int(round(float(v) / stride)) for v in box)
    region = grey[max(y1, 0) : max(y2, y1 + 1), max(x1, 0) : max(x2, x1 + 1)]
    return float(region.std()) if region.size else 0.0


Box = tuple[float, float, float, float]


def simulated_faces(image: np.ndarray, faces: int, size: float) -> list[tuple[Box, float]]:
    """Up to ``faces`` (box, confidence) pairs, in the highest-contrast cells of a g×g grid.

    g = max(2, ⌈√faces⌉); a box is a square of ``size`` × the cell's shorter side, centred in its
    cell; confidence = 0.5 + 0.49·tanh(σ/32) with σ the cell's grey-level standard deviation, so
    a flat image scores 0.5 (no face at the default threshold) and a textured one near 0.99.
    Ordered by descending confidence (ultralytics' order), ties by cell.
    """
    height, width = image.shape[:2]
    grid = max(2, math.ceil(math.sqrt(max(faces, 1))))
    grey, stride = _grey(image)
    cell_h, cell_w = height / grid, width / grid
    cells = []
    for index in range(grid * grid):
        row, column = divmod(index, grid)
        cell = (column * cell_w, row * cell_h, (column + 1) * cell_w, (row + 1) * cell_h)
        cells.append((-_contrast(grey, stride, cell), index, cell))
    found = []
    side = size * min(cell_h, cell_w)
    for negative_contrast, _, (x1, y1, x2, y2) in sorted(cells)[:faces]:
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
        found.append((box, 0.5 + 0.49 * math.tanh(-negative_contrast / 32.0)))
    return found


class SimulatedDetector(FaceDetector):
    """``sim://detector``: :class:`FaceDetector`'s interface at a configurable cost (no model library)."""

    def __init__(
        self,
        model: str,
        *,
        task: str | None = None,
        imgsz: int = 640,
        device: str | None = None,
        cache_dir: str | None = None,
    ) -> None:
        if task is not None and task not in ("detect", "segment"):
            raise ValueError(f"task must be one of ('detect', 'segment') or None, got {task!r}")
        _, self.options = parse_sim_reference(model, ["detector"], DETECTOR_OPTIONS)
        self.model_reference = model
        self.model_path = Path(model)
        self.imgsz = imgsz
        self.device = device or "cpu"
        self.half = False
        self.model_task = "segment"  # boxes and masks, so it can stand in for either detector
        self.task = task or "detect"
        self.names = {0: "face"}
        self.accelerator = SimulatedAccelerator("sim-detector", synchronous=bool(self.options["sync"]))
        self.load_seconds = 0.0

    def detect(self, image: np.ndarray, threshold: float, *, with_masks: bool | None = None) -> list[Detection]:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        want_masks = self.is_segmentation if with_masks is None else with_masks
        rgb = to_uint8_rgb(image)
        height, width = rgb.shape[:2]
        with self.accelerator.occupy("detect", self.options["cost"]):
            found = simulated_faces(rgb, int(self.options["faces"]), self.options["size"])
            detections = [
                Detection(
                    label="face",
                    bbox=box,
                    confidence=confidence,
                    mask=_ellipse(box, height, width).astype(np.float32) if want_masks else None,
                )
                for box, confidence in found
                if confidence > threshold  # ultralytics keeps confidences above conf
            ]
        self.accelerator.synchronize()  # boxes and masks come back to the host
        return detections

    def info(self) -> dict[str, Any]:
        return {
            "model": self.model_reference,
            "format": "simulated",
            "task": self.task,
            "class_names": dict(self.names),
            "device": self.device,
            "simulated": {**self.options, **self.accelerator.summary()},
        }

    def check_health(self) -> None:
        """Nothing can break in the stand-in; the probe still answers through the same path."""


class SimulatedSegmenter(SamSegmenter):
    """``sim://sam``: :class:`SamSegmenter`'s interface; three elliptical masks per prompt."""

    def __init__(
        self, checkpoint: str, *, model_type: str = "vit_b", device: str | None = None, cache_dir: str | None = None
    ) -> None:
        _, self.options = parse_sim_reference(checkpoint, ["sam"], SAM_OPTIONS)
        self.checkpoint_reference = checkpoint
        self.checkpoint_path = Path(checkpoint)
        self.model_type = model_type
        self.device = device or "cpu"
        self.accelerator = SimulatedAccelerator("sim-sam", synchronous=bool(self.options["sync"]))
        self.embeddings_computed = 0
        self.load_seconds = 0.0

    @property
    def image_size(self) -> int:
        return 1024

    def predict(self, image: np.ndarray, prompts: Sequence[SamPrompt]) -> list[SamPrediction]:
        """Per prompt: ellipses inscribed in its box (or its positive points' bounds), shrunk 0, 20, 40 %.

        Scores are 0.90 + 0.09·tanh(σ/32) for the first mask (σ the grey-level contrast inside
        the box) and 0.05 less for each smaller one.
        """
        rgb = to_uint8_rgb(image)
        height, width = rgb.shape[:2]
        for prompt in prompts:
            if len(prompt.points) != len(prompt.labels):
                raise ValueError(f"SAM prompt: {len(prompt.points)} points but {len(prompt.labels)} labels")
        answerable = [prompt for prompt in prompts if prompt.box is not None or prompt.points]
        if not answerable:
            return [SamPrediction.empty(height, width) for _ in prompts]
        seconds = self.options["encoder"] + self.options["decoder"] * len(answerable)
        with self.accelerator.occupy("sam", seconds, len(answerable)):
            self.embeddings_computed += 1
            grey, stride = _grey(rgb)
            predictions = [self._answer(prompt, grey, stride, height, width) for prompt in prompts]
        self.accelerator.synchronize()  # the masks and scores come back to the host
        return predictions

    def _answer(self, prompt: SamPrompt, grey: np.ndarray, stride: int, height: int, width: int) -> SamPrediction:
        box = prompt.box
        if box is None:
            positive = [point for point, label in zip(prompt.points, prompt.labels, strict=True) if label == 1]
            if not positive:
                return SamPrediction.empty(height, width)
            xs, ys = [p[0] for p in positive], [p[1] for p in positive]
            box = (min(xs) - 8, min(ys) - 8, max(xs) + 8, max(ys) + 8)
        masks = np.stack([_ellipse(box, height, width, shrink) for shrink in (0.0, 0.2, 0.4)])
        best = 0.90 + 0.09 * math.tanh(_contrast(grey, stride, box) / 32.0)
        return SamPrediction(masks=masks, scores=np.array([best, best - 0.05, best - 0.10], dtype=np.float32))

    def info(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint_reference,
            "model_type": self.model_type,
            "format": "simulated",
            "device": self.device,
            "simulated": {**self.options, **self.accelerator.summary()},
        }

    def check_health(self) -> None:
        """Nothing can break in the stand-in; the probe still answers through the same path."""

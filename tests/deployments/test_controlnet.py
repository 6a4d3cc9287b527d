"""ControlNet in the inpainter (issue 12 part 2), on the tiny SD model and a tiny ControlNet.

The tiny ControlNet is ``ControlNetModel.from_unet`` of the tiny UNet with its zero-initialised
output convolutions drawn at random (``deployments/testing/tiny_controlnet.py``), saved as a
diffusers folder and loaded through the production loader. The tests prove by values: strength
0 is bit-identical to no ControlNet; the residuals reach the UNet exactly at the calls whose
sigma is inside ComfyUI's percent window; the batched residuals equal diffusers' own
``ControlNetModel`` output × strength row by row; crops with different ControlNets share calls
and still match their lone runs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deployments.controlnet import CropControl, common_upscale_center
from deployments.inpainter import Inpainter, RefineJob, SamplingSettings
from deployments.sampling import UNetRequest, sigmas_for
from facedetailer.controlnet import ControlHint, ControlNetParams, control_image_for_face

pytestmark = [pytest.mark.models, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

EULER = SamplingSettings(steps=8, denoise=1.0, cfg=7.0, sampler_name="euler", scheduler="normal")


@pytest.fixture(scope="module")
def inpainter(tiny_sd: dict, tiny_controlnet: dict) -> Inpainter:
    controlnets = {
        "tile": {"model": tiny_controlnet["sd15"], "preprocessor": "tile"},
        "pose": {"model": "tiny://controlnet/sd15", "preprocessor": "control_image"},
    }
    return Inpainter(tiny_sd["pipeline"], device="cpu", max_batch_size=4, controlnets=controlnets)


def image(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def job(pixels: np.ndarray, control: ControlHint | None = None, seed: int = 3) -> RefineJob:
    prompts = {"positive": ("a face",), "negative": ("blurry",)}
    return RefineJob(image=pixels, noise_mask=None, seed=seed, control=control, **prompts)  # type: ignore[arg-type]


def hint(name: str = "tile", strength: float = 1.0, start: float = 0.0, end: float = 1.0, pixels=None) -> ControlHint:
    return ControlHint(name, strength, start, end, pixels if pixels is not None else image(64, 64, 9))


class ControlNetCalls:
    """Records the timestep of every row the ControlNet runs on, and what the UNet got."""

    def __init__(self, inpainter: Inpainter, monkeypatch: pytest.MonkeyPatch) -> None:
        self.controlnet_timesteps: list[float] = []
        self.unet_with_residuals: list[bool] = []
        model = inpainter.controlnets.models["tile"].model
        original_controlnet, original_unet = model.forward, inpainter.components.unet.forward

        def controlnet(sample, timestep, *args, **kwargs):
            self.controlnet_timesteps += [float(value) for value in timestep.flatten()]
            return original_controlnet(sample, timestep, *args, **kwargs)

        def unet(*args, **kwargs):
            self.unet_with_residuals.append(kwargs.get("mid_block_additional_residual") is not None)
            return original_unet(*args, **kwargs)

        monkeypatch.setattr(model, "forward", controlnet)
        monkeypatch.setattr(inpainter.components.unet, "forward", unet)


def test_the_tiny_controlnet_loads_through_the_real_code_and_is_described(inpainter: Inpainter) -> None:
    info = inpainter.info()["controlnets"]
    assert set(info) == {"tile", "pose"}
    assert info["tile"]["preprocessor"] == "tile" and info["pose"]["source"] == "tiny://controlnet/sd15"
    assert info["tile"]["cross_attention_dim"] == inpainter.components.unet.config.cross_attention_dim
    # the zero convolutions were drawn at random: the residuals are not zero
    weight = inpainter.controlnets.models["tile"].model.controlnet_mid_block.weight
    assert float(weight.abs().max()) > 0.01


def test_strength_zero_is_bit_identical_to_no_controlnet_and_strength_changes_the_result(
    inpainter: Inpainter,
) -> None:
    pixels = image(64, 64, 1)
    none = inpainter.refine([job(pixels)], EULER)[0]
    zero = inpainter.refine([job(pixels, hint(strength=0.0, pixels=pixels))], EULER)[0]
    full = inpainter.refine([job(pixels, hint(strength=1.0, pixels=pixels))], EULER)[0]
    double = inpainter.refine([job(pixels, hint(strength=2.0, pixels=pixels))], EULER)[0]
    assert np.array_equal(zero, none)
    assert np.abs(full.astype(int) - none).mean() > 1.0
    assert np.abs(double.astype(int) - full).mean() > 1.0


@pytest.mark.parametrize(("start", "end"), [(0.0, 1.0), (0.3, 0.7), (0.5, 0.5), (0.9, 1.0)])
def test_residuals_reach_the_unet_only_inside_the_percent_window(
    inpainter: Inpainter, monkeypatch: pytest.MonkeyPatch, start: float, end: float
) -> None:
    calls = ControlNetCalls(inpainter, monkeypatch)
    inpainter.refine([job(image(64, 64, 2), hint(start=start, end=end))], EULER)
    sampling = inpainter.model_sampling
    sigmas = sigmas_for(sampling, "euler", "normal", EULER.steps, EULER.denoise)[:-1]  # one UNet call each
    upper, lower = sampling.percent_to_sigma(start), sampling.percent_to_sigma(end)
    inside = [float(sigma) for sigma in sigmas if lower <= float(sigma) <= upper]
    expected = [float(sampling.timestep(torch.tensor(sigma))) for sigma in inside for _ in range(2)]  # cond + uncond
    assert calls.controlnet_timesteps == pytest.approx(expected)
    assert calls.unet_with_residuals == [lower <= float(sigma) <= upper for sigma in sigmas]
    if (start, end) == (0.3, 0.7):
        assert 0 < len(inside) < len(sigmas)  # the window cut both ends


def test_batched_residuals_equal_diffusers_controlnet_times_strength_row_by_row(inpainter: Inpainter) -> None:
    """Four crops in one call: strength 0.5, none, strength 2 with uncond, outside its window."""
    controlnets = inpainter.controlnets
    model = controlnets.models["tile"].model
    generator = torch.Generator().manual_seed(0)
    hints = [torch.rand(1, 3, 64, 64, generator=generator) for _ in range(4)]
    sigma = 5.0
    controls = [
        CropControl("tile", 0.5, 1e9, 0.0, hints[0]),
        None,
        CropControl("pose", 2.0, 1e9, 0.0, hints[2]),
        CropControl("tile", 1.0, 3.0, 0.0, hints[3]),  # σ = 5 > its start sigma 3: skipped
    ]
    uncond = [False, False, True, True]
    rows = sum(1 + flag for flag in uncond)
    x = torch.randn(rows, 4, 8, 8, generator=generator)
    timesteps = torch.full((rows,), 500.0)
    context = torch.randn(rows, 77, 32, generator=generator)
    requests = [UNetRequest(x_in=x[:1], timestep=500.0, sigma=sigma, uncond=flag) for flag in uncond]
    result = controlnets.residuals(controls, requests, x, timesteps, context, None)
    down, middle = result["down_block_additional_residuals"], result["mid_block_additional_residual"]
    # rows: crop 0 → 0; crop 1 → 1; crop 2 → 2, 3; crop 3 → 4, 5
    expected_rows = {0: (hints[0], 0.5), 2: (hints[2], 2.0), 3: (hints[2], 2.0)}
    for row in range(rows):
        if row not in expected_rows:
            assert all(float(part[row].abs().max()) == 0.0 for part in down) and float(middle[row].abs().max()) == 0
            continue
        row_hint, strength = expected_rows[row]
        direct_down, direct_middle = model(
            x[row : row + 1], timesteps[row : row + 1], encoder_hidden_states=context[row : row + 1],
            controlnet_cond=row_hint, conditioning_scale=strength, return_dict=False,
        )  # fmt: skip
        for ours, theirs in zip(down, direct_down, strict=True):
            torch.testing.assert_close(ours[row : row + 1], theirs, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(middle[row : row + 1], direct_middle, rtol=1e-4, atol=1e-5)
        assert float(direct_middle.abs().max()) > 1e-3


def test_crops_with_different_controlnets_and_strengths_share_calls_and_match_their_lone_runs(
    inpainter: Inpainter,
) -> None:
    pixels = [image(64, 64, seed) for seed in (11, 12, 13, 14)]
    jobs = [
        job(pixels[0], hint("tile", 1.0, pixels=pixels[0])),
        job(pixels[1]),
        job(pixels[2], hint("pose", 0.5, 0.2, 0.8, pixels=image(40, 40, 5))),
        job(pixels[3], hint("tile", 1.5, 0.0, 0.5, pixels=pixels[3])),
    ]
    before = dict(inpainter.engine.stats.unet_batch_sizes)
    together = inpainter.refine(jobs, EULER)
    batched = {size: count - before.get(size, 0) for size, count in inpainter.engine.stats.unet_batch_sizes.items()}
    assert batched.get(4) == EULER.steps  # every step one UNet call for all four crops
    for single, shared in zip((inpainter.refine([item], EULER)[0] for item in jobs), together, strict=True):
        assert np.abs(single.astype(int) - shared).max() <= 1


def test_unknown_controlnet_and_bad_windows_are_refused_before_model_work(inpainter: Inpainter) -> None:
    with pytest.raises(ValueError, match="unknown 'canny'; configured: tile, pose"):
        inpainter.payloads([job(image(16, 16, 0), hint("canny"))], EULER)
    with pytest.raises(ValueError, match="start_percent <= end_percent"):
        inpainter.payloads([job(image(16, 16, 0), hint(start=0.8, end=0.2))], EULER)
    with pytest.raises(ValueError, match="must not exceed end_percent"):
        ControlNetParams(name="tile", start_percent=0.6, end_percent=0.5)
    with pytest.raises(ValueError, match="less than or equal to 10"):
        ControlNetParams(name="tile", strength=11)


def test_the_hint_is_comfyuis_nearest_exact_centre_crop_then_padded_like_the_crop(inpainter: Inpainter) -> None:
    pixels = image(50, 70, 4)  # not a multiple of 8: the latent grid is 56 × 72
    control = inpainter.controlnets.prepare(hint(pixels=pixels), (50, 70), (56, 72))
    assert control is not None and control.hint.shape == (1, 3, 56, 72)
    expected = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0
    torch.testing.assert_close(control.hint[0, :, :50, :70], expected)  # same size: the pixels themselves
    torch.testing.assert_close(control.hint[0, :, 55, :70], expected[:, 49])  # edge-replicated rows
    # a wider control image is cut to the target's aspect around its centre, then nearest-exact
    wide = torch.arange(2 * 8, dtype=torch.float32).reshape(1, 1, 2, 8)
    assert common_upscale_center(wide, 2, 4).tolist() == [[[[2.0, 3.0, 4.0, 5.0], [10.0, 11.0, 12.0, 13.0]]]]
    assert inpainter.controlnets.prepare(hint(strength=0.0), (64, 64), (64, 64)) is None


def test_a_faces_control_image_is_the_upscaled_crop_or_the_request_image_cut_to_its_region() -> None:
    upscaled = image(96, 96, 1)
    assert control_image_for_face("tile", upscaled, (10, 20, 42, 52), (100, 80), None) is upscaled
    full = image(80, 100, 2)  # H 80, W 100: the image's size, no resize
    cut = control_image_for_face("control_image", upscaled, (10, 20, 42, 52), (100, 80), full)
    assert np.array_equal(cut, full[20:52, 10:42])
    half = image(40, 50, 3)  # resized (Lanczos) to the image's size first, then cut
    assert control_image_for_face("tile", upscaled, (0, 0, 100, 80), (100, 80), half).shape == (80, 100, 3)
    with pytest.raises(ValueError, match="needs a control_image"):
        control_image_for_face("control_image", upscaled, (0, 0, 10, 10), (100, 80), None)

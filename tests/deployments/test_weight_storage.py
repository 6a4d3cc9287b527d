"""float8 and GGUF weights (deployments/families/weight_storage.py) on the tiny Flux.1 dev split layout.

Files are made here from the tiny model's own (deployments/testing/tiny_quantized.py): the
diffusion model (and T5) in float8_e4m3fn with vectors left float32, and the diffusion model as
a Q8_0 GGUF. Two checks each:

- **exact**: per-layer upcasting computes what the stored values upcast at load compute — the
  refined crops equal, bit for bit, those of a float32 file holding the same (rounded) values;
- **tolerance** against the full-precision model (the rounding itself; measured on these files:
  float8 e4m3 0.038 relative L2 / 0.98 grey levels mean, Q8_0 0.0054 / 0.12, Q4_0 0.092 / 2.1):
  the transformer's output on a fixed input within a relative L2 error of 0.08 for float8 e4m3
  (3 mantissa bits: each weight within 6.25 %), 0.015 for Q8_0 (8-bit blocks with an fp16
  scale) and 0.2 for Q4_0, and the refined 2-step crop within a mean absolute difference of 3,
  0.5 and 5 grey levels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from deployments.families.loading import describe_checkpoint
from deployments.inpainter import Inpainter, RefineJob, SamplingSettings
from deployments.testing.tiny_quantized import export_float8, export_gguf, export_upcast_reference

pytestmark = [pytest.mark.models, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

SETTINGS = SamplingSettings(steps=2, cfg=1.0, denoise=0.6)
TOLERANCE = {"float8_e4m3fn": (0.08, 3.0), "gguf:Q8_0": (0.015, 0.5), "gguf:Q4_0": (0.2, 5.0)}  # rel. L2, mean |Δ|


def split(tiny_flux_dev: dict, diffusion_model: str | Path, t5xxl: str | Path | None = None) -> dict:
    return {
        "diffusion_model": str(diffusion_model),
        "text_encoders": {"clip_l": tiny_flux_dev["split_clip_l"], "t5xxl": str(t5xxl or tiny_flux_dev["split_t5xxl"])},
        "vae": tiny_flux_dev["split_vae"],
        "single_file_config": tiny_flux_dev["pipeline"],
    }


@pytest.fixture(scope="module")
def files(tiny_flux_dev: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """{kind: split layout spec} for the full-precision, stored and upcast-reference files."""
    directory = tmp_path_factory.mktemp("stored-weights")
    source = tiny_flux_dev["split_diffusion_model"]
    fp8 = export_float8(source, directory / "flux1-tiny-dev-fp8-e4m3fn.safetensors")
    t5_fp8 = export_float8(tiny_flux_dev["split_t5xxl"], directory / "t5xxl_tiny_fp8_e4m3fn.safetensors")
    gguf = export_gguf(source, directory / "flux1-tiny-dev-Q8_0.gguf", "Q8_0")
    q4 = export_gguf(source, directory / "flux1-tiny-dev-Q4_0.gguf", "Q4_0")
    return {
        "float32": split(tiny_flux_dev, source),
        "float8_e4m3fn": split(tiny_flux_dev, fp8, t5_fp8),
        "float8_e4m3fn reference": split(
            tiny_flux_dev,
            export_upcast_reference(fp8, directory / "fp8-upcast.safetensors"),
            export_upcast_reference(t5_fp8, directory / "t5-fp8-upcast.safetensors"),
        ),
        "gguf:Q8_0": split(tiny_flux_dev, gguf),
        "gguf:Q8_0 reference": split(tiny_flux_dev, export_upcast_reference(gguf, directory / "q8-upcast.safetensors")),
        "gguf:Q4_0": split(tiny_flux_dev, q4),
        "gguf:Q4_0 reference": split(tiny_flux_dev, export_upcast_reference(q4, directory / "q4-upcast.safetensors")),
    }


@pytest.fixture(scope="module")
def inpainters(files: dict[str, dict]) -> dict[str, Inpainter]:
    return {kind: Inpainter(**spec, device="cpu", dtype="float32") for kind, spec in files.items()}


def refine(inpainter: Inpainter) -> np.ndarray:
    mask = np.zeros((40, 40), np.float32)
    mask[6:34, 8:32] = 1.0
    image = np.random.default_rng(11).integers(0, 255, (48, 48, 3), dtype=np.uint8)
    job = RefineJob(image=image, noise_mask=mask, positive=("a (face:1.2)",), negative=None, seed=9)
    [result] = inpainter.refine([job], SETTINGS)
    return result


def transformer_output(inpainter: Inpainter) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    config = inpainter.family.denoiser.config
    arguments = {
        "hidden_states": torch.randn(1, 16, config.in_channels, generator=generator),
        "encoder_hidden_states": torch.randn(1, 8, config.joint_attention_dim, generator=generator),
        "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=generator),
        "timestep": torch.tensor([0.6]),
        "img_ids": torch.zeros(16, 3),
        "txt_ids": torch.zeros(8, 3),
        "guidance": torch.tensor([3.5]),
        "return_dict": False,
    }
    with torch.inference_mode():
        return inpainter.family.denoiser(**arguments)[0]


def test_float8_weights_stay_float8_in_the_blocks_and_run_upcast(inpainters) -> None:
    stored, full = inpainters["float8_e4m3fn"], inpainters["float32"]
    transformer = stored.family.denoiser
    assert transformer.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    assert transformer.transformer_blocks[0].attn.to_q.bias.dtype == torch.float32, "vectors as stored"
    assert transformer.x_embedder.weight.dtype == torch.float32, "outside the blocks: upcast at load"
    t5 = stored.components.text_encoders["t5xxl"]
    assert t5.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float8_e4m3fn
    info = stored.info()
    assert info["weight_dtype"] == "float8_e4m3fn" and info["dtype"] == "float32"
    assert info["weight_bytes"]["denoiser"] < 0.5 * full.info()["weight_bytes"]["denoiser"]
    transformer_output(stored)  # a call leaves the weights as stored
    stored.check_health()
    assert transformer.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("kind", ["float8_e4m3fn", "gguf:Q8_0", "gguf:Q4_0"])
def test_stored_weights_compute_exactly_what_upcast_weights_compute(inpainters, kind) -> None:
    stored, reference = inpainters[kind], inpainters[f"{kind} reference"]
    assert torch.equal(transformer_output(stored), transformer_output(reference))
    assert np.array_equal(refine(stored), refine(reference))


@pytest.mark.parametrize("kind", ["float8_e4m3fn", "gguf:Q8_0", "gguf:Q4_0"])
def test_stored_weights_are_within_the_stated_tolerance_of_full_precision(inpainters, kind) -> None:
    stored, full = inpainters[kind], inpainters["float32"]
    output, expected = transformer_output(stored), transformer_output(full)
    relative = float((output - expected).norm() / expected.norm())
    crop_error = float(np.abs(refine(stored).astype(float) - refine(full)).mean())
    max_relative, max_crop = TOLERANCE[kind]
    assert 0 < relative < max_relative, relative
    assert crop_error < max_crop, crop_error


def test_gguf_transformer_uses_diffusers_gguf_layers_and_is_described(inpainters, files) -> None:
    from diffusers.quantizers.gguf.utils import GGUFLinear

    stored = inpainters["gguf:Q8_0"]
    transformer = stored.family.denoiser
    assert isinstance(transformer.transformer_blocks[0].attn.to_q, GGUFLinear)
    stored.check_health()
    assert stored.family.variant == "dev" and stored.info()["weight_dtype"] == "gguf:Q8_0"
    described = describe_checkpoint(files["gguf:Q8_0"])
    assert (described["family"], described["variant"], described["weight_dtype"]) == ("flux", "dev", "gguf:Q8_0")
    assert describe_checkpoint(files["float8_e4m3fn"])["weight_dtype"] == "float8_e4m3fn"
    assert describe_checkpoint(files["float32"])["weight_dtype"] == "float32"


def test_a_gguf_file_as_a_whole_checkpoint_is_refused_naming_the_split_layout(files) -> None:
    from deployments.families import CheckpointSource, load_family
    from deployments.families.detection import UnsupportedModelError

    gguf, config = files["gguf:Q8_0"]["diffusion_model"], files["float32"]["single_file_config"]
    source = CheckpointSource(model=gguf, config=config)
    with pytest.raises(UnsupportedModelError, match="diffusion_model"):
        load_family(source, device=torch.device("cpu"), dtype=torch.float32)

"""The inpainter's video hooks (``init_latent``, ``return_latent``) on the tiny SD model, no Ray."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from deployments.inpainter import Inpainter, RefineJob, SamplingSettings, _quantised_images, blended_initial_latent

pytestmark = [pytest.mark.models, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

SETTINGS = SamplingSettings(steps=3, denoise=0.6, cfg=4.0)


@pytest.fixture(scope="module")
def inpainter(tiny_sd: dict) -> Inpainter:
    return Inpainter(tiny_sd["pipeline"], device="cpu")


def job(seed: int = 5, **fields: object) -> RefineJob:
    image = np.random.default_rng(seed).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    return RefineJob(image=image, noise_mask=None, positive=("a face",), negative=(), seed=seed, **fields)  # type: ignore[arg-type]


def test_blended_initial_latent_is_the_weighted_mix() -> None:
    encoded, previous = torch.full((1, 4, 2, 3), 2.0), np.full((1, 4, 2, 3), 6.0, np.float32)
    assert blended_initial_latent(encoded, job()) is encoded
    mixed = blended_initial_latent(encoded, job(init_latent=previous, init_latent_weight=0.25))
    assert torch.equal(mixed, torch.full((1, 4, 2, 3), 3.0))
    with pytest.raises(ValueError, match="shape"):
        blended_initial_latent(encoded, job(init_latent=previous[:, :, :1], init_latent_weight=0.5))


def test_the_returned_latent_is_the_one_decoded_and_weight_zero_changes_nothing(inpainter: Inpainter) -> None:
    plain = inpainter.refine_result([job()], SETTINGS)
    assert plain.latents == [None], "latents only for jobs that ask"
    asked = inpainter.refine_result([job(return_latent=True)], SETTINGS)
    [latent] = asked.latents
    assert latent.shape == (1, 4, 6, 5) and latent.dtype == np.float32
    assert np.array_equal(asked.images[0], plain.images[0])
    decoded = _quantised_images(inpainter._decode(torch.from_numpy(latent)))[0][:48, :40]
    assert np.array_equal(decoded, asked.images[0]), "the final latent is what was decoded"
    unweighted = inpainter.refine_result([job(init_latent=latent, init_latent_weight=0.0)], SETTINGS)
    assert np.array_equal(unweighted.images[0], plain.images[0])
    # a weight moves the start (and the result) towards the previous latent
    other = inpainter.refine_result([job(seed=9, return_latent=True)], SETTINGS).latents[0]
    pulled = inpainter.refine_result([job(init_latent=other, init_latent_weight=0.9, return_latent=True)], SETTINGS)
    assert np.abs(pulled.latents[0] - other).mean() < np.abs(latent - other).mean()


def test_a_wrong_init_latent_fails_its_crop_only(inpainter: Inpainter) -> None:
    bad = dataclasses.replace(job(), init_latent=np.zeros((1, 4, 2, 2), np.float32), init_latent_weight=0.5)
    with pytest.raises(ValueError, match="init_latent"):
        inpainter.refine_result([bad], SETTINGS)
    with pytest.raises(ValueError, match="init_latent_weight"):
        inpainter.refine_result([job(init_latent_weight=1.5)], SETTINGS)

"""The fast host conversions of a crop equal the straightforward torch formulas (bit for bit where torch is)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from deployments.inpainter import _device_pixels, _quantised_images, _to_pixels, _to_uint8, stretch_to_latent_grid
from deployments.simulated import _block_means


def test_pixels_equal_to_pixels_for_read_only_strided_and_batched_crops() -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (45, 70, 3), dtype=np.uint8)
    view = base[3:40, 5:61]  # strided, like a crop cut out of a bigger image
    frozen = rng.integers(0, 256, (37, 56, 3), dtype=np.uint8)
    frozen.flags.writeable = False  # as Ray's object store hands it over
    pixels = _device_pixels([view, frozen], torch.device("cpu"))
    assert torch.equal(pixels, torch.stack([_to_pixels(view), _to_pixels(frozen)]))
    assert pixels.min() == -1.0 and pixels.max() == 1.0


def test_quantised_images_equal_to_uint8_hwc() -> None:
    images = torch.rand(2, 3, 19, 23)
    images[0, 0, 0, :3] = torch.tensor([0.0, 1.0, 0.999])
    expected = [_to_uint8(image) for image in images]
    got = _quantised_images(images.clone())
    for want, have in zip(expected, got, strict=True):
        assert have.dtype == np.uint8 and have.flags.c_contiguous and np.array_equal(have, want)
    assert got[0][0, 0, 0] == 0 and got[0][0, 1, 0] == 255 and got[0][0, 2, 0] == 254  # truncation


def test_stretched_mask_equals_the_full_resolution_formula() -> None:
    rng = np.random.default_rng(1)
    mask = rng.uniform(-0.5, 1.5, (50, 70))  # float64, outside [0, 1]: cast and clip happen on the taps
    source = torch.from_numpy(np.clip(mask.astype(np.float32), 0.0, 1.0))[None, None]
    full = stretch_to_latent_grid(mask, (12, 16), (12.0, 16.0))
    torch.testing.assert_close(full, F.interpolate(source, size=(12, 16), mode="bilinear"), rtol=0, atol=1e-6)
    again = stretch_to_latent_grid(mask, (12, 16), (12.0, 16.0))  # the remembered taps give the same
    assert torch.equal(again, full)
    padded = stretch_to_latent_grid(mask, (9, 10), (50 / 8, 70 / 8))
    assert torch.count_nonzero(padded[..., :6, :9]) > 0
    assert torch.count_nonzero(padded[..., 6:, :]) == 0 and torch.count_nonzero(padded[..., :, 9:]) == 0


def test_encode_block_means_equal_float64_pooling() -> None:
    rng = np.random.default_rng(2)
    for shape in [(1, 3, 256, 256), (2, 3, 136, 264), (1, 3, 64, 48), (1, 3, 130, 130)]:
        pixels = torch.from_numpy(rng.integers(0, 256, shape, dtype=np.uint8)).float() / 127.5 - 1.0
        assert torch.equal(_block_means(pixels), F.avg_pool2d(pixels.double(), 8)), shape

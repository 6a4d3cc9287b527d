"""The shared text encoder (deployments/text_encoder.py) and its prompt cache, in-process.

The served path (the deployment answering the inpainter replicas, its counters in /v1/stats) is
tests/serve/test_text_encoder_http.py; here: the conditioning equals the checkpoint's own
encoders' exactly, the cache's LRU bounds and counters, and an inpainter that loads no text
encoder of its own refines exactly what one with its own encoders refines.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deployments.families import TextConditioning
from deployments.inpainter import Inpainter, RefineJob, SamplingSettings
from deployments.prompt_cache import PromptEmbeddingCache, conditioning_bytes
from deployments.text_encoder import TextEncoder, TextEncoderClient, encoder_identity, source_of

pytestmark = [pytest.mark.models, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

PROMPTS = [("a face",), ("(smiling:1.3) face, detailed", "BREAK part"), ("",)]


def conditioning(size: int, value: float = 0.0) -> TextConditioning:
    return TextConditioning(torch.full((1, size, 4), value), torch.zeros(1, 2))


def test_the_cache_is_lru_bounded_by_entries_and_bytes_and_counts_hits_and_misses() -> None:
    entry_bytes = conditioning_bytes(conditioning(3))
    assert entry_bytes == (3 * 4 + 2) * 4
    cache = PromptEmbeddingCache(max_entries=2, max_bytes=10 * entry_bytes)
    assert cache.get("a") is None
    cache.put("a", conditioning(3, 1.0))
    cache.put("b", conditioning(3, 2.0))
    assert cache.get("a").context[0, 0, 0] == 1.0  # a is now the most recent
    cache.put("c", conditioning(3, 3.0))  # over 2 entries: b (least recently used) goes
    assert "b" not in cache and "a" in cache and "c" in cache
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["entries"], stats["evictions"]) == (1, 1, 2, 1)
    assert stats["bytes"] == 2 * entry_bytes and stats["hit_rate"] == 0.5
    by_bytes = PromptEmbeddingCache(max_entries=100, max_bytes=2 * entry_bytes + 1)
    for key in "xyz":
        by_bytes.put(key, conditioning(3))
    assert len(by_bytes) == 2 and "x" not in by_bytes and by_bytes.bytes == 2 * entry_bytes
    by_bytes.put("huge", conditioning(300))  # larger than the whole cache: not kept, nothing evicted
    assert "huge" not in by_bytes and len(by_bytes) == 2
    off = PromptEmbeddingCache(max_entries=0)
    off.put("a", conditioning(3))
    assert off.get("a") is None and off.stats()["misses"] == 1


@pytest.fixture(scope="module")
def checkpoints(tiny_flux_dev: dict, tiny_sd3: dict, tiny_sd: dict) -> dict:
    split = {
        "diffusion_model": tiny_flux_dev["split_diffusion_model"],
        "text_encoders": {"clip_l": tiny_flux_dev["split_clip_l"], "t5xxl": tiny_flux_dev["split_t5xxl"]},
        "vae": tiny_flux_dev["split_vae"],
        "single_file_config": tiny_flux_dev["pipeline"],
    }
    return {
        "flux-split": split,
        "flux-split-again": dict(split),  # another diffusion model could go here: the same encoders
        "flux-folder": tiny_flux_dev["pipeline"],
        "sd3": tiny_sd3["pipeline"],
        "sd15": tiny_sd["pipeline"],
    }


@pytest.fixture(scope="module")
def service(checkpoints: dict) -> TextEncoder:
    return TextEncoder(checkpoints, device="cpu", dtype="float32", cache_max_entries=64)


@pytest.fixture(scope="module")
def local_flux(checkpoints: dict) -> Inpainter:
    spec = checkpoints["flux-split"]
    return Inpainter(**spec, device="cpu", dtype="float32")


@pytest.mark.parametrize("name", ["flux-split", "flux-folder", "sd3"])
def test_the_conditioning_equals_the_checkpoints_own_encoders_exactly(service, checkpoints, local_flux, tiny_sd3, name):
    local = local_flux if name == "flux-split" else Inpainter(checkpoints[name], device="cpu", dtype="float32")
    for chunks in PROMPTS:
        expected = local.family.encode_prompt(chunks)
        got = service.encode(name, chunks)
        assert got.context.device.type == "cpu"
        assert torch.equal(got.context, expected.context), (name, chunks)
        assert torch.equal(got.pooled, expected.pooled), (name, chunks)


def test_cache_hits_misses_and_one_copy_per_encoder_identity(checkpoints) -> None:
    service = TextEncoder(checkpoints, device="cpu", dtype="float32", cache_max_entries=64)
    sources = service.sources
    assert sources["flux-folder"] == source_of({"model": checkpoints["flux-folder"]})
    assert encoder_identity(sources["flux-split"]) == encoder_identity(sources["flux-split-again"])
    assert encoder_identity(sources["flux-split"]) != encoder_identity(sources["flux-folder"])
    first = service.encode("flux-split", ("a face",))
    assert service.cache.stats()["misses"] == 1 and service.cache.stats()["hits"] == 0
    again = service.encode("flux-split-again", ["a face"])  # same encoders: the same entry
    assert again is first and service.cache.stats()["hits"] == 1
    service.encode("flux-folder", ("a face",))  # other encoders: a miss, a second copy
    service.encode("flux-split-again", ("another",))  # a miss: encoded by the split's one copy
    stats = service.stats()
    assert (stats["hits"], stats["misses"], stats["entries"]) == (1, 3, 3)
    assert len(stats["encoders"]) == 2
    [split] = [value for key, value in stats["encoders"].items() if key.startswith("split")]
    assert split["checkpoints"] == ["flux-split", "flux-split-again"] and split["encodes"] == 2
    info = service.info()
    assert all(loaded["weight_bytes"] > 0 for loaded in info["loaded"].values())
    assert "/" not in "".join(info["loaded"]), "encoder identities by file name, never server paths"
    with pytest.raises(ValueError, match="SD3 and Flux"):
        service.encode("sd15", ("a face",))
    with pytest.raises(ValueError, match="unknown checkpoint 'nope'"):
        service.encode("nope", ("a face",))


def test_an_inpainter_with_shared_text_encoding_loads_no_encoder_and_refines_the_same(
    service, checkpoints, local_flux
) -> None:
    spec = checkpoints["flux-split"]
    client = TextEncoderClient.local(service, "flux-split")
    shared = Inpainter(**spec, device="cpu", dtype="float32", text_encoder=client)
    assert shared.components.text_encoders == {} and shared.components.tokenizers == {}
    assert shared.info()["text_encoding"] == "shared" and local_flux.info()["text_encoding"] == "local"
    assert shared.info()["text_encoders"] == ["clip_l", "t5xxl"]
    mask = np.zeros((40, 40), np.float32)
    mask[8:32, 10:30] = 1.0
    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)
    job = RefineJob(image=image, noise_mask=mask, positive=("a face",), negative=None, seed=5)
    settings = SamplingSettings(steps=2, cfg=1.0, denoise=0.6)
    misses = service.cache.stats()["misses"]
    [expected] = local_flux.refine([job], settings)
    [got] = shared.refine([job], settings)
    assert np.array_equal(got, expected)
    assert service.cache.stats()["misses"] <= misses + 1


def test_sd3_with_shared_text_encoding_refines_the_same(service, checkpoints) -> None:
    local = Inpainter(checkpoints["sd3"], device="cpu", dtype="float32")
    shared = Inpainter(checkpoints["sd3"], device="cpu", dtype="float32",
                       text_encoder=TextEncoderClient.local(service, "sd3"))  # fmt: skip
    # the ingress counts prompt tokens with the checkpoint's tokenizers: the shared encoder's, the same ones
    tokenizers = [(type(tokenizer).__name__, length) for tokenizer, length in shared.prompt_tokenizers()]
    assert tokenizers == [(type(tokenizer).__name__, length) for tokenizer, length in local.prompt_tokenizers()]
    assert len(tokenizers) == 3
    assert shared.components.text_encoders == {}
    mask = np.ones((40, 40), np.float32)
    image = np.random.default_rng(4).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    job = RefineJob(image=image, noise_mask=mask, positive=("a face",), negative=("blurry",), seed=2)
    settings = SamplingSettings(steps=2, cfg=4.0, denoise=0.5)
    assert np.array_equal(shared.refine([job], settings)[0], local.refine([job], settings)[0])


def test_preload_loads_the_sd3_and_flux_encoders_only(checkpoints) -> None:
    service = TextEncoder(checkpoints, device="cpu", dtype="float32", preload=True)
    loaded = sorted((entry["family"], entry["checkpoints"]) for entry in service.info()["loaded"].values())
    # SD 1.x keeps its CLIP in the inpainter: nothing to preload; the two split names share one copy
    assert loaded == [("flux", ["flux-folder"]), ("flux", ["flux-split", "flux-split-again"]), ("sd3", ["sd3"])]
    assert service.cache.stats()["misses"] == 0


def test_an_all_in_one_file_gives_its_text_encoders_alone(tiny_flux_dev: dict, service, tmp_path) -> None:
    """ComfyUI's checkpoint layout: only the text_encoders.<name>.transformer. tensors are read for the deployment."""
    from safetensors.torch import load_file, save_file

    prefixes = {
        "split_diffusion_model": "model.diffusion_model.",
        "split_vae": "vae.",
        "split_clip_l": "text_encoders.clip_l.transformer.",
        "split_t5xxl": "text_encoders.t5xxl.transformer.",
    }
    state = {prefix + key: value for part, prefix in prefixes.items()
             for key, value in load_file(tiny_flux_dev[part]).items()}  # fmt: skip
    path = tmp_path / "flux1-tiny-dev-aio.safetensors"
    save_file(state, str(path))
    spec = {"model": str(path), "single_file_config": tiny_flux_dev["pipeline"]}
    single = TextEncoder({"aio": spec}, device="cpu", dtype="float32")
    [parts] = [single.encoder("aio").parts]
    assert (parts.family, sorted(parts.encoders)) == ("flux", ["clip_l", "t5xxl"])
    for chunks in PROMPTS:  # the same encoder weights as the split files
        got, expected = single.encode("aio", chunks), service.encode("flux-split", chunks)
        assert torch.equal(got.context, expected.context) and torch.equal(got.pooled, expected.pooled)
    shared = Inpainter(**spec, device="cpu", dtype="float32", text_encoder=TextEncoderClient.local(single, "aio"))
    assert shared.components.text_encoders == {} and shared.family.format == "single_file"

"""SamSegmenter: the tiny random SAM for shapes and the one-embedding rule, LiteMedSAM for a real face.

Every checkpoint is loaded from disk through ``resolve_weights`` and strict state-dict loading, as
production loads hub files and URLs. Timings are printed (run with ``-s``) for the issue note.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import torch

from deployments.sam import SAM_BUILDERS, SamPrediction, SamSegmenter, build_sam_model
from deployments.testing import assets
from deployments.weights import CorruptWeightsError, WeightsNotFoundError
from facedetailer.sam_prompts import SamPrompt
from facedetailer.segs import Box

pytestmark = pytest.mark.models

# The astronaut's face as the faceghost detector finds it (tests/deployments/test_detector.py).
ASTRONAUT_FACE = (181.0, 56.0, 269.0, 177.0)
CROP_FACTOR = 3.0


def box_center(box: Box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def box_mask(box: Box, height: int, width: int, scale: float = 1.0) -> np.ndarray:
    """Pixels whose centres lie in ``box`` scaled by ``scale`` about its centre."""
    cx, cy = box_center(box)
    half_w, half_h = (box[2] - box[0]) * scale / 2, (box[3] - box[1]) * scale / 2
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    return (np.abs(xs - cx) <= half_w) & (np.abs(ys - cy) <= half_h)


def timed_load(checkpoint: str, model_type: str) -> SamSegmenter:
    started = time.perf_counter()
    segmenter = SamSegmenter(checkpoint, model_type=model_type)
    print(f"\n[timing] load SAM {model_type}: {time.perf_counter() - started:.2f}s")
    return segmenter


def print_call_time(segmenter: SamSegmenter, image: np.ndarray, prompts: list[SamPrompt]) -> None:
    runs = 2
    started = time.perf_counter()
    for _ in range(runs):
        segmenter.predict(image, prompts)
    per_call = (time.perf_counter() - started) / runs
    print(
        f"\n[timing] SAM {segmenter.model_type} predict {image.shape[1]}x{image.shape[0]}, "
        f"{len(prompts)} prompts: {per_call * 1000:.0f} ms/call"
    )


@pytest.fixture(scope="module")
def tiny_segmenter(tiny_sam: dict) -> SamSegmenter:
    return timed_load(tiny_sam["checkpoint"], tiny_sam["model_type"])


@pytest.fixture(scope="module")
def lite_medsam() -> SamSegmenter:
    return timed_load(str(assets.lite_medsam_checkpoint()), "lite_medsam")


@pytest.fixture(scope="module")
def lite_medsam_face(lite_medsam: SamSegmenter) -> tuple[SamPrediction, SamPrediction]:
    """LiteMedSAM on the astronaut's face: box alone (hint "none") and box + centre (hint "center-1")."""
    prompts = [
        SamPrompt(box=ASTRONAUT_FACE, points=(), labels=()),
        SamPrompt(box=ASTRONAUT_FACE, points=(box_center(ASTRONAUT_FACE),), labels=(1,)),
    ]
    box_only, box_and_center = lite_medsam.predict(assets.astronaut(), prompts)
    return box_only, box_and_center


def face_prompts(box: Box) -> list[SamPrompt]:
    center = box_center(box)
    return [
        SamPrompt(box=box, points=(center,), labels=(1,)),  # center-1
        SamPrompt(box=None, points=(center, (5.0, 5.0)), labels=(1, 0)),  # mask-points: no box
        SamPrompt(box=box, points=(), labels=()),  # none: the box alone
    ]


def test_predict_answers_every_prompt_with_three_masks(tiny_segmenter: SamSegmenter):
    image = assets.astronaut()
    height, width = image.shape[:2]
    predictions = tiny_segmenter.predict(image, [*face_prompts(ASTRONAUT_FACE), SamPrompt(None, (), ())])
    assert len(predictions) == 4
    for prediction in predictions[:3]:
        assert isinstance(prediction, SamPrediction)
        assert prediction.masks.shape == (3, height, width) and prediction.masks.dtype == np.bool_
        assert prediction.scores.shape == (3,) and prediction.scores.dtype == np.float32
    empty = predictions[3]
    assert empty.masks.shape == (0, height, width) and empty.scores.shape == (0,)
    print_call_time(tiny_segmenter, image, face_prompts(ASTRONAUT_FACE))


def test_one_embedding_per_image_however_many_prompts(tiny_sam: dict):
    segmenter = SamSegmenter(tiny_sam["checkpoint"], model_type=tiny_sam["model_type"])
    assert segmenter.embeddings_computed == 0
    segmenter.predict(assets.astronaut(), face_prompts(ASTRONAUT_FACE))
    assert segmenter.embeddings_computed == 1
    segmenter.predict(assets.camera(), face_prompts((200.0, 120.0, 260.0, 200.0)))
    assert segmenter.embeddings_computed == 2
    assert segmenter.predict(assets.camera(), [SamPrompt(None, (), ())] * 2)[1].masks.shape[0] == 0
    assert segmenter.predict(assets.camera(), []) == []
    assert segmenter.embeddings_computed == 2  # nothing to answer, nothing encoded


def test_points_and_labels_must_pair(tiny_segmenter: SamSegmenter):
    with pytest.raises(ValueError, match="1 points but 2 labels"):
        tiny_segmenter.predict(assets.camera(), [SamPrompt(None, ((1.0, 1.0),), (1, 0))])


def test_info_and_health(tiny_segmenter: SamSegmenter, tiny_sam: dict):
    info = tiny_segmenter.info()
    assert info["checkpoint_path"] == tiny_sam["checkpoint"]
    assert info["model_type"] == "tiny_test" and info["image_size"] == 256 and info["device"] == "cpu"
    tiny_segmenter.check_health()


def test_lite_medsam_loads_strictly_at_256(lite_medsam: SamSegmenter):
    assert lite_medsam.image_size == 256
    assert lite_medsam._predictor.transform.target_length == 256
    lite_medsam.check_health()


def test_lite_medsam_segments_the_face_inside_its_crop(lite_medsam: SamSegmenter, lite_medsam_face):
    """Looked at once as overlays. Measured (mask ∩ box / box area; share of the mask outside the box;
    pixels outside the 3× crop): box alone: scores 0.220/0.237/0.228, cover 0.76/0.81/0.39, outside
    the box 0.000/0.012/0.000, 0 px outside the crop; box + centre: scores 0.179/0.195/0.179, cover
    0.29/0.33/0.10 (forehead and upper face: LiteMedSAM was trained on box prompts), 0 px outside
    the crop. Scores stay far below sam_threshold 0.93, so FaceDetailer keeps the single best mask.
    """
    box_only, box_and_center = lite_medsam_face
    image = assets.astronaut()
    height, width = image.shape[:2]
    in_box = box_mask(ASTRONAUT_FACE, height, width)
    in_crop = box_mask(ASTRONAUT_FACE, height, width, scale=CROP_FACTOR)
    best = box_only.masks[int(np.argmax(box_only.scores))]
    assert (best & in_box).sum() / in_box.sum() >= 0.6
    assert (best & ~in_box).sum() / best.sum() <= 0.05
    for prediction in (box_only, box_and_center):
        assert prediction.masks.any(axis=(1, 2)).all()
        assert (prediction.masks & ~in_crop).sum() / prediction.masks.sum() <= 0.01
    print_call_time(lite_medsam, image, face_prompts(ASTRONAUT_FACE))


def test_vit_t_is_mobile_sam_at_1024(tmp_path: Path):
    """MobileSAM's checkpoint layout (with its unused classification head) loads; 1024 px → 64×64."""
    model = build_sam_model("vit_t")
    state = model.state_dict()
    state["image_encoder.head.weight"] = torch.zeros(1000, 320)
    state["image_encoder.norm_head.weight"] = torch.ones(320)
    path = tmp_path / "mobile_sam.pt"
    torch.save(state, path)
    segmenter = SamSegmenter(str(path), model_type="vit_t")
    assert segmenter.image_size == 1024
    assert segmenter._model.image_encoder.patch_embed.seq[0].c.stride == (2, 2)
    with torch.inference_mode():
        embedding = segmenter._model.image_encoder(torch.zeros(1, 3, 1024, 1024))
    assert embedding.shape == (1, 256, 64, 64)
    segmenter.check_health()


def test_every_documented_model_type_is_registered():
    assert set(SAM_BUILDERS) == {"vit_b", "vit_l", "vit_h", "vit_t", "lite_medsam", "tiny_test"}
    with pytest.raises(ValueError, match="unknown SAM model type"):
        SamSegmenter("whatever.pth", model_type="vit_x")


def test_missing_checkpoint_names_the_path(tmp_path: Path):
    path = tmp_path / "sam_vit_b.pth"
    with pytest.raises(WeightsNotFoundError, match=str(path)):
        SamSegmenter(str(path), model_type="tiny_test")


def test_corrupt_checkpoint_names_the_path(tmp_path: Path):
    path = tmp_path / "sam_vit_b.pth"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CorruptWeightsError, match=str(path)):
        SamSegmenter(str(path), model_type="tiny_test")


def test_checkpoint_of_another_model_type_names_the_path(tiny_sam: dict):
    with pytest.raises(CorruptWeightsError, match=rf"{tiny_sam['checkpoint']}.*'lite_medsam'"):
        SamSegmenter(tiny_sam["checkpoint"], model_type="lite_medsam")


def test_url_not_in_the_cache_fails_offline_naming_it(tmp_path: Path):
    url = "https://models.example.invalid/sam/sam_tiny_test.pth"
    with pytest.raises(WeightsNotFoundError, match=url):
        SamSegmenter(url, model_type="tiny_test", cache_dir=str(tmp_path))


def test_url_in_the_cache_is_loaded_without_network(tmp_path: Path, tiny_sam: dict):
    url = "https://models.example.invalid/sam/sam_tiny_test.pth"
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]  # deployments.weights' cache layout
    entry = tmp_path / "url" / digest / Path(urlparse(url).path).name
    entry.parent.mkdir(parents=True)
    shutil.copy(tiny_sam["checkpoint"], entry)
    segmenter = SamSegmenter(url, model_type="tiny_test", cache_dir=str(tmp_path))
    assert segmenter.checkpoint_path == entry


def test_hub_file_in_the_cache_is_loaded_without_network(tmp_path: Path, tiny_sam: dict):
    repo_dir = tmp_path / "hf" / "models--acme--tiny-sam"
    commit = "0" * 40
    snapshot = repo_dir / "snapshots" / commit / "sam_tiny_test.pth"
    snapshot.parent.mkdir(parents=True)
    shutil.copy(tiny_sam["checkpoint"], snapshot)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    reference = "hf://acme/tiny-sam/sam_tiny_test.pth"
    segmenter = SamSegmenter(reference, model_type="tiny_test", cache_dir=str(tmp_path))
    assert segmenter.checkpoint_path == snapshot
    with pytest.raises(WeightsNotFoundError, match="hf://acme/tiny-sam/other.pth"):
        SamSegmenter("hf://acme/tiny-sam/other.pth", model_type="tiny_test", cache_dir=str(tmp_path))

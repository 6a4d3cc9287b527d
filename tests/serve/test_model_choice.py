"""Choosing a configured model by the request's bbox_detector / segm_detector / sam_model (issue 12, part 3)."""

from __future__ import annotations

import pytest

from facedetailer.params import FaceDetailerParams
from serve_app.model_choice import ModelChoice, ModelChoiceError, NamedModels


def test_single_model_is_named_default_and_a_mapping_keeps_its_order():
    assert NamedModels.of("bbox_detector", "face-model").models == {"default": "face-model"}
    named = NamedModels.of("bbox_detector", {"face": "F", "hand": "H"})
    assert named.names == ["face", "hand"] and named.default == "F"
    assert named.resolve(None) == "F" and named.resolve("hand") == "H"
    assert NamedModels.of("sam_model", None).resolve(None) is None


def test_unknown_names_say_what_is_configured():
    with pytest.raises(ModelChoiceError, match=r"bbox_detector: unknown 'person'; configured: face, hand"):
        NamedModels.of("bbox_detector", {"face": "F", "hand": "H"}).resolve("person")
    with pytest.raises(ModelChoiceError, match=r"sam_model: 'vit_h' named, but this service configures none"):
        NamedModels.of("sam_model", None).resolve("vit_h")


def test_a_request_selects_its_models():
    choice = ModelChoice.of({"face": "F", "hand": "H"}, segm_detector={"person": "P"}, sam="S")
    chosen = choice.select(FaceDetailerParams(bbox_detector="hand", segm_detector="person"))
    assert (chosen.detector, chosen.segm_detector, chosen.sam) == ("H", "P", "S")
    default = choice.select(FaceDetailerParams())
    assert (default.detector, default.segm_detector, default.sam) == ("F", "P", "S")
    with pytest.raises(ModelChoiceError, match="sam_model"):
        choice.select(FaceDetailerParams(sam_model="vit_h"))


def test_health_labels():
    assert list(ModelChoice.of("D", sam="S").labelled()) == ["detector", "sam"]
    labels = ModelChoice.of({"face": "F", "hand": "H"}, segm_detector="P").labelled()
    assert labels == {"detector:face": "F", "detector:hand": "H", "segm_detector": "P"}


def test_a_bbox_detector_is_required():
    with pytest.raises(ValueError, match="bbox detector"):
        ModelChoice.of({})


def test_naming_a_segm_detector_or_sam_model_switches_it_on():
    assert FaceDetailerParams(sam_model="vit_b").use_sam and FaceDetailerParams(segm_detector="p").use_segm
    with pytest.raises(ValueError, match="use_sam is false"):
        FaceDetailerParams(sam_model="vit_b", use_sam=False)

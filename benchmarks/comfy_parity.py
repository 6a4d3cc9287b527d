"""Parity (and speed) of deployments.sampling against ComfyUI's own KSampler code on the same UNet.

Drives ComfyUI's real sampling path (``comfy.sample.sample`` → ``KSampler`` → ``CFGGuider`` →
``KSAMPLER`` → ``KSamplerX0Inpaint`` → the k-diffusion / UniPC functions) and our
``crop_process`` with the SAME torch module as UNet (the project's tiny SD UNet, real
architecture, seeded random weights), the same latent, seed, conditioning and noise mask, for
every sampler × scheduler we accept, steps 4/8/20 × denoise 1/0.5/0.3, without a mask, with a soft
mask, and with a soft mask plus differential diffusion. It prints the max relative difference of
the final latent per pair (max |ours − comfy| / max |comfy|) and the wall time of both loops.

``--kind`` picks the model sampling both sides use (see :data:`KIND_SPECS`): ComfyUI's own class,
built by its ``model_base.model_sampling`` from a model config's ``sampling_settings``, against
ours from ``ModelSampling.for_comfy_model`` / ``from_comfy``: discrete eps (SD 1.x), discrete
v_prediction, v_prediction + zsnr, SD3's discrete flow (shift 3, CONST), Flux.1 dev's flux
sampling (shift 1.15, CONST) and Flux.1 schnell's discrete flow (shift 1, multiplier 1, CONST).
The same tiny SD UNet serves as the raw model of every kind (its output read as eps, v or flow
velocity): the point is the sampling arithmetic around the model, identical inputs on both sides.

ComfyUI is not a dependency: give the path of a checkout (e.g. extracted with ``git archive`` from
a ``fetch`` of Comfy-Org/ComfyUI into a temp folder outside the repo; its sampling imports need
``einops`` besides what this project installs). A checkout older than ComfyUI PR #11528 gets that
PR's two-line change (CPU ancestral seed + 1) applied in memory, so it computes what a current
release does. Samplers the checkout does not have are reported as "not in checkout".

    python benchmarks/comfy_parity.py --comfyui /tmp/comfyui [--kind sd3] [--schedulers karras] [--json out.json]
    python benchmarks/comfy_parity.py --comfyui /tmp/comfyui --kind flux_dev --grid pairs   # 4 settings per pair
    python benchmarks/comfy_parity.py --report out1.json out2.json   # merged tables

Run it under /work/wt/heavy: it times both loops.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import json
import logging
import sys
import time
from collections import defaultdict
from pathlib import Path
from types import ModuleType

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from deployments.sampling import (  # noqa: E402
    SAMPLER_NAMES,
    SCHEDULER_NAMES,
    ModelSampling,
    UNetResponse,
    crop_process,
)
from deployments.testing.tiny_sd import _unet as tiny_unet  # noqa: E402

SD15_SCALE = 0.18215  # ComfyUI's SD 1.x latent_format.process_in factor
LATENT = (1, 4, 8, 8)
SEED = 1234
MASK_MODES = ("none", "soft", "soft+dd")
# --grid pairs: every sampler × scheduler pair in four settings that between them reach every
# branch a kind changes (max denoise and partial denoise noise scaling, the noise mask's
# noise_scaling, differential diffusion's threshold in the model's timesteps, the cfg 1 shortcut,
# short and long schedules): (steps, denoise, mask, cfg).
PAIR_CASES = ((4, 1.0, "none", 6.5), (8, 0.5, "soft+dd", 6.5), (6, 0.3, "soft", 1.0), (20, 1.0, "soft", 1.0))

# kind → (ComfyUI ModelType name, its config's sampling_settings, our ModelSampling).
KIND_SPECS: dict[str, tuple[str, dict, object]] = {
    "eps": ("EPS", {}, lambda: ModelSampling.from_comfy("discrete", "eps")),
    "v": ("V_PREDICTION", {}, lambda: ModelSampling.from_comfy("discrete", "v_prediction")),
    "v_zsnr": ("V_PREDICTION", {"zsnr": True}, lambda: ModelSampling.from_comfy("discrete", "v_prediction", zsnr=True)),
    "sd3": ("FLOW", {"shift": 3.0}, lambda: ModelSampling.for_comfy_model("SD3")),
    "flux_dev": ("FLUX", {}, lambda: ModelSampling.for_comfy_model("Flux")),
    "flux_schnell": ("FLOW", {"shift": 1.0, "multiplier": 1.0}, lambda: ModelSampling.for_comfy_model("FluxSchnell")),
}


# ---------------------------------------------------------------------- ComfyUI


def load_comfy(path: Path) -> dict[str, ModuleType]:
    """Import ComfyUI's sampling modules from a checkout, CPU only, quiet."""
    sys.path.insert(0, str(path))
    argv = sys.argv
    sys.argv = [argv[0], "--cpu"]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.k_diffusion.sampling as k_sampling
        import comfy.model_base
        import comfy.model_patcher
        import comfy.sample
        import comfy.samplers
        import comfy.supported_models
    finally:
        sys.argv = argv
    logging.getLogger().setLevel(logging.WARNING)
    patched = _apply_pr_11528(k_sampling)
    return {
        "samplers": comfy.samplers,
        "sample": comfy.sample,
        "model_base": comfy.model_base,
        "model_patcher": comfy.model_patcher,
        "supported_models": comfy.supported_models,
        "differential": _differential_diffusion_node(),
        "pr_11528_patched": patched,
    }


def _differential_diffusion_node() -> type:
    """ComfyUI's DifferentialDiffusion node class (its ``forward`` is the denoise-mask function).

    Its module imports the node API (``comfy_api.latest``), which pulls PyAV and the server
    stack; when that is missing, the module is loaded against a two-name stub of that API (the
    schema classes are only used to declare the node, never by ``forward``).
    """
    try:
        from comfy_extras.nodes_differential_diffusion import DifferentialDiffusion

        return DifferentialDiffusion
    except ImportError:
        pass
    import types

    stub = types.ModuleType("comfy_api.latest")
    stub.ComfyExtension = object
    stub.io = types.SimpleNamespace(ComfyNode=object, NodeOutput=object)
    saved = {name: sys.modules.get(name) for name in ("comfy_api.latest", "comfy_extras.nodes_differential_diffusion")}
    sys.modules["comfy_api.latest"] = stub
    sys.modules.pop("comfy_extras.nodes_differential_diffusion", None)
    try:
        from comfy_extras.nodes_differential_diffusion import DifferentialDiffusion
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return DifferentialDiffusion


def _apply_pr_11528(k_sampling: ModuleType) -> bool:
    """If the checkout predates PR #11528, seed CPU ancestral noise with seed + 1 as the PR does."""
    source = inspect.getsource(k_sampling.default_noise_sampler)
    if "seed += 1" in source or "seed + 1" in source:
        return False
    original = k_sampling.default_noise_sampler

    def default_noise_sampler(x: torch.Tensor, seed: int | None = None):
        if seed is not None and x.device == torch.device("cpu"):
            seed += 1
        return original(x, seed=seed)

    k_sampling.default_noise_sampler = default_noise_sampler
    return True


class DiffusionModel(torch.nn.Module):
    """The diffusers UNet behind ComfyUI's ``diffusion_model`` call signature."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None, **_: object):
        return self.unet(x, timesteps, encoder_hidden_states=context, return_dict=False)[0]


def comfy_patcher(comfy: dict[str, ModuleType], unet: torch.nn.Module, kind: str = "eps"):
    """ComfyUI's model around the UNet, its model sampling built by ComfyUI from ``KIND_SPECS[kind]``."""
    model_type, settings, _ = KIND_SPECS[kind]
    config = comfy["supported_models"].SD15({"disable_unet_model_creation": True})
    config.sampling_settings.update(settings)  # an instance copy (supported_models_base.BASE.__init__)
    model_base = comfy["model_base"]
    model_type = getattr(model_base.ModelType, model_type)
    model = model_base.BaseModel(config, model_type=model_type, device=torch.device("cpu"))
    model.diffusion_model = DiffusionModel(unet)
    return comfy["model_patcher"].ModelPatcher(
        model, load_device=torch.device("cpu"), offload_device=torch.device("cpu")
    )


def comfy_run(comfy, patcher, case: dict, latent_raw, context, mask) -> tuple[torch.Tensor, float]:
    if case["mask"] == "soft+dd":
        patcher = patcher.clone()
        differential = comfy["differential"]
        patcher.set_model_denoise_mask_function(
            lambda *args, **kwargs: differential.forward(*args, **kwargs, strength=1.0)
        )
    noise = comfy["sample"].prepare_noise(latent_raw, SEED)
    positive = [[context["cond"], {}]]
    negative = [[context["uncond"], {}]]
    started = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):
        samples = comfy["sample"].sample(
            patcher, noise, case["steps"], case["cfg"], case["sampler"], case["scheduler"], positive, negative,
            latent_raw, denoise=case["denoise"], noise_mask=None if case["mask"] == "none" else mask,
            disable_pbar=True, seed=SEED,
        )  # fmt: skip
    return samples, time.perf_counter() - started


# ComfyUI changed these after some releases; we implement the current algorithm. A checkout whose
# source lacks the marker runs the old one, so its differences are not parity failures.
CURRENT_MARKERS = {"dpmpp_2s_ancestral_cfg_pp": ("sample_dpmpp_2s_ancestral_cfg_pp", "guidance_vector")}


def older_algorithms(comfy: dict) -> dict[str, str]:
    import comfy.k_diffusion.sampling as k_sampling

    older = {}
    for name, (function, marker) in CURRENT_MARKERS.items():
        if marker not in inspect.getsource(getattr(k_sampling, function)):
            older[name] = f"{function} without {marker!r}"
    return older


# ---------------------------------------------------------------------- ours


def ours_run(
    unet, model_sampling: ModelSampling, case: dict, latent_raw, context, mask, slicing: str = "ksampler",
    output: str = "latent",
) -> tuple[torch.Tensor, float]:
    started = time.perf_counter()
    process = crop_process(
        model_sampling, sampler_name=case["sampler"], scheduler=case["scheduler"], steps=case["steps"],
        denoise=case["denoise"], cfg=case["cfg"], seed=SEED, latent_image=latent_raw * SD15_SCALE,
        noise_mask=None if case["mask"] == "none" else mask, differential=case["mask"] == "soft+dd",
        slicing=slicing, output=output,
    )  # fmt: skip
    try:
        request = next(process)
        while True:
            t = torch.tensor([request.timestep])
            if request.uncond:  # one batch [uncond, cond], as ComfyUI's calc_cond_batch orders it
                both = torch.cat([context["uncond"], context["cond"]])
                out = unet(torch.cat([request.x_in] * 2), t.repeat(2), encoder_hidden_states=both, return_dict=False)[0]
                response = UNetResponse(cond=out[1:].float(), uncond=out[:1].float())
            else:
                out = unet(request.x_in, t, encoder_hidden_states=context["cond"], return_dict=False)[0]
                response = UNetResponse(cond=out.float())
            request = process.send(response)
    except StopIteration as done:
        final = done.value
    return final / SD15_SCALE, time.perf_counter() - started


# ---------------------------------------------------------------------- grid


def cases(
    steps_list: list[int],
    denoise_list: list[float],
    samplers: list[str],
    schedulers: list[str],
    masks: tuple[str, ...] = MASK_MODES,
    cfgs: tuple[float, ...] = (6.5,),
) -> list[dict]:
    out = []
    for sampler in samplers:
        for scheduler in schedulers:
            for steps in steps_list:
                for denoise in denoise_list:
                    for mask in masks:
                        for cfg in cfgs:
                            out.append(dict(sampler=sampler, scheduler=scheduler, steps=steps, denoise=denoise,
                                            mask=mask, cfg=cfg))  # fmt: skip
    return out


def pair_cases(samplers: list[str], schedulers: list[str]) -> list[dict]:
    """:data:`PAIR_CASES` for every sampler × scheduler pair."""
    return [dict(sampler=sampler, scheduler=scheduler, steps=steps, denoise=denoise, mask=mask, cfg=cfg)
            for sampler in samplers for scheduler in schedulers
            for steps, denoise, mask, cfg in PAIR_CASES]  # fmt: skip


def relative_difference(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """max |ours − comfy| / max |comfy| over the finite cells; inf unless the non-finite cells agree."""
    finite = torch.isfinite(reference)
    if not torch.equal(finite, torch.isfinite(ours)):
        return float("inf")
    marks = dict(nan=2.0, posinf=1.0, neginf=-1.0)  # NaN, +inf and -inf must match cell for cell
    if not torch.equal(ours[~finite].nan_to_num(**marks), reference[~finite].nan_to_num(**marks)):
        return float("inf")
    if not finite.any():
        return 0.0
    difference = float((ours[finite] - reference[finite]).abs().max())
    if difference == 0:
        return 0.0
    scale = float(reference[finite].abs().max())
    return difference / scale if scale > 0 else float("inf")


def report(paths: list[Path]) -> None:
    """Merge --json outputs (e.g. one run per scheduler or kind) into markdown tables for docs/samplers.md."""
    by_case, older, times = {}, {}, {"comfy": 0.0, "ours": 0.0}
    for path in paths:  # a later file's case replaces an earlier one's (reruns)
        data = json.loads(path.read_text())
        for result in data["results"]:
            result.setdefault("kind", data.get("kind", "eps"))
            key = tuple(result[name] for name in ("kind", "sampler", "scheduler", "steps", "denoise", "mask", "cfg"))
            by_case[key] = result
        older.update(data.get("older", {}))
    results = list(by_case.values())
    if len({r["kind"] for r in results}) > 1:
        print("| kind | cases | bit-identical | within 1e-4 | max rel diff | non-finite in ComfyUI |")
        print("|---|---|---|---|---|---|")
        for kind in dict.fromkeys(r["kind"] for r in results):
            diffs = [r["max_rel_diff"] for r in results if r["kind"] == kind and r["sampler"] not in older]
            nonfinite = sum(r.get("comfy_nonfinite", False) for r in results if r["kind"] == kind)
            print(f"| {kind} | {len(diffs)} | {sum(d == 0 for d in diffs)} | {sum(d <= 1e-4 for d in diffs)} | "
                  f"{max(diffs):.3g} | {nonfinite} |")  # fmt: skip
        kinds = list(dict.fromkeys(r["kind"] for r in results))
        for axis in ("sampler", "scheduler"):
            print(f"\n| {axis} | " + " | ".join(kinds) + " |\n|---|" + "---|" * len(kinds))
            for name in dict.fromkeys(r[axis] for r in results):
                cells = []
                for kind in kinds:
                    diffs = [r["max_rel_diff"] for r in results if r[axis] == name and r["kind"] == kind]
                    identical = sum(d == 0 for d in diffs)
                    worst = "" if identical == len(diffs) else f", max {max(diffs):.2g}"
                    cells.append(f"{identical}/{len(diffs)}{worst}")
                note = " (older algorithm in the checkout)" if name in older else ""
                print(f"| `{name}`{note} | " + " | ".join(cells) + " |")
        print()
        for kind in kinds:
            comfy = sum(r["comfy_s"] for r in results if r["kind"] == kind)
            ours = sum(r["ours_s"] for r in results if r["kind"] == kind)
            print(f"{kind}: sampling wall time ComfyUI {comfy:.1f} s, ours {ours:.1f} s")
        print()
    for key in times:
        times[key] = sum(r[f"{key}_s"] for r in results)
    print("| sampler | cases | max rel diff | within 1e-4 | bit-identical |\n|---|---|---|---|---|")
    for name in dict.fromkeys(r["sampler"] for r in results):
        diffs = [r["max_rel_diff"] for r in results if r["sampler"] == name]
        note = " (older algorithm in the checkout)" if name in older else ""
        print(f"| {name}{note} | {len(diffs)} | {max(diffs):.3g} | {sum(d <= 1e-4 for d in diffs)} | "
              f"{sum(d == 0 for d in diffs)} |")  # fmt: skip
    print("\n| scheduler | cases | max rel diff (current algorithms) |\n|---|---|---|")
    for name in dict.fromkeys(r["scheduler"] for r in results):
        diffs = [r["max_rel_diff"] for r in results if r["scheduler"] == name and r["sampler"] not in older]
        print(f"| {name} | {len(diffs)} | {max(diffs):.3g} |")
    counted = [r["max_rel_diff"] for r in results if r["sampler"] not in older]
    print(
        f"\n{len(results)} cases, {len(counted)} with the current algorithm in the checkout: max rel diff "
        f"{max(counted):.3g}, {sum(d <= 1e-4 for d in counted)} within 1e-4, "
        f"{sum(d == 0 for d in counted)} bit-identical"
    )
    print(f"sampling wall time: ComfyUI {times['comfy']:.1f} s, ours {times['ours']:.1f} s "
          f"(ours/ComfyUI = {times['ours'] / times['comfy']:.3f})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", nargs="+", type=Path, help="only merge these --json outputs into tables")
    parser.add_argument("--comfyui", type=Path, help="path of a ComfyUI checkout")
    parser.add_argument("--kind", choices=list(KIND_SPECS), default="eps", help="model sampling of both sides")
    parser.add_argument("--cfg", nargs="*", type=float, default=[6.5])
    parser.add_argument("--steps", nargs="*", type=int, default=[4, 8, 20])
    parser.add_argument("--denoise", nargs="*", type=float, default=[1.0, 0.5, 0.3])
    parser.add_argument("--samplers", nargs="*", default=list(SAMPLER_NAMES))
    parser.add_argument("--schedulers", nargs="*", default=list(SCHEDULER_NAMES))
    parser.add_argument("--masks", nargs="*", choices=MASK_MODES, default=list(MASK_MODES))
    parser.add_argument("--grid", choices=("full", "pairs"), default="full",
                        help="full: the product of --steps/--denoise/--masks/--cfg; pairs: PAIR_CASES per pair")
    parser.add_argument("--json", type=Path, help="write every case's result here")
    args = parser.parse_args()
    if args.report:
        report(args.report)
        return
    if args.comfyui is None:
        parser.error("--comfyui is required (or --report)")

    torch.set_num_threads(1)
    comfy = load_comfy(args.comfyui)
    torch.manual_seed(0)
    unet = tiny_unet().eval().requires_grad_(False)
    patcher = comfy_patcher(comfy, unet, args.kind)
    model_sampling = KIND_SPECS[args.kind][2]()
    comfy_sampling = patcher.model.model_sampling
    comfy_classes = " + ".join(base.__name__ for base in type(comfy_sampling).__bases__)
    tables_equal = torch.equal(comfy_sampling.sigmas, model_sampling.sigmas)
    print(f"kind {args.kind}: ComfyUI {comfy_classes}, ours {model_sampling!r}; tables equal: {tables_equal}")
    generator = torch.Generator().manual_seed(99)
    latent_raw = torch.randn(LATENT, generator=generator) * 5.0
    context = {
        "cond": torch.randn(1, 77, 32, generator=generator),
        "uncond": torch.randn(1, 77, 32, generator=generator),
    }
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, LATENT[2]), torch.linspace(-1, 1, LATENT[3]), indexing="ij")
    mask = (1.2 - (xx**2 + yy**2).sqrt()).clamp(0, 1).reshape(1, 1, LATENT[2], LATENT[3])  # soft radial

    comfy_names = set(comfy["samplers"].KSampler.SAMPLERS)
    older = older_algorithms(comfy)
    results = []
    by_sampler: dict[str, list[float]] = defaultdict(list)
    missing = sorted(set(args.samplers) - comfy_names)
    times = {"comfy": 0.0, "ours": 0.0}
    print(f"ComfyUI checkout: {args.comfyui} (PR #11528 applied in memory: {comfy['pr_11528_patched']})")
    with torch.inference_mode():
        samplers = [s for s in args.samplers if s in comfy_names]
        grid = (
            pair_cases(samplers, args.schedulers) if args.grid == "pairs"
            else cases(args.steps, args.denoise, samplers, args.schedulers, tuple(args.masks), tuple(args.cfg))
        )  # fmt: skip
        for case in grid:
            reference, comfy_seconds = comfy_run(comfy, patcher, case, latent_raw, context, mask)
            ours, our_seconds = ours_run(unet, model_sampling, case, latent_raw, context, mask)
            diff = relative_difference(ours, reference)
            times["comfy"] += comfy_seconds
            times["ours"] += our_seconds
            by_sampler[case["sampler"]].append(diff)
            results.append({**case, "kind": args.kind, "max_rel_diff": diff, "comfy_s": comfy_seconds,
                            "ours_s": our_seconds, "comfy_nonfinite": not bool(torch.isfinite(reference).all()),
                            "comfy_max_abs": float(reference[torch.isfinite(reference)].abs().max())
                            if torch.isfinite(reference).any() else None})  # fmt: skip
            if diff > 1e-4 and case["sampler"] not in older:
                print(f"  over 1e-4: {case} → {diff:.3g}")
    print(f"\n{'sampler':32s} {'cases':>5s} {'max rel diff':>13s} {'≤1e-4':>6s}")
    for name in args.samplers:
        if name in missing:
            print(f"{name:32s} {'-':>5s} {'not in checkout':>13s}")
            continue
        diffs = by_sampler[name]
        note = f"  (checkout has the older algorithm: {older[name]})" if name in older else ""
        print(f"{name:32s} {len(diffs):5d} {max(diffs):13.3g} {sum(d <= 1e-4 for d in diffs):6d}{note}")
    all_diffs = [r["max_rel_diff"] for r in results if r["sampler"] not in older]
    print(
        f"\n{len(all_diffs)} cases; max rel diff {max(all_diffs):.3g}; {sum(d <= 1e-4 for d in all_diffs)} within 1e-4"
    )
    print(f"sampling wall time: ComfyUI {times['comfy']:.1f} s, ours {times['ours']:.1f} s "
          f"(ours/ComfyUI = {times['ours'] / times['comfy']:.3f})")  # fmt: skip
    if args.json:
        args.json.write_text(
            json.dumps(
                {"kind": args.kind, "results": results, "times": times, "missing": missing, "older": older}, indent=1
            )
        )


if __name__ == "__main__":
    main()

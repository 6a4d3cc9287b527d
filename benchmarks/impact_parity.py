"""Parity of ``slicing="impact"`` with Impact Pack's own ``ksampler_wrapper`` (FaceDetailer's path).

FaceDetailer does not call ComfyUI's KSampler node: it samples through Impact's
``ksampler_wrapper`` → ``separated_sample`` → ComfyUI's ``sample_custom``. This script runs that
real code (``impact_sampling.py`` of an Impact Pack checkout on a ComfyUI checkout) and our
``crop_process(..., slicing="impact")`` with the same tiny SD UNet, latent, seed, conditioning and
noise mask as ``comfy_parity.py``, and reports per case:

- ``sigmas``: Impact's run sigmas (what it hands ``sample_custom``) equal ``sigmas_for(...,
  slicing="impact")`` exactly (both empty when Impact returns the latent unsampled);
- ``final``: max |ours − Impact| / max |Impact| of the sampler's final latent (``sample_custom``'s
  output, which Impact computes before choosing what to return);
- ``returned``: our ``output="denoised"`` (what the inpainter's cycles return) against what
  ``ksampler_wrapper`` returns, the x0 its preview callback last saw
  (``return_with_leftover_noise=False``);
- ``x0``: Impact's returned x0 against its own final latent: where the choice of output matters;
- ``ksampler``: our ``slicing="ksampler"`` against Impact's final latent, to show where the two
  modes part.

``nodes`` (ComfyUI's node module) needs PyAV and the server stack; Impact uses it only for its extra
schedulers (AYS, GITS, ...) and the refiner's composite, none of which these cases reach, so when it
cannot be imported a stub with an empty ``NODE_CLASS_MAPPINGS`` stands in.

    python benchmarks/impact_parity.py --comfyui /tmp/comfyui --impact /tmp/impact [--json out.json]

``--impact`` is a folder holding ``impact_sampling.py`` or an Impact Pack checkout. Run it under
/work/wt/heavy.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import sys
import time
import types
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from comfy_parity import KIND_SPECS, LATENT, SEED, comfy_patcher, load_comfy, older_algorithms, ours_run  # noqa: E402

from deployments.sampling import SAMPLER_NAMES, sigmas_for  # noqa: E402
from deployments.testing.tiny_sd import _unet as tiny_unet  # noqa: E402

# (steps, denoise): ddim_uniform differs at (4, 0.6) and (7, 1.0); beta at (14, 0.1) (T = 140 drops a
# repeated timestep); (20, 0.5) agrees for every scheduler except the SDE samplers' tree range;
# (20, 0.01): T = 2000, Impact returns the latent unsampled for ddim_uniform and beta.
DEFAULT_RUNS = ("4:0.6", "7:1.0", "14:0.1", "20:0.5", "20:0.01")


def load_impact(path: Path) -> types.ModuleType:
    """Impact's ``impact_sampling`` module, imported from a checkout on the ComfyUI already on sys.path."""
    candidates = [path / "impact_sampling.py", path / "modules" / "impact" / "impact_sampling.py"]
    source = next((candidate for candidate in candidates if candidate.is_file()), None)
    if source is None:
        raise SystemExit(f"no impact_sampling.py under {path}")
    try:
        import nodes  # noqa: F401
    except ImportError:
        stub = types.ModuleType("nodes")
        stub.NODE_CLASS_MAPPINGS = {}
        sys.modules["nodes"] = stub
    spec = importlib.util.spec_from_file_location("impact_sampling", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def impact_run(comfy: dict, impact: types.ModuleType, patcher, case: dict, latent_raw, context, mask) -> dict:
    """Impact's ksampler_wrapper on ComfyUI: its run sigmas, the sampler's final latent and its return."""
    if case["mask"] == "soft+dd":
        patcher = patcher.clone()
        differential = comfy["differential"]
        patcher.set_model_denoise_mask_function(
            lambda *args, **kwargs: differential.forward(*args, **kwargs, strength=1.0)
        )
    captured: dict = {}
    original = impact.sample_with_custom_noise

    def capture(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        # (model, add_noise, seed, cfg, pos, neg, sampler, sigmas, ...); copied before the run:
        # ComfyUI's uni_pc writes 0.001 over the last sigma in place.
        captured["sigmas"] = args[7].detach().clone()
        result = original(*args, **kwargs)
        captured["final"] = result[0]["samples"]
        return result

    latent = {"samples": latent_raw.clone()}
    if case["mask"] != "none":
        latent["noise_mask"] = mask
    positive = [[context["cond"], {}]]
    negative = [[context["uncond"], {}]]
    impact.sample_with_custom_noise = capture
    started = time.perf_counter()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            out = impact.ksampler_wrapper(
                patcher, SEED, case["steps"], case["cfg"], case["sampler"], case["scheduler"], positive, negative,
                latent, case["denoise"],
            )  # fmt: skip
    finally:
        impact.sample_with_custom_noise = original
    seconds = time.perf_counter() - started
    returned = out["samples"]
    return {
        "sigmas": captured.get("sigmas", torch.zeros(0)),
        "final": captured.get("final", returned),  # unsampled: Impact returns the input latent
        "returned": returned,
        "seconds": seconds,
    }


def rel_diff(ours: torch.Tensor, reference: torch.Tensor) -> float:
    scale = float(reference.abs().max())
    diff = float((ours.float() - reference.float()).abs().max())
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", type=Path, required=True, help="path of a ComfyUI checkout")
    parser.add_argument(
        "--impact", type=Path, required=True, help="Impact Pack checkout or folder of impact_sampling.py"
    )
    parser.add_argument("--runs", nargs="*", default=list(DEFAULT_RUNS), help="steps:denoise pairs")
    parser.add_argument("--samplers", nargs="*", default=list(SAMPLER_NAMES))
    parser.add_argument("--schedulers", nargs="*", default=["ddim_uniform", "beta", "karras"])
    parser.add_argument("--masks", nargs="*", default=["soft+dd"], choices=["none", "soft", "soft+dd"])
    parser.add_argument("--kind", choices=list(KIND_SPECS), default="eps", help="model sampling (see comfy_parity)")
    parser.add_argument("--json", type=Path, help="write every case's result here")
    args = parser.parse_args()

    torch.set_num_threads(1)
    comfy = load_comfy(args.comfyui)
    impact = load_impact(args.impact)
    torch.manual_seed(0)
    unet = tiny_unet().eval().requires_grad_(False)
    patcher = comfy_patcher(comfy, unet, args.kind)
    model_sampling = KIND_SPECS[args.kind][2]()
    generator = torch.Generator().manual_seed(99)
    latent_raw = torch.randn(LATENT, generator=generator) * 5.0
    context = {
        "cond": torch.randn(1, 77, 32, generator=generator),
        "uncond": torch.randn(1, 77, 32, generator=generator),
    }
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, LATENT[2]), torch.linspace(-1, 1, LATENT[3]), indexing="ij")
    mask = (1.2 - (xx**2 + yy**2).sqrt()).clamp(0, 1).reshape(1, 1, LATENT[2], LATENT[3])

    comfy_names = set(comfy["samplers"].KSampler.SAMPLERS)
    older = older_algorithms(comfy)  # the checkout runs an older algorithm: not a parity measure
    samplers = [name for name in args.samplers if name in comfy_names]
    runs = [(int(steps), float(denoise)) for steps, denoise in (run.split(":") for run in args.runs)]
    results = []
    by_sampler: dict[str, list[dict]] = defaultdict(list)
    times = {"impact": 0.0, "ours": 0.0}
    print(f"ComfyUI {args.comfyui}, Impact {args.impact}; PR #11528 applied in memory: {comfy['pr_11528_patched']}; "
          f"kind {args.kind}: {model_sampling!r}")  # fmt: skip
    with torch.inference_mode():
        for sampler in samplers:
            for scheduler in args.schedulers:
                for steps, denoise in runs:
                    for mask_mode in args.masks:
                        case = dict(sampler=sampler, scheduler=scheduler, steps=steps, denoise=denoise,
                                    mask=mask_mode, cfg=6.5, kind=args.kind)  # fmt: skip
                        reference = impact_run(comfy, impact, patcher, case, latent_raw, context, mask)
                        ours, seconds = ours_run(unet, model_sampling, case, latent_raw, context, mask, "impact")
                        returned, _ = ours_run(unet, model_sampling, case, latent_raw, context, mask, "impact",
                                               output="denoised")  # fmt: skip
                        other, _ = ours_run(unet, model_sampling, case, latent_raw, context, mask, "ksampler")
                        expected = sigmas_for(model_sampling, sampler, scheduler, steps, denoise, slicing="impact")
                        result = {
                            **case,
                            "sigmas_equal": torch.equal(reference["sigmas"].float().cpu(), expected),
                            "impact_steps": max(len(reference["sigmas"]) - 1, 0),
                            "final": rel_diff(ours, reference["final"]),
                            "returned": rel_diff(returned, reference["returned"]),
                            "x0": rel_diff(reference["final"], reference["returned"]),
                            "ksampler": rel_diff(other, reference["final"]),
                            "impact_s": reference["seconds"],
                            "ours_s": seconds,
                        }
                        times["impact"] += reference["seconds"]
                        times["ours"] += seconds
                        results.append(result)
                        by_sampler[sampler].append(result)
                        if not result["sigmas_equal"] or (
                            max(result["final"], result["returned"]) > 1e-4 and sampler not in older
                        ):
                            print(
                                f"  MISMATCH {case}: sigmas equal {result['sigmas_equal']}, final {result['final']:.3g}"
                                f", returned {result['returned']:.3g}"
                            )
    header = (
        f"{'sampler':32s} {'cases':>5s} {'sigmas =':>8s} {'final max':>10s} {'returned max':>12s} {'x0 max':>9s} "
        f"{'ksampler max':>12s}"
    )
    print("\n" + header)
    for name, rows in by_sampler.items():
        note = "  (older algorithm in the checkout)" if name in older else ""
        print(f"{name:32s} {len(rows):5d} {sum(r['sigmas_equal'] for r in rows):8d} "
              f"{max(r['final'] for r in rows):10.3g} {max(r['returned'] for r in rows):12.3g} "
              f"{max(r['x0'] for r in rows):9.3g} "
              f"{max(r['ksampler'] for r in rows):12.3g}{note}")  # fmt: skip
    finals = [r["final"] for r in results if r["sampler"] not in older]
    print(
        f"\n{len(results)} cases: run sigmas identical in {sum(r['sigmas_equal'] for r in results)}; final latent "
        f"({len(finals)} cases of current algorithms) max rel diff {max(finals):.3g}, "
        f"bit-identical in {sum(d == 0 for d in finals)}; returned output max rel diff "
        f"{max(r['returned'] for r in results if r['sampler'] not in older):.3g}, bit-identical in "
        f"{sum(r['returned'] == 0 for r in results if r['sampler'] not in older)}; "
        f"ksampler slicing differs (> 1e-4) in {sum(r['ksampler'] > 1e-4 for r in results)}; "
        f"Impact's returned x0 differs from the final latent (> 1e-4) in {sum(r['x0'] > 1e-4 for r in results)}"
    )
    print(f"sampling wall time: Impact+ComfyUI {times['impact']:.1f} s, ours {times['ours']:.1f} s")
    if args.json:
        args.json.write_text(
            json.dumps({"kind": args.kind, "results": results, "times": times, "older": older}, indent=1)
        )


if __name__ == "__main__":
    main()

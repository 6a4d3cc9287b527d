"""One import direction in ``deployments/``: real models below, ``sim://`` stand-ins on top, one loader choosing."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from deployments import model_loading, simulated
from deployments.detector import FaceDetector
from deployments.inpainter import Inpainter
from deployments.sam import SamSegmenter
from deployments.weights import WeightsNotFoundError

DEPLOYMENTS = Path(__file__).resolve().parents[2] / "deployments"
# The loader chooses between the two sides; the Serve wrappers use the loader.
ABOVE_BOTH = {"model_loading", "serving"}


def module_name(path: Path) -> str:
    return ".".join(("deployments", *path.relative_to(DEPLOYMENTS).with_suffix("").parts)).removesuffix(".__init__")


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports anywhere (top level, or lazily inside a function), absolute names."""
    return imports_in(path.read_text(encoding="utf-8"), package=module_name(path).rsplit(".", 1)[0])


def imports_in(source: str, package: str) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # ``from deployments import simulated``
    return found


def test_the_reader_sees_lazy_package_and_relative_imports() -> None:
    """The checker itself can fail: an import hidden in a method, ``from deployments import x``, ``from . import x``."""
    lazy = "class A:\n    def __new__(cls):\n        from deployments.simulated import SimulatedDetector\n"
    assert "deployments.simulated" in imports_in(lazy, "deployments")
    assert "deployments.model_loading" in imports_in("from deployments import model_loading\n", "deployments")
    assert "deployments.simulated" in imports_in("from .. import simulated\n", "deployments.sampling")
    assert "deployments.simulated.SimulatedSegmenter" in imports_in(
        "from .simulated import SimulatedSegmenter\n", "deployments"
    )


def test_real_model_modules_do_not_import_the_stand_ins_or_the_loader() -> None:
    offenders = {}
    for path in sorted(DEPLOYMENTS.rglob("*.py")):
        name = module_name(path)
        short = name.removeprefix("deployments.")
        if short in ABOVE_BOTH or short == "simulated":
            continue
        above = ("deployments.simulated", "deployments.model_loading")
        wrong = {module for module in imported_modules(path) if module.startswith(above)}
        if wrong:
            offenders[name] = sorted(wrong)
    assert offenders == {}, f"real model modules must not know the sim:// stand-ins or the loader: {offenders}"
    # The Serve wrappers pick models through the loader only, never the stand-ins directly.
    assert not any(m.startswith("deployments.simulated") for m in imported_modules(DEPLOYMENTS / "serving.py"))
    assert "deployments.model_loading" in imported_modules(DEPLOYMENTS / "serving.py")


def test_the_loader_picks_the_stand_in_for_sim_references_only() -> None:
    assert isinstance(model_loading.load_detector("sim://detector?cost=0"), simulated.SimulatedDetector)
    assert isinstance(model_loading.load_segmenter("sim://sam?encoder=0&decoder=0"), simulated.SimulatedSegmenter)
    inpainter = model_loading.load_inpainter("sim://sd15?a=0&b=0", device="cpu")
    assert inpainter.components.format == "simulated"
    assert inpainter.info()["simulated"]["unet_a_s"] == 0.0  # the stand-in's cost model still reaches info()
    with pytest.raises(WeightsNotFoundError, match="missing.pt"):  # a real reference goes to the real class
        model_loading.load_detector("missing.pt")


@pytest.mark.parametrize(
    "construct",
    [
        lambda: FaceDetector("sim://detector"),
        lambda: SamSegmenter("sim://sam"),
        lambda: Inpainter("sim://sd15", device="cpu"),
    ],
    ids=["detector", "sam", "inpainter"],
)
def test_a_real_class_refuses_a_sim_reference_and_names_the_loader(construct) -> None:
    with pytest.raises(WeightsNotFoundError, match=r"sim://.*deployments\.model_loading"):
        construct()

"""Which configured model a request uses: the node's model inputs, chosen by name.

A service may configure several bbox detectors (e.g. a face and a hand model), segm detectors
and SAM models (``args.detectors`` / ``segm_detectors`` / ``sam_models``); a request names one
with ``bbox_detector`` / ``segm_detector`` / ``sam_model`` and gets the first configured one
otherwise. The single ``detector`` / ``segm_detector`` / ``sam`` config forms are the one model
named ``default``. Works with deployment handles (the ingress) and in-process models alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

Model = TypeVar("Model")

DEFAULT_NAME = "default"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # also part of the deployment's name


class ModelChoiceError(ValueError):
    """A request named a model the service does not have (HTTP 422)."""


@dataclass(frozen=True)
class NamedModels(Generic[Model]):
    """The configured models of one kind, in configuration order (the first is the default)."""

    field: str  # the request field that names one, e.g. "bbox_detector"
    models: Mapping[str, Model]

    @classmethod
    def of(cls, field: str, value: Model | Mapping[str, Model] | None) -> NamedModels[Model]:
        """From a single model (named ``default``), a ``{name: model}`` mapping, or nothing."""
        if value is None:
            return cls(field, {})
        if isinstance(value, Mapping):
            return cls(field, dict(value))
        return cls(field, {DEFAULT_NAME: value})

    @property
    def names(self) -> list[str]:
        return list(self.models)

    @property
    def default(self) -> Model | None:
        return next(iter(self.models.values()), None)

    def resolve(self, name: str | None) -> Model | None:
        """The named model, the default for no name, None when none is configured and none named."""
        if name is None:
            return self.default
        if name in self.models:
            return self.models[name]
        if not self.models:
            raise ModelChoiceError(f"{self.field}: {name!r} named, but this service configures none")
        raise ModelChoiceError(f"{self.field}: unknown {name!r}; configured: {', '.join(self.models)}")


@dataclass(frozen=True)
class SelectedModels(Generic[Model]):
    detector: Model
    segm_detector: Model | None
    sam: Model | None


@dataclass(frozen=True)
class ModelChoice(Generic[Model]):
    """A service's detectors, segm detectors and SAM models by name."""

    detectors: NamedModels[Model]
    segm_detectors: NamedModels[Model]
    sam_models: NamedModels[Model]

    @classmethod
    def of(
        cls,
        detector: Model | Mapping[str, Model],
        segm_detector: Model | Mapping[str, Model] | None = None,
        sam: Model | Mapping[str, Model] | None = None,
    ) -> ModelChoice[Model]:
        choice = cls(
            NamedModels.of("bbox_detector", detector),
            NamedModels.of("segm_detector", segm_detector),
            NamedModels.of("sam_model", sam),
        )
        if choice.detectors.default is None:
            raise ValueError("at least one bbox detector is required")
        return choice

    def select(self, params: Any) -> SelectedModels[Model]:
        """The models a request's ``bbox_detector``/``segm_detector``/``sam_model`` fields name."""
        detector = self.detectors.resolve(params.bbox_detector)
        assert detector is not None  # of() guarantees a default
        return SelectedModels(
            detector=detector,
            segm_detector=self.segm_detectors.resolve(params.segm_detector),
            sam=self.sam_models.resolve(params.sam_model),
        )

    def labelled(self) -> dict[str, Model]:
        """Every model under a label for health reports: ``detector`` for a lone default, else ``detector:<name>``."""
        labelled: dict[str, Model] = {}
        for kind, named in (
            ("detector", self.detectors),
            ("segm_detector", self.segm_detectors),
            ("sam", self.sam_models),
        ):
            for name, model in named.models.items():
                label = kind if named.names == [DEFAULT_NAME] else f"{kind}:{name}"
                labelled[label] = model
        return labelled

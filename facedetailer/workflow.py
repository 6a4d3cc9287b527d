"""ComfyUI workflow import: a FaceDetailer node's values as this service's parameters.

Two formats are read. The **API format** (``Save (API)``, the body of ComfyUI's ``/prompt``)
maps node ids to ``{"class_type", "inputs"}``, where a linked input is ``[node_id, slot]``. The
**UI format** (``Save``) has ``nodes`` (each with positional ``widgets_values``) and ``links``;
there a seed widget is followed by its ``control_after_generate`` value ("fixed", …), which is
not a parameter. ``positive``/``negative`` are taken from the CLIPTextEncode nodes linked to
the FaceDetailer node (through Reroute nodes); a FluxGuidance node on the way gives ``guidance``
(on the positive, as Flux workflows place it), and Impact's Negative Cond Placeholder as the
negative gives ``negative: null``. Pure: JSON in, values out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from facedetailer.json_bounds import JsonLimitError, check_json, loads_bounded
from facedetailer.widgets import NODE_WIDGETS, SEED_CONTROL_VALUES, UNSUPPORTED_NODE_WIDGETS, widget_specs

FACEDETAILER = "FaceDetailer"
TEXT_ENCODERS = ("CLIPTextEncode",)
PASSTHROUGH = ("Reroute",)
GUIDANCE_NODE = "FluxGuidance"  # conditioning + guidance → the request's guidance
NEGATIVE_PLACEHOLDER = "ImpactNegativeConditioningPlaceholder"  # → negative: null (basic guidance)
PROMPT_INPUTS = ("positive", "negative")
# Inputs that are models: the service decides them; their sources are reported, not imported.
MODEL_INPUTS = ("model", "clip", "vae", "bbox_detector", "sam_model_opt", "segm_detector_opt")
# Optional model inputs whose presence switches a service feature on.
SWITCHES = {"sam_model_opt": "use_sam", "segm_detector_opt": "use_segm"}
UNSUPPORTED_INPUTS = {
    "detailer_hook": "hook nodes cannot be imported yet; disconnect it and send the hooks as detailer_hooks",
    "scheduler_func_opt": "a custom scheduler function cannot be imported; disconnect it and pick a scheduler",
}
# widgets_values lengths (without the seed control) of the Impact Pack releases this importer knows.
KNOWN_WIDGET_COUNTS = tuple(
    NODE_WIDGETS.index(last) + 1 for last in ("wildcard", "cycle", "noise_mask_feather", "tiled_decode")
)


class WorkflowError(ValueError):
    """The workflow cannot be imported as asked; ``field`` names the request field or parameter."""

    def __init__(self, message: str, field: str = "workflow") -> None:
        super().__init__(message)
        self.field = field


@dataclass
class ModelSource:
    """Where a model input of the node comes from (reported; the service uses its own models)."""

    node: str
    class_type: str
    value: Any = None


@dataclass
class WorkflowImport:
    """The chosen node's values, ready for :class:`~facedetailer.params.FaceDetailerParams`."""

    params: dict[str, Any]
    node_id: str
    node_title: str | None
    format: Literal["api", "ui"]
    models: dict[str, ModelSource] = field(default_factory=dict)


def import_workflow(workflow: dict[str, Any] | str | bytes, node: str | int | None = None) -> WorkflowImport:
    """Read the FaceDetailer node ``node`` (default: the only one) of a workflow in either format."""
    data = _load(workflow)
    if isinstance(data.get("nodes"), list):
        return _UiWorkflow(data).import_node(node)
    if isinstance(data.get("prompt"), dict) and _looks_like_api(data["prompt"]):
        data = data["prompt"]  # a /prompt request body
    if _looks_like_api(data):
        return _ApiWorkflow(data).import_node(node)
    raise WorkflowError("workflow: neither ComfyUI's API format (node id → class_type/inputs) nor its saved UI format")


def _load(workflow: dict[str, Any] | str | bytes) -> dict[str, Any]:
    """The workflow as a dict; :class:`~facedetailer.json_bounds.JsonLimitError` (a ValueError)
    for one nested too deep or too large to walk (:mod:`facedetailer.json_bounds`)."""
    if isinstance(workflow, bytes | str):
        try:
            workflow = loads_bounded(workflow, "workflow")
        except JsonLimitError:
            raise
        except ValueError as error:
            raise WorkflowError(str(error)) from error
    else:
        check_json(workflow, "workflow")
    if not isinstance(workflow, dict):
        raise WorkflowError("workflow: must be a JSON object")
    return workflow


def _looks_like_api(data: dict[str, Any]) -> bool:
    return bool(data) and all(isinstance(node, dict) and "class_type" in node for node in data.values())


def _pick(candidates: dict[str, str | None], node: str | int | None) -> str:
    if node is not None:
        wanted = str(node)
        if wanted not in candidates:
            listed = ", ".join(candidates) or "none"
            raise WorkflowError(
                f"workflow_node: no FaceDetailer node with id {wanted} (FaceDetailer nodes: {listed})", "workflow_node"
            )
        return wanted
    if not candidates:
        raise WorkflowError("workflow: no FaceDetailer node in this workflow")
    if len(candidates) > 1:
        listed = ", ".join(f"{key} ({title!r})" if title else key for key, title in candidates.items())
        raise WorkflowError(
            f"workflow: {len(candidates)} FaceDetailer nodes ({listed}); choose one with workflow_node", "workflow_node"
        )
    return next(iter(candidates))


def _check_unsupported(params: dict[str, Any]) -> None:
    for name in UNSUPPORTED_NODE_WIDGETS:
        if params.pop(name, False):
            raise WorkflowError(f"{name}: enabled in the workflow, but this service cannot honour it yet", name)


class _ApiWorkflow:
    def __init__(self, nodes: dict[str, Any]) -> None:
        self.nodes = {str(key): value for key, value in nodes.items()}

    def import_node(self, node: str | int | None) -> WorkflowImport:
        candidates = {
            key: (value.get("_meta") or {}).get("title")
            for key, value in self.nodes.items()
            if value.get("class_type") == FACEDETAILER
        }
        node_id = _pick(candidates, node)
        inputs: dict[str, Any] = self.nodes[node_id].get("inputs", {})
        params: dict[str, Any] = {}
        for name in NODE_WIDGETS:
            if name in inputs:
                params[name] = self._value(inputs[name], name)
        models: dict[str, ModelSource] = {}
        for name, value in inputs.items():
            if name in UNSUPPORTED_INPUTS and _is_link(value):
                raise WorkflowError(f"{name}: {UNSUPPORTED_INPUTS[name]}", name)
            if name in MODEL_INPUTS and _is_link(value):
                models[name] = self._model_source(value)
                if name in SWITCHES:
                    params[SWITCHES[name]] = True
        for name in PROMPT_INPUTS:
            if _is_link(inputs.get(name)):
                params.update(self._conditioning(inputs[name], name))
        _check_unsupported(params)
        return WorkflowImport(params, node_id, candidates[node_id], "api", models)

    def _conditioning(self, link: list[Any], name: str) -> dict[str, Any]:
        """``{name: text}``, through a FluxGuidance node (+ ``guidance``); ``{negative: None}``: the placeholder."""
        source, node = self._node(link, name)
        kind = node.get("class_type")
        if kind == NEGATIVE_PLACEHOLDER and name == "negative":
            return {"negative": None}
        if kind == GUIDANCE_NODE and name == "positive":
            inputs = node.get("inputs", {})
            if not _is_link(inputs.get("conditioning")):
                raise WorkflowError(f"{name}: FluxGuidance node {source} has no conditioning input", name)
            return {**self._conditioning(inputs["conditioning"], name),
                    "guidance": self._value(inputs.get("guidance", 3.5), "guidance")}  # fmt: skip
        return {name: self._prompt(link, name)}

    def _node(self, link: list[Any], name: str) -> tuple[str, dict[str, Any]]:
        source = str(link[0])
        if source not in self.nodes:
            raise WorkflowError(f"{name}: linked to node {source}, which is not in the workflow", name)
        return source, self.nodes[source]

    def _value(self, value: Any, name: str) -> Any:
        """A literal, or the single literal input of a value node (a primitive, a seed node) it links to."""
        if not _is_link(value):
            return value
        source, node = self._node(value, name)
        literals = [item for item in node.get("inputs", {}).values() if not _is_link(item)]
        if len(literals) != 1:
            raise WorkflowError(
                f"{name}: comes from node {source} ({node.get('class_type')}), whose value cannot be read statically",
                name,
            )
        return literals[0]

    def _prompt(self, link: list[Any], name: str) -> str:
        source, node = self._node(link, name)
        if node.get("class_type") not in TEXT_ENCODERS:
            raise WorkflowError(
                f"{name}: linked to node {source} ({node.get('class_type')}); only the text of a CLIPTextEncode "
                "node can be imported",
                name,
            )
        text = self._value(node.get("inputs", {}).get("text", ""), name)
        if not isinstance(text, str):
            raise WorkflowError(f"{name}: the text of node {source} is not a string", name)
        return text

    def _model_source(self, link: list[Any]) -> ModelSource:
        source = str(link[0])
        node = self.nodes.get(source, {})
        literals = [item for item in node.get("inputs", {}).values() if isinstance(item, str)]
        return ModelSource(source, node.get("class_type", "?"), literals[0] if literals else None)


WIDGET_KINDS = {spec["name"]: spec["type"] for spec in widget_specs()}


def _fits(name: str, value: Any) -> bool:
    """Whether a positional widget value has the widget's type (a shifted layout would not)."""
    kind = WIDGET_KINDS.get(name, "BOOLEAN")  # tiled_encode/tiled_decode are not parameters
    if kind == "BOOLEAN":
        return isinstance(value, bool)
    if kind in ("STRING", "COMBO"):
        return isinstance(value, str) or (name == "sam_mask_hint_use_negative" and value is False)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return kind == "FLOAT" or float(value).is_integer()


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int) and not isinstance(value[1], bool)


class _UiWorkflow:
    def __init__(self, data: dict[str, Any]) -> None:
        self.nodes = {str(node.get("id")): node for node in data["nodes"] if isinstance(node, dict)}
        self.links: dict[str, tuple[str, int]] = {}
        for link in data.get("links") or []:
            if isinstance(link, list) and len(link) >= 5:  # [id, origin, origin_slot, target, target_slot, type]
                self.links[str(link[0])] = (str(link[1]), int(link[2]))
            elif isinstance(link, dict):  # the newer schema's link objects
                self.links[str(link.get("id"))] = (str(link.get("origin_id")), int(link.get("origin_slot", 0)))

    def import_node(self, node: str | int | None) -> WorkflowImport:
        candidates = {key: value.get("title") for key, value in self.nodes.items() if value.get("type") == FACEDETAILER}
        node_id = _pick(candidates, node)
        face = self.nodes[node_id]
        params = self._widgets(face, node_id)
        models: dict[str, ModelSource] = {}
        for slot in face.get("inputs") or []:
            name, link = slot.get("name"), slot.get("link")
            if link is None:
                continue
            widget = (slot.get("widget") or {}).get("name")
            if widget in NODE_WIDGETS:  # a widget converted to an input and linked
                params[widget] = self._linked_value(link, widget)
            elif name in UNSUPPORTED_INPUTS:
                raise WorkflowError(f"{name}: {UNSUPPORTED_INPUTS[name]}", name)
            elif name in MODEL_INPUTS:
                source, source_node = self._source(link, name)
                values = source_node.get("widgets_values")
                first = values[0] if isinstance(values, list) and values else None
                models[name] = ModelSource(source, source_node.get("type", "?"), first)
                if name in SWITCHES:
                    params[SWITCHES[name]] = True
            elif name in PROMPT_INPUTS:
                params.update(self._conditioning(link, name))
        _check_unsupported(params)
        return WorkflowImport(params, node_id, face.get("title"), "ui", models)

    def _conditioning(self, link: Any, name: str) -> dict[str, Any]:
        """``{name: text}``, through a FluxGuidance node (+ ``guidance``); ``{negative: None}``: the placeholder."""
        source, node = self._source(link, name)
        kind = node.get("type")
        if kind == NEGATIVE_PLACEHOLDER and name == "negative":
            return {"negative": None}
        if kind == GUIDANCE_NODE and name == "positive":
            slots = {slot.get("name"): slot for slot in node.get("inputs") or []}
            conditioning = (slots.get("conditioning") or {}).get("link")
            if conditioning is None:
                raise WorkflowError(f"{name}: FluxGuidance node {source} has no conditioning input", name)
            guidance_link = ((slots.get("guidance") or {}).get("link"))
            if guidance_link is not None:  # the widget converted to an input and linked
                guidance = self._linked_value(guidance_link, "guidance")
            else:
                values = node.get("widgets_values")
                values = [values.get("guidance", 3.5)] if isinstance(values, dict) else values
                guidance = values[0] if isinstance(values, list) and values else 3.5
            return {**self._conditioning(conditioning, name), "guidance": guidance}
        return {name: self._prompt(link, name)}

    def _widgets(self, node: dict[str, Any], node_id: str) -> dict[str, Any]:
        values = node.get("widgets_values")
        if isinstance(values, dict):  # some frontends save widgets by name
            return {name: values[name] for name in NODE_WIDGETS if name in values}
        if not isinstance(values, list):
            raise WorkflowError(f"workflow: FaceDetailer node {node_id} has no widgets_values")
        values = list(values)
        seed_at = NODE_WIDGETS.index("seed")
        if len(values) > seed_at + 1 and values[seed_at + 1] in SEED_CONTROL_VALUES:
            del values[seed_at + 1]  # control_after_generate: how ComfyUI changes the seed after a run
        if len(values) not in KNOWN_WIDGET_COUNTS:
            raise WorkflowError(
                f"workflow: FaceDetailer node {node_id} has {len(values)} widget values (without the seed's "
                f"control_after_generate); this importer knows layouts of {', '.join(map(str, KNOWN_WIDGET_COUNTS))}"
            )
        params = dict(zip(NODE_WIDGETS, values, strict=False))
        for name, value in params.items():
            if not _fits(name, value):
                raise WorkflowError(
                    f"workflow: FaceDetailer node {node_id}: widget {name} holds {value!r}; its widget layout is "
                    "not one this importer knows",
                    name,
                )
        return params

    def _source(self, link: Any, name: str) -> tuple[str, dict[str, Any]]:
        """The node at the origin of ``link``, through Reroute nodes."""
        seen: set[str] = set()
        while True:
            key = str(link)
            if key not in self.links:
                raise WorkflowError(f"{name}: link {key} is not in the workflow's links", name)
            origin, _ = self.links[key]
            node = self.nodes.get(origin)
            if node is None:
                raise WorkflowError(f"{name}: linked to node {origin}, which is not in the workflow", name)
            if node.get("type") not in PASSTHROUGH or origin in seen:
                return origin, node
            seen.add(origin)
            inputs = node.get("inputs") or []
            link = inputs[0].get("link") if inputs else None
            if link is None:
                raise WorkflowError(f"{name}: Reroute node {origin} has no input", name)

    def _linked_value(self, link: Any, name: str) -> Any:
        """The value a primitive (or another one-value node) feeds into a converted widget."""
        source, node = self._source(link, name)
        values = node.get("widgets_values")
        if isinstance(values, list) and len(values) >= 1:
            if len(values) == 1 or (len(values) == 2 and values[1] in SEED_CONTROL_VALUES):
                return values[0]
        raise WorkflowError(f"{name}: comes from node {source} ({node.get('type')}), whose value cannot be read", name)

    def _prompt(self, link: Any, name: str) -> str:
        source, node = self._source(link, name)
        if node.get("type") not in TEXT_ENCODERS:
            raise WorkflowError(
                f"{name}: linked to node {source} ({node.get('type')}); only the text of a CLIPTextEncode node "
                "can be imported",
                name,
            )
        for slot in node.get("inputs") or []:
            if (slot.get("widget") or {}).get("name") == "text" and slot.get("link") is not None:
                return str(self._linked_value(slot["link"], name))
        values = node.get("widgets_values")
        if isinstance(values, dict):
            values = [values.get("text", "")]
        if not isinstance(values, list) or not values or not isinstance(values[0], str):
            raise WorkflowError(f"{name}: CLIPTextEncode node {source} has no text", name)
        return values[0]

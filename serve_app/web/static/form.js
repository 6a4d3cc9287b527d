// The parameter form, built from GET v1/info: the node's groups (rarely changed ones folded under
// "Advanced"), friendly labels with the node's names beside them, the service's ranges and hints,
// structured editors for hooks and ControlNet, presets, and checks before anything is sent.

import { clearError, control, fieldRow, showError } from "./controls.js";
import { $, $$, element } from "./dom.js";
import { controlnetEditor, hooksEditor } from "./editors.js";

// Presets apply their values on top of the form (clamped to this service's bounds; a sampler it
// does not offer is left as it is). "defaults" resets every field to the node's default.
export const PRESETS = [
  { id: "defaults", label: "The node's defaults", values: null },
  {
    id: "fast",
    label: "Fast preview",
    values: { steps: 8, guide_size: 256, max_size: 512, cycle: 1 },
  },
  {
    id: "quality",
    label: "Quality",
    values: { steps: 30, guide_size: 512, max_size: 1024, cycle: 1, sampler_name: "dpmpp_2m", scheduler: "karras" },
  },
];

export class ParameterForm {
  constructor(root, info) {
    this.root = root;
    this.info = info;
    this.specs = info.parameters;
    this.controls = new Map();
    this.build();
  }

  build() {
    const basic = [];
    const advanced = [];
    const groups = new Map();
    for (const spec of this.specs) {
      if (!groups.has(spec.group)) {
        const fieldset = element("fieldset", { "data-group": spec.group }, element("legend", { text: spec.group_title }));
        groups.set(spec.group, fieldset);
        (spec.advanced ? advanced : basic).push(fieldset);
      }
      const ctl = this.makeControl(spec);
      this.controls.set(spec.name, ctl);
      const extra = spec.name === "seed" ? this.randomSeedButton(ctl) : null;
      groups.get(spec.group).append(fieldRow(spec, ctl, { extra }));
      const clear = () => clearError(spec.name);
      ctl.focus.addEventListener("input", clear);
      ctl.focus.addEventListener("change", clear);
    }
    const fold = element("details", { id: "advanced-fold" },
      element("summary", { text: `Advanced: ${advanced.map((fieldset) => fieldset.querySelector("legend").textContent).join(", ")}` }),
      ...advanced);
    this.root.replaceChildren(...basic, advanced.length ? fold : "");
  }

  makeControl(spec) {
    if (spec.name === "detailer_hooks") return hooksEditor(spec);
    if (spec.name === "controlnet") return controlnetEditor(spec, this.info.controlnets);
    return control(spec, `field-${spec.name}`);
  }

  randomSeedButton(ctl) {
    const button = element("button", { type: "button", className: "secondary small-button", text: "random", "aria-label": "Random seed" });
    button.addEventListener("click", () => {
      const words = crypto.getRandomValues(new Uint32Array(2));
      ctl.set(((BigInt(words[0]) << 32n) | BigInt(words[1])).toString());
      clearError("seed");
    });
    return button;
  }

  set(name, value) {
    const ctl = this.controls.get(name);
    if (!ctl) return false;
    ctl.set(value);
    clearError(name);
    return true;
  }

  reset() {
    for (const spec of this.specs) this.set(spec.name, spec.default);
  }

  // Apply a preset; returns what it changed, as "label value" texts.
  applyPreset(id) {
    const preset = PRESETS.find((item) => item.id === id);
    if (!preset) return [];
    if (!preset.values) {
      this.reset();
      return ["every field to the node's default"];
    }
    const changed = [];
    for (const [name, wanted] of Object.entries(preset.values)) {
      const spec = this.specs.find((item) => item.name === name);
      if (!spec) continue;
      let value = wanted;
      if (spec.type === "COMBO" && !(spec.options ?? []).includes(value)) continue;
      if (typeof value === "number") {
        if (spec.max !== undefined && value > Number(spec.max)) value = Number(spec.max);
        if (spec.min !== undefined && value < Number(spec.min)) value = Number(spec.min);
      }
      this.set(name, value);
      changed.push(`${spec.label ?? name} ${value}`);
    }
    return changed;
  }

  // {values, invalid}: the fields to send (text, as a form sends them) and the first invalid input.
  collect() {
    const values = {};
    let invalid = null;
    for (const spec of this.specs) {
      const ctl = this.controls.get(spec.name);
      const problem = ctl.validate();
      if (problem) {
        showError(spec.name, problem);
        invalid ??= ctl.focus;
        continue;
      }
      const value = ctl.get();
      if (value !== undefined) values[spec.name] = value;
    }
    return { values, invalid };
  }

  // Open the advanced fold when any of these fields holds a value other than its default there.
  revealAdvanced(names) {
    const fold = $("#advanced-fold");
    const changed = names.some((name) => {
      const spec = this.specs.find((item) => item.name === name);
      return spec?.advanced && this.controls.get(name)?.get() !== defaultText(spec);
    });
    if (fold && changed) fold.open = true;
  }

  value(name) {
    return this.controls.get(name)?.get();
  }
}

// What a control holding the spec's default sends (undefined: nothing).
function defaultText(spec) {
  if (spec.type === "BOOLEAN") return String(Boolean(spec.default));
  if (spec.type === "JSON") return spec.default == null ? undefined : JSON.stringify(spec.default);
  return spec.default == null ? undefined : String(spec.default);
}

// Where a service error's field goes: "steps", a hook's "detailer_hooks.0.unsampler.steps" (the
// hook's type in the path is dropped), "controlnet.strength", else the top-level input.
export function placeError(field, message) {
  const parts = String(field ?? "").split(".").filter(Boolean);
  if (!parts.length) return false;
  const candidates = [parts.join(".")];
  if (parts[0] === "detailer_hooks" && parts.length >= 4) candidates.push([parts[0], parts[1], ...parts.slice(3)].join("."));
  candidates.push(parts[0]);
  for (const key of candidates) {
    if (document.getElementById(`error-${key}`)) return showError(key, message);
  }
  return false;
}

export function clearAllErrors() {
  for (const slot of $$(".field-error")) slot.textContent = "";
  for (const row of $$(".field.invalid")) row.classList.remove("invalid");
  for (const input of $$("[aria-invalid]")) input.removeAttribute("aria-invalid");
  const summary = $("#run-error");
  if (summary) summary.textContent = "";
}

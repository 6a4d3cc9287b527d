// Structured editors for the two inputs that are objects: detailer_hooks (a list of typed hooks)
// and controlnet (ControlNetApplyAdvanced's inputs). Their fields come from GET v1/info
// ("item_types" and "fields" of the two widgets); what they send is the JSON the service takes.

import { clearError, control, fieldRow, showError } from "./controls.js";
import { element } from "./dom.js";

// JSON text of {name: control}: integers verbatim (seeds beyond 2^53 stay exact), floats as numbers.
function jsonObject(entries) {
  const parts = [];
  for (const [name, spec, ctl] of entries) {
    const value = ctl.get();
    if (value === undefined) continue;
    let text;
    if (spec.type === "INT") text = BigInt(value).toString();
    else if (spec.type === "FLOAT") text = String(Number(value));
    else if (spec.type === "BOOLEAN") text = value;
    else text = JSON.stringify(value);
    parts.push(`${JSON.stringify(name)}:${text}`);
  }
  return `{${parts.join(",")}}`;
}

function asValue(value) {
  if (typeof value !== "string") return value;
  try {
    return JSON.parse(value);
  } catch {
    return value;
  }
}

export function hooksEditor(spec) {
  const types = new Map((spec.item_types ?? []).map((item) => [item.type, item]));
  const list = element("ol", { className: "hook-list", "aria-label": "Detailer hooks, applied in this order" });
  const empty = element("p", { className: "muted small", text: "No hooks: the faces are detailed as the node does without a detailer_hook." });
  const typeSelect = element("select", { id: "field-detailer_hooks" });
  for (const item of types.values()) typeSelect.append(element("option", { value: item.type, text: item.type }));
  const typeHelp = element("p", { className: "muted small" });
  const showTypeHelp = () => { typeHelp.textContent = types.get(typeSelect.value)?.description ?? ""; };
  typeSelect.addEventListener("change", showTypeHelp);
  showTypeHelp();
  const addButton = element("button", { type: "button", className: "secondary small-button", text: "Add hook" });
  let cards = [];

  function renumber() {
    cards.forEach((card, index) => card.rebuild(index));
    empty.hidden = cards.length > 0;
  }

  function move(card, delta) {
    const index = cards.indexOf(card);
    const target = index + delta;
    if (target < 0 || target >= cards.length) return;
    cards.splice(index, 1);
    cards.splice(target, 0, card);
    list.replaceChildren(...cards.map((item) => item.node));
    renumber();
    card.focusHead();
  }

  function makeCard(type, values = {}) {
    const item = types.get(type);
    const node = element("li", { className: "hook-card" });
    const card = { node, type, controls: [], raw: item ? null : values };
    const title = element("strong", { text: type });
    const up = element("button", { type: "button", className: "icon-button", text: "↑" });
    const down = element("button", { type: "button", className: "icon-button", text: "↓" });
    const remove = element("button", { type: "button", className: "icon-button", text: "✕" });
    up.addEventListener("click", () => move(card, -1));
    down.addEventListener("click", () => move(card, 1));
    remove.addEventListener("click", () => {
      cards = cards.filter((other) => other !== card);
      node.remove();
      renumber();
      addButton.focus();
    });
    const fieldsBox = element("div", { className: "hook-fields" });
    node.append(element("div", { className: "hook-head" }, title, element("span", { className: "hook-buttons" }, up, down, remove)),
      element("p", { className: "muted small", text: item?.description ?? "A hook type this service does not list: sent as it is." }),
      fieldsBox);
    card.focusHead = () => up.focus();
    card.rebuild = (index) => {
      const current = card.controls.length ? Object.fromEntries(card.controls.map(([name, , ctl]) => [name, ctl.value()])) : values;
      up.setAttribute("aria-label", `Move hook ${index + 1} (${type}) up`);
      down.setAttribute("aria-label", `Move hook ${index + 1} (${type}) down`);
      remove.setAttribute("aria-label", `Remove hook ${index + 1} (${type})`);
      up.disabled = index === 0;
      down.disabled = index === cards.length - 1;
      fieldsBox.replaceChildren();
      card.controls = [];
      for (const field of item?.fields ?? []) {
        const ctl = control(field, `field-detailer_hooks.${index}.${field.name}`);
        if (current[field.name] !== undefined) ctl.set(Array.isArray(current[field.name]) ? current[field.name].join(",") : current[field.name]);
        ctl.focus.addEventListener("input", () => clearError(`detailer_hooks.${index}.${field.name}`));
        fieldsBox.append(fieldRow(field, ctl, { idPrefix: `detailer_hooks.${index}.` }));
        card.controls.push([field.name, field, ctl]);
      }
    };
    card.json = () => (card.raw ? JSON.stringify(card.raw) : jsonObject([["type", { type: "STRING" }, { get: () => type }], ...card.controls]));
    return card;
  }

  function add(type, values) {
    const card = makeCard(type, values);
    cards.push(card);
    list.append(card.node);
    renumber();
    return card;
  }

  addButton.addEventListener("click", () => {
    add(typeSelect.value);
    cards.at(-1).node.querySelector("input, select, textarea")?.focus();
  });

  function set(value) {
    const hooks = asValue(value) ?? [];
    cards = [];
    list.replaceChildren();
    for (const hook of Array.isArray(hooks) ? hooks : []) add(String(hook?.type ?? "?"), hook ?? {});
    renumber();
  }

  set(spec.default);
  return {
    element: element("div", { className: "hooks-editor" }, list, empty,
      element("div", { className: "hook-add" },
        element("label", { for: "field-detailer_hooks", text: "Hook type" }), typeSelect, addButton),
      typeHelp),
    focus: typeSelect,
    get: () => `[${cards.map((card) => card.json()).join(",")}]`,
    set,
    validate: () => {
      let problem = "";
      cards.forEach((card, index) => {
        for (const [name, , ctl] of card.controls) {
          const message = ctl.validate();
          if (message) {
            showError(`detailer_hooks.${index}.${name}`, message);
            problem ||= `hook ${index + 1} (${card.type}): ${name} ${message}`;
          }
        }
      });
      return problem;
    },
  };
}

export function controlnetEditor(spec, configured) {
  const names = Object.keys(configured ?? {});
  const fields = new Map((spec.fields ?? []).map((field) => [field.name, field]));
  const enabled = element("input", { id: "field-controlnet", type: "checkbox", role: "switch", className: "switch", disabled: names.length === 0 });
  const stateText = element("span", { className: "switch-text", "aria-hidden": "true" });
  const box = element("div", { className: "cn-fields" });
  const controls = [];
  for (const field of fields.values()) {
    const fieldSpec = field.name === "name" ? { ...field, type: "COMBO", options: names, default: names[0] ?? "" } : field;
    const ctl = control(fieldSpec, `field-controlnet.${field.name}`);
    ctl.focus.addEventListener("input", () => clearError(`controlnet.${field.name}`));
    ctl.focus.addEventListener("change", () => clearError(`controlnet.${field.name}`));
    const row = fieldRow(fieldSpec, ctl, { idPrefix: "controlnet." });
    box.append(row);
    controls.push([field.name, fieldSpec, ctl, row]);
  }
  const byName = Object.fromEntries(controls.map(([name, , ctl, row]) => [name, { ctl, row }]));
  const preprocessor = () => configured?.[byName.name?.ctl.get()]?.preprocessor;
  const update = () => {
    enabled.setAttribute("aria-checked", String(enabled.checked));
    stateText.textContent = enabled.checked ? "on" : names.length ? "off" : "off (this service configures no ControlNet)";
    box.hidden = !enabled.checked;
    if (byName.control_image) byName.control_image.row.hidden = preprocessor() !== "control_image";
  };
  enabled.addEventListener("change", update);
  byName.name?.ctl.focus.addEventListener("change", update);

  function set(value) {
    const wanted = asValue(value);
    enabled.checked = Boolean(wanted && typeof wanted === "object");
    for (const [name, fieldSpec, ctl] of controls) {
      ctl.set(enabled.checked && wanted[name] !== undefined ? wanted[name] : fieldSpec.default);
    }
    update();
  }

  set(spec.default);
  return {
    element: element("div", { className: "cn-editor" }, element("span", { className: "switch-wrap" }, enabled, stateText), box),
    focus: enabled,
    get: () => (enabled.checked ? jsonObject(controls.filter(([name]) => name !== "control_image" || preprocessor() === "control_image" || byName.control_image.ctl.get())) : undefined),
    set,
    validate: () => {
      if (!enabled.checked) return "";
      for (const [name, , ctl] of controls) {
        const message = ctl.validate();
        if (message) return `${name}: ${message}`;
      }
      const start = Number(byName.start_percent?.ctl.get() ?? 0);
      const end = Number(byName.end_percent?.ctl.get() ?? 1);
      if (start > end) return "start_percent: must not exceed end_percent";
      if (preprocessor() === "control_image" && !byName.control_image?.ctl.get()) {
        return `control_image: ControlNet ${byName.name.ctl.get()} takes its control image from the request; choose one`;
      }
      return "";
    },
  };
}

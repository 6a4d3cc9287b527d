// One input per widget spec (GET v1/info "parameters", and the fields of hooks and ControlNet):
// switches for booleans, selects for choices, number fields checked as the service checks them.
// A control is {element, focus, get(), set(value), validate()}: get() gives the text sent in the
// form (undefined: not sent), validate() a message or "".

import { element } from "./dom.js";

const SEED_MAX = 18446744073709551615n;

export function formatBound(value) {
  if (value === undefined || value === null) return "";
  const text = String(value);
  if (text === "18446744073709551615" || (typeof value === "number" && value >= 1.8e19)) return "2⁶⁴−1";
  if (text === "9223372036854775807" || (typeof value === "number" && value >= 9.2e18)) return "2⁶³−1";
  return text;
}

function exactBound(value) {
  return typeof value === "number" && Math.abs(value) <= Number.MAX_SAFE_INTEGER ? value : null;
}

function bigBound(value) {
  if (value === undefined || value === null) return null;
  if (typeof value === "number" && value >= 1.8e19) return SEED_MAX;  // 2^64−1 arrives as 2^64 when not kept exact
  return BigInt(typeof value === "string" ? value : Math.round(value));
}

// The rule pydantic applies on the server (ge/le, whole numbers); a message or "".
export function validateNumber(spec, text) {
  const value = String(text).trim();
  if (value === "") return spec.nullable ? "" : "a value is required";
  if (spec.type === "INT" && !/^-?\d+$/.test(value)) return "must be a whole number";
  if (spec.type === "FLOAT" && !/^-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$/.test(value)) return "must be a number";
  let inRange;
  if (spec.type === "INT") {
    const number = BigInt(value);
    const low = bigBound(spec.min);
    const high = bigBound(spec.max);
    inRange = !((low !== null && number < low) || (high !== null && number > high));
  } else {
    const number = Number(value);
    inRange = !((spec.min !== undefined && number < Number(spec.min)) || (spec.max !== undefined && number > Number(spec.max)));
  }
  if (inRange) return "";
  if (spec.min !== undefined && spec.max !== undefined) return `must be between ${formatBound(spec.min)} and ${formatBound(spec.max)}`;
  return spec.min !== undefined ? `must be at least ${formatBound(spec.min)}` : `must be at most ${formatBound(spec.max)}`;
}

function switchControl(spec, id) {
  const box = element("input", { id, type: "checkbox", role: "switch", className: "switch" });
  const text = element("span", { className: "switch-text", "aria-hidden": "true" });
  const update = () => {
    box.setAttribute("aria-checked", String(box.checked));
    text.textContent = box.checked ? spec.label_on ?? "on" : spec.label_off ?? "off";
  };
  box.addEventListener("change", update);
  const set = (value) => {
    box.checked = value === true || value === "true";
    update();
  };
  set(spec.default);
  return {
    element: element("span", { className: "switch-wrap" }, box, text),
    focus: box,
    get: () => String(box.checked),
    value: () => box.checked,
    set,
    validate: () => "",
  };
}

function selectControl(spec, id, options = spec.options ?? []) {
  const select = element("select", { id });
  const fill = (choices) => {
    select.replaceChildren();
    if (spec.nullable) select.append(element("option", { value: "", text: "(the service's default)" }));
    for (const option of choices) {
      select.append(element("option", { value: option, text: spec.option_labels?.[option] ?? option }));
    }
  };
  fill(options);
  const set = (value) => {
    const text = value == null ? "" : String(value);
    if (![...select.options].some((option) => option.value === text)) {
      // e.g. a workflow's sampler this service does not run: shown, and refused by name if sent
      select.append(element("option", { value: text, text: `${text} (not offered by this service)` }));
    }
    select.value = text;
  };
  set(spec.default);
  return {
    element: select,
    focus: select,
    get: () => (spec.nullable && select.value === "" ? undefined : select.value),
    value: () => (select.value === "" && spec.nullable ? null : select.value),
    set,
    fill,
    validate: () => "",
  };
}

function textControl(spec, id) {
  const input = spec.multiline
    ? element("textarea", { id, rows: spec.name === "positive" ? 3 : 2, spellcheck: spec.name === "wildcard" ? "false" : null })
    : element("input", { id, type: "text", autocomplete: "off" });
  const set = (value) => { input.value = value ?? ""; };
  set(spec.default);
  return {
    element: input,
    focus: input,
    get: () => (spec.nullable && input.value === "" ? undefined : input.value),
    value: () => (spec.nullable && input.value === "" ? null : input.value),
    set,
    validate: () => (spec.required && !input.value.trim() ? "a value is required" : ""),
  };
}

function numberControl(spec, id) {
  const exact = exactBound(spec.min) !== null && exactBound(spec.max) !== null;
  const step = exact && Number.isInteger(spec.min / spec.step) ? spec.step : "any";
  const input = element("input", {
    id,
    type: exact ? "number" : "text",  // a bound beyond 2^53 (seeds) would be rounded by a number input
    inputmode: spec.type === "INT" ? "numeric" : "decimal",
    min: exact ? spec.min : null,
    max: exact ? spec.max : null,
    step: exact ? step : null,
    autocomplete: "off",
  });
  const set = (value) => { input.value = value == null ? "" : String(value); };
  set(spec.default);
  return {
    element: input,
    focus: input,
    get: () => (spec.nullable && input.value.trim() === "" ? undefined : input.value.trim()),
    value: () => {
      const text = input.value.trim();
      if (text === "") return null;
      if (spec.type === "INT" && !Number.isSafeInteger(Number(text))) return text;  // exact as text
      return Number(text);
    },
    set,
    validate: () => validateNumber(spec, input.value),
  };
}

// A base64 image read from a file (ControlNet's control_image).
function imageControl(spec, id) {
  const input = element("input", { id, type: "file", accept: "image/png,image/jpeg,image/webp" });
  const note = element("span", { className: "muted small" });
  let data = spec.default ?? null;
  input.addEventListener("change", () => {
    const file = input.files[0];
    if (!file) return;
    const reader = new FileReader();
    reader.onload = () => {
      data = String(reader.result);  // a data: URL; the service accepts it as base64
      note.textContent = `${file.name} (${Math.round(file.size / 1024)} KB)`;
    };
    reader.readAsDataURL(file);
  });
  return {
    element: element("span", { className: "image-control" }, input, note),
    focus: input,
    get: () => data ?? undefined,
    value: () => data,
    set: (value) => {
      data = value || null;
      input.value = "";
      note.textContent = data ? "an image from the workflow or a previous choice" : "";
    },
    validate: () => "",
  };
}

export function control(spec, id) {
  if (spec.type === "BOOLEAN") return switchControl(spec, id);
  if (spec.type === "COMBO") return selectControl(spec, id);
  if (spec.type === "STRING" && spec.format === "image") return imageControl(spec, id);
  if (spec.type === "STRING") return textControl(spec, id);
  return numberControl(spec, id);
}

// The range shown under a number: the service's bounds, and the node's when the service's are tighter.
export function rangeText(spec) {
  if (!["INT", "FLOAT"].includes(spec.type) || (spec.min === undefined && spec.max === undefined)) return "";
  const range = `${formatBound(spec.min)} … ${formatBound(spec.max)}`;
  if (spec.limit) return `${range} on this service (${spec.limit}; the node allows up to ${formatBound(spec.node_max)})`;
  return range;
}

// A labelled row: friendly label with the node's name beside it, the input, its range and hint,
// its description on demand (the ? button) and a slot for its error, all tied to the input for
// screen readers (aria-describedby).
export function fieldRow(spec, ctl, { idPrefix = "", extra = null } = {}) {
  const key = `${idPrefix}${spec.name}`;
  const hintText = [rangeText(spec), spec.hint].filter(Boolean).join(" · ");
  const hint = hintText ? element("p", { className: "hint", id: `hint-${key}`, text: hintText }) : null;
  const help = spec.description
    ? element("p", { className: "help", id: `help-${key}`, text: spec.description, hidden: true })
    : null;
  const error = element("p", { className: "field-error", id: `error-${key}`, role: "alert" });
  const label = element("label", { for: ctl.focus.id },
    element("span", { className: "label-text", text: spec.label ?? spec.name }),
    " ",
    element("code", { className: "node-name", text: spec.name }));
  let toggle = null;
  if (help) {
    toggle = element("button", {
      type: "button", className: "help-toggle", "aria-expanded": "false", "aria-controls": help.id,
      "aria-label": `About ${spec.label ?? spec.name}`, title: "What is this?", text: "?",
    });
    toggle.addEventListener("click", () => {
      const open = help.hidden;
      help.hidden = !open;
      toggle.setAttribute("aria-expanded", String(open));
    });
  }
  ctl.focus.setAttribute("aria-describedby", [hint?.id, help?.id, error.id].filter(Boolean).join(" "));
  // the "?" comes after the input: Tab reaches the value first, its description on demand next
  const row = element("div", { className: `field field-${spec.type.toLowerCase()}`, "data-field": key },
    element("div", { className: "field-head" }, label),
    element("div", { className: "field-input" }, ctl.element, extra, toggle),
    hint, help, error);
  return row;
}

// Errors next to the field they name, worded once: a message that starts with the field's own
// name does not repeat it ("steps: steps: …").
export function showError(key, message) {
  const slot = document.getElementById(`error-${key}`);
  if (!slot) return false;
  const name = key.split(".").pop();
  slot.textContent = String(message).replace(new RegExp(`^${name.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}: `), "");
  const row = slot.closest(".field");
  row?.classList.add("invalid");
  row?.querySelector("input, select, textarea")?.setAttribute("aria-invalid", "true");
  for (let fold = slot.closest("details"); fold; fold = fold.parentElement?.closest("details")) fold.open = true;
  return true;
}

export function clearError(key) {
  const slot = document.getElementById(`error-${key}`);
  if (!slot) return;
  slot.textContent = "";
  const row = slot.closest(".field");
  row?.classList.remove("invalid");
  row?.querySelector("[aria-invalid]")?.removeAttribute("aria-invalid");
}

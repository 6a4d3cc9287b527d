// facedetailer-serve web page: a form built from GET v1/info, runs streamed from POST v1/detail/stream.
// Plain ES module, no build step, no third-party code.

const $ = (selector) => document.querySelector(selector);
const state = { specs: [], file: null, beforeUrl: null, running: false };

// JSON with integers beyond 2^53 (seeds) kept exact, as strings.
function parseJson(text) {
  return JSON.parse(text, (key, value, context) => {
    if (typeof value === "number" && !Number.isSafeInteger(value) && context && /^-?\d+$/.test(context.source)) {
      return context.source;
    }
    return value;
  });
}

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "text") node.textContent = value;
    else if (name === "className") node.className = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children) node.append(child);
  return node;
}

// ---- the form ------------------------------------------------------------------------------

function inputFor(spec) {
  const common = { id: `field-${spec.name}`, name: spec.name, title: spec.description || null };
  if (spec.type === "BOOLEAN") {
    const box = element("input", { ...common, type: "checkbox" });
    box.checked = Boolean(spec.default);
    return box;
  }
  if (spec.type === "COMBO") {
    const select = element("select", common);
    if (spec.nullable) select.append(element("option", { value: "", text: "(the service's default)" }));
    for (const option of spec.options) select.append(element("option", { value: option, text: option }));
    select.value = spec.default == null ? "" : String(spec.default);
    return select;
  }
  if (spec.type === "JSON") {
    const text = element("textarea", { ...common, rows: 2, spellcheck: "false" });
    text.value = JSON.stringify(spec.default);
    return text;
  }
  if (spec.type === "STRING") {
    const text = spec.multiline ? element("textarea", { ...common, rows: 2 }) : element("input", { ...common, type: "text" });
    text.value = spec.default ?? "";
    return text;
  }
  // Numbers: the server's bounds, checked here before anything is sent (see validateField).
  const safe = (value) => (value !== undefined && Math.abs(value) <= Number.MAX_SAFE_INTEGER ? value : null);
  const step = spec.min !== undefined && Number.isInteger(spec.min / spec.step) ? spec.step : "any";
  // A bound beyond 2^53 (the seed) would be rounded by a number input: such fields are text.
  const exact = safe(spec.min) !== null && safe(spec.max) !== null;
  const number = element("input", {
    ...common, type: exact ? "number" : "text", inputmode: spec.type === "INT" ? "numeric" : "decimal",
    min: exact ? spec.min : null, max: exact ? spec.max : null, step: exact ? step : null,
  });
  number.value = String(spec.default);
  return number;
}

function booleanLabel(spec, box) {
  if (!spec.label_on) return null;
  const label = element("span", { className: "bool-label muted" });
  const update = () => { label.textContent = box.checked ? spec.label_on : spec.label_off; };
  box.addEventListener("change", update);
  update();
  return label;
}

function buildForm(specs) {
  const form = $("#params-form");
  form.replaceChildren();
  const groups = new Map();
  for (const spec of specs) {
    if (!groups.has(spec.group)) {
      const fieldset = element("fieldset", { "data-group": spec.group });
      fieldset.append(element("legend", { text: spec.group_title }));
      groups.set(spec.group, fieldset);
      form.append(fieldset);
    }
    const input = inputFor(spec);
    const range = spec.min !== undefined && spec.type !== "BOOLEAN"
      ? element("span", { className: "range muted", text: `${formatBound(spec.min)} … ${formatBound(spec.max)}` })
      : "";
    const label = element("label", { for: input.id, title: spec.description || null }, spec.name);
    const row = element("div", { className: `field field-${spec.type.toLowerCase()}`, "data-field": spec.name },
      label, input, booleanLabel(spec, input) ?? "", range,
      element("span", { className: "field-error", id: `error-${spec.name}`, role: "alert" }));
    groups.get(spec.group).append(row);
    input.addEventListener("input", () => clearFieldError(spec.name));
  }
}

function formatBound(value) {
  if (value === undefined) return "";
  return Math.abs(value) > 1e15 ? "2⁶⁴−1" : String(value);
}

function resetForm() {
  for (const spec of state.specs) setFieldValue(spec.name, spec.type === "JSON" ? JSON.stringify(spec.default) : spec.default);
  clearErrors();
}

function setFieldValue(name, value) {
  const input = document.getElementById(`field-${name}`);
  if (!input) return false;
  if (input.type === "checkbox") {
    input.checked = value === true || value === "true";
    input.dispatchEvent(new Event("change"));
  } else if (input.tagName === "SELECT") {
    const text = value == null ? "" : String(value);
    if (![...input.options].some((option) => option.value === text)) {
      // e.g. a workflow's sampler this service does not run: shown, and refused by name if sent
      input.append(element("option", { value: text, text: `${text} (not offered by this service)` }));
    }
    input.value = text;
  } else {
    input.value = value == null ? "" : String(value);
  }
  return true;
}

// The same rule the server applies (pydantic's ge/le and integer checks); returns a message or "".
function validateField(spec, input) {
  if (spec.type === "JSON") {
    try {
      JSON.parse(input.value);
      return "";
    } catch {
      return "must be JSON (a list)";
    }
  }
  if (!["INT", "FLOAT"].includes(spec.type)) return "";
  const text = input.value.trim();
  if (text === "") return "a value is required";
  if (spec.type === "INT" && !/^-?\d+$/.test(text)) return "must be a whole number";
  if (spec.type === "FLOAT" && !/^-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$/.test(text)) return "must be a number";
  const inRange = spec.type === "INT" ? compareInt(text, spec) : compareFloat(Number(text), spec);
  return inRange ? "" : `must be between ${formatBound(spec.min)} and ${formatBound(spec.max)}`;
}

function compareFloat(value, spec) {
  return !((spec.min !== undefined && value < spec.min) || (spec.max !== undefined && value > spec.max));
}

function compareInt(text, spec) {
  const value = BigInt(text);
  const low = spec.min !== undefined ? BigInt(Math.round(spec.min)) : null;
  // 2^64−1 arrives as a float (2^64): the exact bound for the seed, else the number itself
  const high = spec.max === undefined ? null : spec.max >= 1.8e19 ? 18446744073709551615n : BigInt(Math.round(spec.max));
  return !((low !== null && value < low) || (high !== null && value > high));
}

function collectParams() {
  const values = {};
  let firstInvalid = null;
  for (const spec of state.specs) {
    const input = document.getElementById(`field-${spec.name}`);
    const problem = validateField(spec, input);
    if (problem) {
      showFieldError(spec.name, problem);
      firstInvalid ??= input;
      continue;
    }
    if (spec.nullable && input.value === "") continue;  // not given: the service decides
    values[spec.name] = input.type === "checkbox" ? String(input.checked) : input.value;
  }
  if (firstInvalid) {
    firstInvalid.focus();
    return null;
  }
  return values;
}

// ---- errors next to the field they name ----------------------------------------------------

function showFieldError(name, message) {
  const slot = document.getElementById(`error-${name}`);
  if (!slot) return false;
  slot.textContent = `${name}: ${message}`;
  slot.closest(".field")?.classList.add("invalid");
  slot.closest("details")?.setAttribute("open", "");
  return true;
}

function clearFieldError(name) {
  const slot = document.getElementById(`error-${name}`);
  if (!slot) return;
  slot.textContent = "";
  slot.closest(".field")?.classList.remove("invalid");
}

function clearErrors() {
  for (const slot of document.querySelectorAll(".field-error")) slot.textContent = "";
  for (const field of document.querySelectorAll(".field.invalid")) field.classList.remove("invalid");
}

// An error body {"error", "details": [{"field", "message"}]}: each detail goes next to its field;
// otherwise the "<field>: …" prefix of the message names it; what names no field goes under the button.
function showServiceError(body, status) {
  const message = body?.error ?? `HTTP ${status}`;
  let placed = false;
  for (const detail of Array.isArray(body?.details) ? body.details : []) {
    const field = String(detail.field ?? "").split(".")[0];
    placed = showFieldError(field, detail.message) || placed;
  }
  if (!placed) {
    const named = /^([a-z_]+)(\[\d+\])?: (.*)$/s.exec(message);
    if (named) placed = showFieldError(named[1], named[3]);
  }
  const request = body?.request_id ? ` (request ${body.request_id})` : "";
  $("#run-error").textContent = (placed ? `${status}: the service refused a value (see the field)` : `${status}: ${message}`) + request;
  const first = document.querySelector(".field.invalid, #run-error");
  first?.scrollIntoView({ block: "center" });
}

// ---- image input ----------------------------------------------------------------------------

function chooseFile(file) {
  if (!file) return;
  clearFieldError("image");
  state.file = file;
  if (state.beforeUrl) URL.revokeObjectURL(state.beforeUrl);
  state.beforeUrl = URL.createObjectURL(file);
  const preview = $("#input-preview");
  preview.src = state.beforeUrl;
  preview.hidden = false;
}

function setUpDropzone() {
  const zone = $("#dropzone");
  $("#image-input").addEventListener("change", (event) => chooseFile(event.target.files[0]));
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("dragging"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    chooseFile(event.dataTransfer.files[0]);
  });
}

// ---- running: the SSE stream ------------------------------------------------------------------

async function* serverSentEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of frame.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (data.length) yield { event, data: parseJson(data.join("\n")) };
    }
  }
}

function startProgress() {
  $("#progress").hidden = false;
  $("#progress-log").replaceChildren();
  $("#progress-bar").style.width = "0%";
  $("#progress-bar").classList.add("indeterminate");
  $("#progress-text").textContent = "detecting faces…";
  const started = performance.now();
  const timer = setInterval(() => {
    $("#progress-time").textContent = `${((performance.now() - started) / 1000).toFixed(1)} s`;
  }, 100);
  return () => clearInterval(timer);
}

function logFace(face, count) {
  const status = face.status === "refined" ? "refined" : `skipped (${face.status})`;
  const bbox = face.bbox.map((v) => Math.round(v)).join(", ");
  $("#progress-log").append(element("li", { className: "face-event", text: `face ${face.index}: ${status} — bbox [${bbox}], seed ${face.seed ?? "–"}` }));
  $("#progress-text").textContent = `${count} face${count === 1 ? "" : "s"} finished…`;
}

async function run() {
  if (state.running) return;
  clearErrors();
  if (!state.file) {
    showFieldError("image", "choose an image first");
    return;
  }
  const params = collectParams();
  if (!params) {
    $("#run-error").textContent = "fix the highlighted values first";
    return;
  }
  const body = new FormData();
  body.append("image", state.file, state.file.name);
  for (const [name, value] of Object.entries(params)) body.append(name, value);

  state.running = true;
  $("#run").disabled = true;
  $("#results").hidden = true;
  const stopTimer = startProgress();
  let faces = 0;
  try {
    const response = await fetch("v1/detail/stream", { method: "POST", body });
    if (!response.ok) {
      const text = await response.text();
      let error;
      try { error = parseJson(text); } catch { error = { error: text }; }
      $("#progress-text").textContent = "refused";
      showServiceError(error, response.status);
      return;
    }
    for await (const { event, data } of serverSentEvents(response)) {
      if (event === "face") {
        faces += 1;
        logFace(data, faces);
      } else if (event === "result") {
        $("#progress-text").textContent = `done: ${data.faces_refined} of ${data.faces_detected} face(s) refined`;
        renderResult(data);
      } else if (event === "error") {
        $("#progress-text").textContent = "failed";
        showServiceError(data, data.status);
      }
    }
  } catch (error) {
    $("#progress-text").textContent = "failed";
    $("#run-error").textContent = `could not reach the service: ${error}`;
  } finally {
    stopTimer();
    $("#progress-bar").classList.remove("indeterminate");
    $("#progress-bar").style.width = "100%";
    state.running = false;
    $("#run").disabled = false;
  }
}

// ---- results ---------------------------------------------------------------------------------

const png = (base64) => `data:image/png;base64,${base64}`;

function renderResult(result) {
  $("#before-image").src = state.beforeUrl;
  $("#after-image").src = png(result.image);
  renderMaskOverlay(result.mask);
  renderFaces(result.segments[0] ?? []);
  renderCrops(result.cropped_refined, result.faces_refined);
  renderTimings(result.timings);
  renderDownloads(result);
  $("#results").hidden = false;
  setCompare(Number($("#compare-slider").value));
}

function setCompare(percent) {
  $("#after-clip").style.clipPath = `inset(0 0 0 ${percent}%)`;
  $("#compare-handle").style.left = `${percent}%`;
}

// The mask as a translucent colour over the image (alpha = mask value).
function renderMaskOverlay(maskBase64) {
  const source = new Image();
  source.onload = () => {
    const canvas = element("canvas", { width: source.naturalWidth, height: source.naturalHeight });
    const context = canvas.getContext("2d");
    context.drawImage(source, 0, 0);
    const pixels = context.getImageData(0, 0, canvas.width, canvas.height);
    for (let i = 0; i < pixels.data.length; i += 4) {
      const value = pixels.data[i];
      pixels.data[i] = 255; pixels.data[i + 1] = 32; pixels.data[i + 2] = 96;
      pixels.data[i + 3] = Math.round(value * 0.55);
    }
    context.putImageData(pixels, 0, 0);
    $("#mask-overlay").src = canvas.toDataURL("image/png");
  };
  source.src = png(maskBase64);
  $("#mask-overlay").hidden = !$("#mask-toggle").checked;
}

function renderFaces(segments) {
  const rows = segments.map((face) => {
    const status = face.skipped ? `skipped: ${face.skip_reason}` : "refined";
    const upscale = face.upscale == null ? "–"
      : `${face.upscale.toFixed(2)}×${face.upscaled_size ? ` → ${face.upscaled_size.join("×")}` : ""}`;
    return element("tr", { className: `face-row ${face.skipped ? "skipped" : "refined"}` },
      element("td", { text: face.index }),
      element("td", { text: `[${face.bbox.map((v) => Math.round(v)).join(", ")}]` }),
      element("td", { text: face.confidence.toFixed(3) }),
      element("td", { text: face.seed ?? "–" }),
      element("td", { text: upscale }),
      element("td", { text: status }));
  });
  if (!rows.length) rows.push(element("tr", {}, element("td", { colspan: 6, className: "muted", text: "no face found" })));
  $("#faces tbody").replaceChildren(...rows);
}

function renderCrops(crops, refined) {
  const box = $("#crops");
  box.replaceChildren();
  if (!refined) return;
  crops.forEach((crop, index) => box.append(element("img", { src: png(crop), alt: `cropped_refined ${index}`, title: `cropped_refined ${index}` })));
}

function renderTimings(timings) {
  const entries = Object.entries(timings);
  const longest = Math.max(...entries.map(([, seconds]) => seconds), 1e-9);
  $("#timings tbody").replaceChildren(...entries.map(([stage, seconds]) => element("tr", { "data-stage": stage },
    element("th", { text: stage }),
    element("td", { className: "seconds", text: `${seconds.toFixed(3)} s` }),
    element("td", { className: "timing-bar" }, element("span", { style: `width: ${(100 * seconds / longest).toFixed(1)}%` })))));
}

function renderDownloads(result) {
  const stem = (state.file?.name ?? "image").replace(/\.[^.]+$/, "");
  const links = [];
  const add = (name, base64) => links.push(element("li", {}, element("a", { href: png(base64), download: `${stem}.${name}.png`, text: `${name}.png` })));
  result.images.forEach((image, k) => add(result.images.length > 1 ? `image-${k}` : "image", image));
  result.masks.forEach((mask, k) => add(result.masks.length > 1 ? `mask-${k}` : "mask", mask));
  if (result.faces_refined) {
    result.cropped_refined.forEach((crop, k) => add(`cropped_refined-${k}`, crop));
    result.cropped_enhanced_alpha.forEach((crop, k) => add(`cropped_enhanced_alpha-${k}`, crop));
  }
  result.cnet_images.forEach((image, k) => add(`cnet_image-${k}`, image));
  const metadata = { segments: result.segments, timings: result.timings, detailer_pipe: result.detailer_pipe };
  const json = URL.createObjectURL(new Blob([JSON.stringify(metadata, null, 2)], { type: "application/json" }));
  links.push(element("li", {}, element("a", { href: json, download: `${stem}.result.json`, text: "result.json (faces, timings, parameters)" })));
  $("#downloads").replaceChildren(...links);
}

// ---- ComfyUI workflow -------------------------------------------------------------------------

async function loadWorkflow() {
  const file = $("#workflow-input").files[0];
  clearFieldError("workflow");
  clearFieldError("workflow_node");
  if (!file) return;
  const workflow = await file.text();  // sent as text: JSON.parse here would round seeds beyond 2^53
  try {
    JSON.parse(workflow);
  } catch (error) {
    showFieldError("workflow", `not valid JSON: ${error.message}`);
    return;
  }
  const node = $("#workflow-node").value.trim();
  const response = await fetch("v1/workflow/import", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ workflow, workflow_node: node || null }),
  });
  const body = parseJson(await response.text());
  if (!response.ok) {
    showServiceError(body, response.status);
    return;
  }
  for (const [name, value] of Object.entries(body.params)) setFieldValue(name, value);
  const models = Object.entries(body.models).map(([name, source]) => `${name}: ${source.class_type}${source.value ? ` (${source.value})` : ""}`);
  $("#workflow-status").textContent = `filled from node ${body.node_id}${body.node_title ? ` "${body.node_title}"` : ""} (${body.format} format).`
    + (models.length ? ` Models in the workflow, replaced by the service's own: ${models.join("; ")}.` : "");
}

// ---- start ------------------------------------------------------------------------------------

async function start() {
  setUpDropzone();
  $("#run").addEventListener("click", run);
  $("#reset").addEventListener("click", resetForm);
  $("#compare-slider").addEventListener("input", (event) => setCompare(Number(event.target.value)));
  $("#mask-toggle").addEventListener("change", (event) => { $("#mask-overlay").hidden = !event.target.checked; });
  $("#workflow-input").addEventListener("change", loadWorkflow);
  $("#workflow-node").addEventListener("change", loadWorkflow);
  try {
    const response = await fetch("v1/info");
    const info = parseJson(await response.text());
    if (!response.ok) throw new Error(info.error ?? `HTTP ${response.status}`);
    state.specs = info.parameters;
    buildForm(state.specs);
    const inpainter = info.models?.inpainter?.model ?? info.models?.inpainter?.name ?? "inpainter";
    $("#service-status").textContent = `ready · ${info.samplers.length} samplers · ${info.schedulers.length} schedulers`
      + ` · up to ${info.limits.max_upload_bytes / 1048576 | 0} MB per image · ${typeof inpainter === "string" ? inpainter : "inpainter"}`;
    $("#run").disabled = false;
    $("#reset").disabled = false;
  } catch (error) {
    $("#service-status").textContent = `the service did not answer v1/info: ${error.message}`;
    $("#service-status").classList.add("error");
  }
}

start();

// facedetailer-serve web page: a form built from GET v1/info, runs streamed from POST v1/detail/stream
// with live step previews, Cancel, and the results where the eye is. Plain ES modules, no build
// step, no third-party code.

import { apiKey, call, errorBody, parseJson, serverSentEvents, setApiKey, statusMessage } from "./api.js";
import { $, element } from "./dom.js";
import { clearAllErrors, ParameterForm, placeError, PRESETS } from "./form.js";
import { RunProgress } from "./progress.js";
import { renderCrops, renderDownloads, renderFaces, renderTimings } from "./results.js";
import { Viewer } from "./viewer.js";

const state = { info: null, form: null, files: [], urls: [], running: null, viewer: null };

// ---- the API key ---------------------------------------------------------------------------------

function setUpApiKey() {
  const input = $("#api-key");
  input.value = apiKey();
  $("#api-key-state").textContent = input.value ? "a key is set" : "no key";
  $("#api-key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    setApiKey(input.value);
    $("#api-key-state").textContent = input.value.trim() ? "key saved in this browser" : "no key";
    if (!state.info) loadInfo();
  });
}

// ---- images --------------------------------------------------------------------------------------

function chooseFiles(fileList) {
  const files = [...fileList].filter(Boolean);
  if (!files.length) return;
  $("#error-image").textContent = "";
  $("#dropzone").classList.remove("invalid");
  for (const url of state.urls) URL.revokeObjectURL(url);
  state.files = files;
  state.urls = files.map((file) => URL.createObjectURL(file));
  $("#input-previews").replaceChildren(...state.urls.map((url, index) => element("img", {
    src: url, alt: `input image ${index + 1}: ${files[index].name}`, className: "input-preview",
  })));
  $("#image-count").textContent = files.length > 1 ? `${files.length} images (a batch: image k uses seed + k)` : "";
  state.viewer.setInputs(state.urls);
  $("#output-empty").hidden = true;
  $("#results").hidden = true;
}

function setUpDropzone() {
  const zone = $("#dropzone");
  $("#image-input").addEventListener("change", (event) => chooseFiles(event.target.files));
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("dragging"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    chooseFiles(event.dataTransfer.files);
  });
}

// The service's image limits, checked before sending (count, bytes, pixels).
async function imageProblem() {
  const limits = state.info.limits;
  if (!state.files.length) return "choose an image first";
  if (state.files.length > limits.max_batch_images) {
    return `${state.files.length} images: this service takes at most ${limits.max_batch_images} per request`;
  }
  for (const [index, file] of state.files.entries()) {
    if (file.size > limits.max_upload_bytes) {
      return `${file.name}: ${Math.ceil(file.size / 1048576)} MB, over this service's ${Math.floor(limits.max_upload_bytes / 1048576)} MB per image`;
    }
    const probe = new Image();
    probe.src = state.urls[index];
    try {
      await probe.decode();
    } catch {
      return `${file.name}: not an image the browser can read`;
    }
    if (probe.naturalWidth * probe.naturalHeight > limits.max_image_pixels) {
      return `${file.name}: ${probe.naturalWidth}×${probe.naturalHeight} pixels, over this service's ${limits.max_image_pixels}`;
    }
  }
  return "";
}

// ---- errors --------------------------------------------------------------------------------------

function showServiceError(body, status, retryAfter = null) {
  const details = Array.isArray(body?.details) ? body.details : [];
  const placed = [];
  const shared = new Map();  // a message several fields share (a work limit) is written once, below Run
  for (const detail of details) shared.set(detail.message, (shared.get(detail.message) ?? 0) + 1);
  for (const detail of details) {
    const many = shared.get(detail.message) > 1;
    const text = many ? `lowering this helps: see the message below Run${detail.limit ? ` (${detail.limit})` : ""}` : detail.message;
    if (placeError(detail.field, text)) placed.push({ field: detail.field, many });
  }
  if (!placed.length && !details.length) {
    const named = /^([a-z_]+)(\[\d+\])?: (.*)$/s.exec(body?.error ?? "");
    if (named && placeError(named[1], named[3])) placed.push({ field: named[1], many: false });
  }
  const requestId = body?.request_id ? ` (request id ${body.request_id})` : "";
  let summary;
  if ([401, 403, 429, 503, 0].includes(status)) summary = statusMessage(status, body, retryAfter);
  else if (placed.some((item) => item.many)) summary = `${status}: ${body.error}`;
  else if (placed.length) summary = `${status}: the service refused ${placed.map((item) => item.field).join(", ")} (see the field)`;
  else summary = statusMessage(status, body, retryAfter);
  $("#run-error").textContent = summary + requestId;
  if (status === 401 || status === 403) {
    $("#access").open = true;
    $("#api-key").focus();
    return;
  }
  const first = document.querySelector(".field.invalid") ?? $("#run-error");
  first.scrollIntoView({ block: "center" });
}

// ---- running -------------------------------------------------------------------------------------

const SINGLE_COLUMN = "(max-width: 900px)";  // style.css: below this the panels stack

// After Run: the progress and results where the eye is. Two columns keep the output panel in view
// (it is sticky); stacked, the page scrolls to it. Focus goes there for screen readers.
function bringOutputIntoView() {
  const panel = $("#output-panel");
  const box = panel.getBoundingClientRect();
  if (window.matchMedia(SINGLE_COLUMN).matches || box.top < 0 || box.top > window.innerHeight * 0.5) {
    panel.scrollIntoView({ block: "start" });
  }
  $("#output-heading").focus({ preventScroll: true });
}

async function run() {
  if (state.running) return;
  clearAllErrors();
  $("#dropzone").classList.remove("invalid");
  const { values, invalid } = state.form.collect();  // every problem shown at once, the image's too
  const problem = await imageProblem();
  if (problem) {
    $("#error-image").textContent = problem;
    $("#dropzone").classList.add("invalid");
  }
  if (problem || invalid) {
    $("#run-error").textContent = invalid ? "fix the highlighted values first" : problem;
    const first = problem ? $("#image-input") : invalid;
    first.focus({ preventScroll: true });
    (problem ? $("#dropzone") : first).scrollIntoView({ block: "center" });
    return;
  }
  const body = new FormData();
  state.files.forEach((file) => body.append("image", file, file.name));
  for (const [name, value] of Object.entries(values)) body.append(name, value);
  const previewEvery = Number($("#preview-every").value);
  if (previewEvery) body.append("preview_every", String(previewEvery));

  const controller = new AbortController();
  state.running = controller;
  $("#run").disabled = true;
  $("#cancel").disabled = false;
  $("#cancel").hidden = false;
  $("#results").hidden = true;
  state.viewer.setInputs(state.urls);
  const progress = new RunProgress({ onPreview: (event) => state.viewer.preview(event) });
  progress.start(state.files.length);
  bringOutputIntoView();
  try {
    const response = await call("v1/detail/stream", { method: "POST", body, signal: controller.signal });
    if (!response.ok) {
      progress.failed("refused");
      showServiceError(await errorBody(response), response.status, response.headers.get("Retry-After"));
      return;
    }
    for await (const { event, data } of serverSentEvents(response)) {
      if (event === "plan") progress.plan(data.faces);
      else if (event === "progress") progress.step(data);
      else if (event === "face") progress.face(data);
      else if (event === "result") {
        progress.finish(`done: ${data.faces_refined} of ${data.faces_detected} face${data.faces_detected === 1 ? "" : "s"} refined`);
        renderResult(data);
      } else if (event === "error") {
        state.viewer.clearResults();
        progress.failed("failed");
        showServiceError(data, data.status);
      }
    }
  } catch (error) {
    state.viewer.clearResults();  // no half-run previews left over the photo
    if (controller.signal.aborted) {
      progress.cancelled();
    } else {
      progress.failed("failed");
      showServiceError({ error: String(error.message ?? error) }, 0);
    }
  } finally {
    state.running = null;
    $("#run").disabled = false;
    $("#cancel").disabled = true;
    $("#cancel").hidden = true;
  }
}

function cancel() {
  if (!state.running) return;
  $("#cancel").disabled = true;
  $("#progress-text").textContent = "cancelling…";
  state.running.abort();  // closing the stream cancels the request's work on the service
}

function renderResult(result) {
  state.viewer.setResults(result);
  renderFaces(result, { onZoom: (image, bbox) => {
    $("#viewer").scrollIntoView({ block: "start" });
    state.viewer.zoomToFace(image, bbox);
  } });
  renderCrops(result);
  renderTimings(result.timings);
  renderDownloads(result, state.files.map((file) => file.name));
  $("#results").hidden = false;
  if (window.matchMedia(SINGLE_COLUMN).matches) $("#viewer").scrollIntoView({ block: "start" });
}

// ---- ComfyUI workflow ----------------------------------------------------------------------------

async function loadWorkflow() {
  const file = $("#workflow-input").files[0];
  clearAllErrors();
  if (!file) return;
  const workflow = await file.text();  // sent as text: JSON.parse here would round seeds beyond 2^53
  try {
    JSON.parse(workflow);
  } catch (error) {
    placeError("workflow", `not valid JSON: ${error.message}`);
    return;
  }
  const node = $("#workflow-node").value.trim();
  const response = await call("v1/workflow/import", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ workflow, workflow_node: node || null }),
  });
  if (!response.ok) {
    showServiceError(await errorBody(response), response.status, response.headers.get("Retry-After"));
    return;
  }
  const body = parseJson(await response.text());
  for (const [name, value] of Object.entries(body.params)) state.form.set(name, value);
  state.form.revealAdvanced(Object.keys(body.params));
  const models = Object.entries(body.models).map(([name, source]) => `${name}: ${source.class_type}${source.value ? ` (${source.value})` : ""}`);
  $("#workflow-status").textContent = `filled from node ${body.node_id}${body.node_title ? ` "${body.node_title}"` : ""} (${body.format} format).`
    + (models.length ? ` Models in the workflow, replaced by the service's own: ${models.join("; ")}.` : "");
}

// ---- presets -------------------------------------------------------------------------------------

function setUpPresets() {
  const select = $("#preset");
  select.replaceChildren(...PRESETS.map((preset) => element("option", { value: preset.id, text: preset.label })));
  $("#apply-preset").addEventListener("click", () => {
    const changed = state.form.applyPreset(select.value);
    $("#preset-note").textContent = changed.length ? `Set ${changed.join(", ")}.` : "";
  });
}

// ---- start ---------------------------------------------------------------------------------------

async function loadInfo() {
  const status = $("#service-status");
  try {
    const response = await call("v1/info");
    if (!response.ok) {
      const body = await errorBody(response);
      status.textContent = statusMessage(response.status, body, response.headers.get("Retry-After"));
      status.classList.add("error");
      if (response.status === 401 || response.status === 403) {
        $("#access").open = true;
        $("#api-key").focus();
      }
      return;
    }
    const info = parseJson(await response.text());
    state.info = info;
    state.form = new ParameterForm($("#params-form"), info);
    const inpainter = info.models?.inpainter?.model;
    status.classList.remove("error");
    status.textContent = `ready · ${info.samplers.length} samplers · ${info.schedulers.length} schedulers`
      + ` · up to ${info.limits.max_batch_images} images of ${info.limits.max_upload_bytes / 1048576 | 0} MB`
      + ` · at most ${info.limits.max_steps} steps${typeof inpainter === "string" ? ` · ${inpainter}` : ""}`;
    $("#run").disabled = false;
    $("#reset").disabled = false;
    $("#apply-preset").disabled = false;
  } catch (error) {
    status.textContent = `the service did not answer v1/info: ${error.message}`;
    status.classList.add("error");
  }
}

function start() {
  state.viewer = new Viewer();
  setUpApiKey();
  setUpDropzone();
  setUpPresets();
  $("#run").addEventListener("click", run);
  $("#cancel").addEventListener("click", cancel);
  $("#reset").addEventListener("click", () => {
    state.form?.reset();
    clearAllErrors();
    $("#preset-note").textContent = "";
  });
  $("#workflow-input").addEventListener("change", loadWorkflow);
  $("#workflow-node").addEventListener("change", loadWorkflow);
  loadInfo();
}

start();

// A run's progress: the request's status and ETA, one bar per face (from the "plan" event), and
// step previews handed to the viewer, which draws them over the face's crop region.

import { $, element, seconds } from "./dom.js";

export class RunProgress {
  constructor({ onPreview } = {}) {
    this.onPreview = onPreview ?? (() => {});
    this.faces = new Map();  // "image:index" → {row, bar, text, done, total, finished}
    this.started = performance.now();
    this.timer = null;
    this.multipleImages = false;
  }

  start(imageCount) {
    this.multipleImages = imageCount > 1;
    $("#progress").hidden = false;
    $("#face-progress").replaceChildren();
    this.setOverall(null);
    this.status("detecting faces…");
    $("#progress-eta").textContent = "";
    this.started = performance.now();
    this.timer = setInterval(() => {
      $("#progress-time").textContent = seconds((performance.now() - this.started) / 1000);
    }, 200);
  }

  stop() {
    clearInterval(this.timer);
    $("#progress-time").textContent = seconds((performance.now() - this.started) / 1000);
  }

  status(text) {
    $("#progress-text").textContent = text;
  }

  setOverall(fraction) {
    const bar = $("#progress-bar");
    const box = bar.parentElement;
    if (fraction === null) {
      bar.classList.add("indeterminate");
      box.removeAttribute("aria-valuenow");
      return;
    }
    bar.classList.remove("indeterminate");
    const percent = Math.max(0, Math.min(100, Math.round(fraction * 100)));
    bar.style.width = `${percent}%`;
    box.setAttribute("aria-valuenow", String(percent));
  }

  faceName(image, index) {
    return this.multipleImages ? `Image ${image + 1} · face ${index}` : `Face ${index}`;
  }

  row(image, index) {
    const key = `${image}:${index}`;
    if (!this.faces.has(key)) {
      const name = this.faceName(image, index);
      const fill = element("div", { className: "bar-fill" });
      const bar = element("div", {
        className: "bar face-bar", role: "progressbar", "aria-label": name, "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": 0,
      }, fill);
      const text = element("span", { className: "face-status muted", text: "waiting" });
      const row = element("li", { className: "face-progress", "data-image": image, "data-index": index },
        element("div", { className: "face-progress-head" }, element("strong", { text: name }), text), bar);
      $("#face-progress").append(row);
      this.faces.set(key, { row, bar, fill, text, done: 0, total: 0, finished: false });
    }
    return this.faces.get(key);
  }

  plan(faces) {
    for (const face of faces) this.row(face.image, face.index);
    const count = faces.length;
    this.status(count ? `sampling ${count} face${count === 1 ? "" : "s"}…` : "no face to sample");
    this.setOverall(count ? 0 : null);
  }

  step(event) {
    const face = this.row(event.image, event.index);
    face.done = event.done;
    face.total = event.total;
    const percent = event.total ? Math.round((100 * event.done) / event.total) : 0;
    face.fill.style.width = `${percent}%`;
    face.bar.setAttribute("aria-valuenow", String(percent));
    const cycles = event.cycles > 1 ? ` · cycle ${event.cycle + 1}/${event.cycles}` : "";
    const eta = event.eta_s != null ? ` · ${seconds(event.eta_s)} left` : "";
    face.text.textContent = `step ${event.step}/${event.steps}${cycles}${eta}`;
    this.updateOverall();
    if (event.request_eta_s != null) $("#progress-eta").textContent = `about ${seconds(event.request_eta_s)} left`;
    if (event.preview) this.onPreview(event);
  }

  face(event) {
    const face = this.row(event.image ?? 0, event.index);
    face.finished = true;
    face.row.classList.add(event.status === "refined" ? "refined" : "skipped");
    face.text.textContent = event.status === "refined" ? "refined" : `skipped: ${event.status}`;
    if (event.status === "refined") {
      face.fill.style.width = "100%";
      face.bar.setAttribute("aria-valuenow", "100");
    }
    this.updateOverall();
  }

  updateOverall() {
    const faces = [...this.faces.values()];
    const known = faces.filter((face) => face.total || face.finished);
    if (!known.length) return;
    const typical = Math.max(...faces.map((face) => face.total), 1);
    let done = 0;
    let total = 0;
    for (const face of faces) {
      const size = face.total || typical;
      total += size;
      done += face.finished ? size : Math.min(face.done, size);
    }
    this.setOverall(total ? done / total : null);
  }

  finish(text) {
    this.stop();
    this.status(text);
    $("#progress-eta").textContent = "";
    this.setOverall(1);
  }

  cancelled() {
    this.stop();
    this.status("cancelled: the service stopped the work");
    $("#progress-eta").textContent = "";
    for (const face of this.faces.values()) {
      if (!face.finished) face.text.textContent = "cancelled";
    }
    $("#progress-bar").classList.remove("indeterminate");
  }

  failed(text) {
    this.stop();
    this.status(text);
    $("#progress-eta").textContent = "";
    $("#progress-bar").classList.remove("indeterminate");
  }
}

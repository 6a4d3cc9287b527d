// The image viewer: each image of the batch before ◀ ▶ after, with the mask, the live step previews
// over each face's crop region while the inpainter samples, and a 1:1 view to pan over.
//
// Both sides are <img> elements: the browser shows the uploaded photo upright from its EXIF
// orientation ("before"), the service returns pixels already upright ("after"); nothing is drawn
// through a canvas except the mask's tint, which comes from the service's own (upright) mask.

import { $, element } from "./dom.js";

const png = (base64) => `data:image/png;base64,${base64}`;

export class Viewer {
  constructor() {
    this.images = [];  // per image: {before, after, mask, width, height, previews: Map(index → {region, url})}
    this.selected = 0;
    this.zoomed = false;
    this.maskUrls = new Map();
    $("#compare-slider").addEventListener("input", (event) => this.setDivider(Number(event.target.value)));
    $("#zoom-toggle").addEventListener("click", () => this.setZoom(!this.zoomed));
    $("#mask-toggle").addEventListener("change", () => this.renderMask());
    this.setUpPointer();
  }

  setInputs(urls) {
    this.images = urls.map((url) => ({ before: url, after: null, mask: null, width: 0, height: 0, previews: new Map() }));
    this.images.forEach((image) => {
      const probe = new Image();
      probe.onload = () => {
        image.width = probe.naturalWidth;  // upright size: the browser applies the EXIF orientation
        image.height = probe.naturalHeight;
        this.renderPreviews();
      };
      probe.src = image.before;
    });
    this.maskUrls.clear();
    $("#viewer").hidden = urls.length === 0;
    this.renderTabs();
    this.show(0);
  }

  renderTabs() {
    const tabs = $("#image-tabs");
    tabs.replaceChildren();
    tabs.hidden = this.images.length < 2;
    this.images.forEach((image, index) => {
      const tab = element("button", {
        type: "button", role: "tab", id: `image-tab-${index}`, "aria-selected": String(index === this.selected),
        "aria-controls": "scroller", tabindex: index === this.selected ? 0 : -1, text: `Image ${index + 1}`,
      });
      tab.addEventListener("click", () => this.show(index));
      tab.addEventListener("keydown", (event) => {
        const delta = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
        if (!delta) return;
        const next = (index + delta + this.images.length) % this.images.length;
        this.show(next);
        $(`#image-tab-${next}`).focus();
      });
      tabs.append(tab);
    });
  }

  show(index) {
    this.selected = Math.max(0, Math.min(index, this.images.length - 1));
    const image = this.images[this.selected];
    if (!image) return;
    for (const tab of $("#image-tabs").children) {
      const selected = tab.id === `image-tab-${this.selected}`;
      tab.setAttribute("aria-selected", String(selected));
      tab.tabIndex = selected ? 0 : -1;
    }
    $("#before-image").src = image.before;
    $("#before-image").alt = this.images.length > 1 ? `image ${this.selected + 1}, before` : "before";
    $("#after-clip").hidden = !image.after;
    if (image.after) {
      $("#after-image").src = image.after;
      $("#after-image").alt = this.images.length > 1 ? `image ${this.selected + 1}, after` : "after";
    }
    $("#compare-slider").disabled = !image.after;
    this.setDivider(Number($("#compare-slider").value));
    this.renderMask();
    this.renderPreviews();
  }

  // A step preview (JPEG of the face's latent) over its crop region on the before image.
  preview(event) {
    const image = this.images[event.image ?? 0];
    if (!image) return;
    image.previews.set(event.index, { region: event.crop_region, url: `data:image/jpeg;base64,${event.preview}` });
    if ((event.image ?? 0) === this.selected) this.renderPreviews();
  }

  renderPreviews() {
    const layer = $("#preview-layer");
    const image = this.images[this.selected];
    if (!image || image.after || !image.width) {
      layer.replaceChildren();
      return;
    }
    const children = [];
    for (const [index, { region, url }] of image.previews) {
      const [x1, y1, x2, y2] = region;
      const style = `left:${(100 * x1) / image.width}%;top:${(100 * y1) / image.height}%;`
        + `width:${(100 * (x2 - x1)) / image.width}%;height:${(100 * (y2 - y1)) / image.height}%`;
      children.push(element("img", { className: "face-preview", src: url, alt: "", "data-index": index, style }));
    }
    layer.replaceChildren(...children);
  }

  setResults(result) {
    result.images.forEach((base64, index) => {
      const image = this.images[index];
      if (!image) return;
      image.after = png(base64);
      image.mask = result.masks[index] ?? null;
      image.previews.clear();
    });
    this.maskUrls.clear();
    this.show(this.selected);
  }

  clearResults() {
    for (const image of this.images) {
      image.after = null;
      image.mask = null;
      image.previews.clear();
    }
    this.show(this.selected);
  }

  setDivider(percent) {
    $("#after-clip").style.clipPath = `inset(0 0 0 ${percent}%)`;
    $("#compare-handle").style.left = `${percent}%`;
    $("#compare-handle").hidden = $("#after-clip").hidden;
    $("#compare-slider").value = String(percent);
    $("#compare-slider").setAttribute("aria-valuetext", `${Math.round(percent)}% before, ${100 - Math.round(percent)}% after`);
  }

  setZoom(on, focus = null) {
    this.zoomed = on;
    $("#compare").classList.toggle("actual", on);
    $("#scroller").classList.toggle("zoomed", on);
    $("#zoom-toggle").setAttribute("aria-pressed", String(on));
    $("#zoom-toggle").textContent = on ? "Fit" : "1:1";
    $("#zoom-toggle").setAttribute("aria-label", on ? "Fit the image to the panel" : "Show the image at 1:1 (100%)");
    if (on && focus) this.centre(focus);
  }

  // Zoom to a face: its image, 1:1, the bbox in the middle of the panel.
  zoomToFace(imageIndex, bbox) {
    this.show(imageIndex);
    this.setZoom(true);
    requestAnimationFrame(() => this.centre(bbox));
  }

  centre([x1, y1, x2, y2]) {
    const scroller = $("#scroller");
    const before = $("#before-image");
    const scale = before.clientWidth / (this.images[this.selected]?.width || before.naturalWidth || 1);
    scroller.scrollLeft = ((x1 + x2) / 2) * scale - scroller.clientWidth / 2;
    scroller.scrollTop = ((y1 + y2) / 2) * scale - scroller.clientHeight / 2;
    scroller.focus({ preventScroll: true });
  }

  renderMask() {
    const overlay = $("#mask-overlay");
    const image = this.images[this.selected];
    const wanted = $("#mask-toggle").checked && image?.mask;
    overlay.hidden = !wanted;
    if (!wanted) return;
    const cached = this.maskUrls.get(this.selected);
    if (cached) {
      overlay.src = cached;
      return;
    }
    const selected = this.selected;
    const source = new Image();
    source.onload = () => {  // the mask as a translucent tint (alpha = mask value)
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
      this.maskUrls.set(selected, canvas.toDataURL("image/png"));
      if (this.selected === selected) overlay.src = this.maskUrls.get(selected);
    };
    source.src = png(image.mask);
  }

  // Fit: dragging moves the divider. 1:1: dragging pans (the arrow keys scroll the focused panel).
  setUpPointer() {
    const scroller = $("#scroller");
    let drag = null;
    scroller.addEventListener("pointerdown", (event) => {
      if (event.button !== 0) return;
      drag = { x: event.clientX, y: event.clientY, left: scroller.scrollLeft, top: scroller.scrollTop };
      scroller.setPointerCapture(event.pointerId);
      if (!this.zoomed) this.dividerAt(event.clientX);
    });
    scroller.addEventListener("pointermove", (event) => {
      if (!drag) return;
      if (this.zoomed) {
        scroller.scrollLeft = drag.left - (event.clientX - drag.x);
        scroller.scrollTop = drag.top - (event.clientY - drag.y);
      } else {
        this.dividerAt(event.clientX);
      }
    });
    const end = () => { drag = null; };
    scroller.addEventListener("pointerup", end);
    scroller.addEventListener("pointercancel", end);
  }

  dividerAt(clientX) {
    if ($("#after-clip").hidden) return;
    const box = $("#compare").getBoundingClientRect();
    this.setDivider(Math.max(0, Math.min(100, (100 * (clientX - box.left)) / box.width)));
  }
}

// The result's tables and files: every face of every image, the refined crops, the stage timings
// as a tree (what contains what) and downloads of the outputs this run produced.

import { $, element, seconds } from "./dom.js";

const png = (base64) => `data:image/png;base64,${base64}`;

export function renderFaces(result, { onZoom }) {
  const batch = result.segments.length > 1;
  $("#faces thead tr").replaceChildren(...[batch ? "image" : null, "#", "bbox", "confidence", "seed", "upscale", "status", "view"]
    .filter(Boolean).map((name) => element("th", { scope: "col", text: name })));
  const rows = [];
  result.segments.forEach((segments, imageIndex) => {
    if (!segments.length && batch) {
      rows.push(element("tr", { className: "muted" }, element("td", { text: imageIndex + 1 }),
        element("td", { colspan: 7, text: "no face found" })));
    }
    for (const face of segments) {
      const status = face.skipped ? `skipped: ${face.skip_reason}` : "refined";
      const upscale = face.upscale == null ? "–"
        : `${face.upscale.toFixed(2)}×${face.upscaled_size ? ` → ${face.upscaled_size.join("×")}` : ""}`;
      const zoom = element("button", {
        type: "button", className: "secondary small-button", text: "1:1",
        "aria-label": `Show ${batch ? `image ${imageIndex + 1}, ` : ""}face ${face.index} at 1:1`,
      });
      zoom.addEventListener("click", () => onZoom(imageIndex, face.bbox));
      rows.push(element("tr", { className: `face-row ${face.skipped ? "skipped" : "refined"}`, "data-image": imageIndex },
        batch ? element("td", { text: imageIndex + 1 }) : null,
        element("td", { text: face.index }),
        element("td", { text: `[${face.bbox.map((v) => Math.round(v)).join(", ")}]` }),
        element("td", { text: face.confidence.toFixed(3) }),
        element("td", { text: face.seed ?? "–" }),
        element("td", { text: upscale }),
        element("td", { text: status }),
        element("td", {}, zoom)));
    }
  });
  if (!rows.length) rows.push(element("tr", {}, element("td", { colspan: 8, className: "muted", text: "no face found" })));
  $("#faces tbody").replaceChildren(...rows);
}

export function renderCrops(result) {
  const box = $("#crops");
  box.replaceChildren();
  if (!result.faces_refined) return;
  result.cropped_refined.forEach((crop, index) => box.append(element("img", {
    src: png(crop), alt: `refined crop ${index}`, title: `cropped_refined ${index}`,
  })));
}

// What contains what (serve_app/ingress.py and pipeline.py): total = decode + pipeline + encode
// (+ the rest); the pipeline = detect, sam/segm, inpaint and blend, summed over the batch's images
// (+ its own rest); inpaint is the ingress' wait for the inpainter, of which inpaint_engine was in
// the replica's engine (the rest: the hop and transfers), and of that inpaint_queue_wait waited for
// a place in the engine (the rest: encoding, sampling, decoding).
const TIMING_TREE = {
  total: ["decode", "pipeline", "encode"],
  pipeline: ["detect", "sam", "detect_segm", "inpaint", "blend"],
  inpaint: ["inpaint_engine"],
  inpaint_engine: ["inpaint_queue_wait"],
};
const REST = {
  total: "other (request handling)",
  pipeline: "other (planning, waits)",
  inpaint: "hop to the inpainter and back",
  inpaint_engine: "encode, sample, decode",
};
const LABELS = {
  total: "total", decode: "reading the upload", pipeline: "FaceDetailer", encode: "encoding the result",
  detect: "face detection", sam: "SAM", detect_segm: "segm detection", inpaint: "inpainter call",
  inpaint_engine: "in the inpainter's engine", inpaint_queue_wait: "waiting for the engine", blend: "pasting back",
};

export function renderTimings(timings) {
  const total = timings.total ?? Math.max(...Object.values(timings), 1e-9);
  const placed = new Set();
  const row = (stage, value, depth, label, isRest = false) => element("li", {
    className: `timing depth-${depth}${isRest ? " rest" : ""}`, "data-stage": isRest ? `${stage}:rest` : stage,
  },
  element("span", { className: "timing-name" }, element("span", { text: label }), isRest ? "" : element("code", { className: "node-name", text: ` ${stage}` })),
  element("span", { className: "timing-seconds", text: seconds(value) }),
  element("span", { className: "timing-bar", "aria-hidden": "true" }, element("span", { style: `width: ${Math.min(100, (100 * value) / total).toFixed(1)}%` })));

  function node(stage, depth) {
    placed.add(stage);
    const value = timings[stage];
    const children = (TIMING_TREE[stage] ?? []).filter((child) => timings[child] !== undefined);
    const items = [row(stage, value, depth, LABELS[stage] ?? stage)];
    if (children.length) {
      const list = element("ul", {});
      for (const child of children) list.append(...node(child, depth + 1));
      const rest = value - children.reduce((sum, child) => sum + timings[child], 0);
      if (rest > 0.0005) list.append(row(stage, rest, depth + 1, REST[stage] ?? "other", true));
      items[0].append(list);
    }
    return items;
  }

  const root = element("ul", { className: "timing-tree" });
  if (timings.total !== undefined) root.append(...node("total", 0));
  else if (timings.pipeline !== undefined) root.append(...node("pipeline", 0));
  for (const [stage, value] of Object.entries(timings)) {
    if (!placed.has(stage)) root.append(row(stage, value, 0, LABELS[stage] ?? stage));
  }
  $("#timings").replaceChildren(root);
}

// Downloads of what this run produced: no crops when no face was refined, no ControlNet images
// when no ControlNet ran (the node's lists then hold a black placeholder).
export function renderDownloads(result, fileNames) {
  const stem = (index) => (fileNames[index] ?? fileNames[0] ?? "image").replace(/\.[^.]+$/, "");
  const batch = result.images.length > 1;
  const links = [];
  const add = (name, href, text = name) => links.push(element("li", {}, element("a", { href, download: name, text })));
  result.images.forEach((image, k) => add(`${stem(k)}.${batch ? `image-${k}` : "image"}.png`, png(image)));
  result.masks.forEach((mask, k) => add(`${stem(k)}.${batch ? `mask-${k}` : "mask"}.png`, png(mask)));
  if (result.faces_refined) {
    result.cropped_refined.forEach((crop, k) => add(`${stem(0)}.cropped_refined-${k}.png`, png(crop)));
    result.cropped_enhanced_alpha.forEach((crop, k) => add(`${stem(0)}.cropped_enhanced_alpha-${k}.png`, png(crop)));
    if (result.detailer_pipe?.params?.controlnet) {  // listed even at strength 0, as the node does
      result.cnet_images.forEach((image, k) => add(`${stem(0)}.cnet_image-${k}.png`, png(image)));
    }
  }
  const metadata = { segments: result.segments, timings: result.timings, detailer_pipe: result.detailer_pipe };
  const json = URL.createObjectURL(new Blob([JSON.stringify(metadata, null, 2)], { type: "application/json" }));
  add(`${stem(0)}.result.json`, json, "result.json (faces, timings, parameters)");
  $("#downloads").replaceChildren(...links);
}

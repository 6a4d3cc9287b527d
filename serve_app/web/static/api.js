// Talking to the service: the API key on every call, JSON with exact big integers, the SSE stream,
// and error bodies ({"error", "details": [{field, message}], "request_id"?}) worded for people.

const KEY_STORAGE = "facedetailer.apiKey";

export function apiKey() {
  try {
    return localStorage.getItem(KEY_STORAGE) ?? "";
  } catch {
    return "";  // storage disabled: the key lives for this page only
  }
}

let sessionKey = "";

export function setApiKey(key) {
  sessionKey = key.trim();
  try {
    if (sessionKey) localStorage.setItem(KEY_STORAGE, sessionKey);
    else localStorage.removeItem(KEY_STORAGE);
  } catch {
    // not stored: still sent for this page
  }
}

function currentKey() {
  return sessionKey || apiKey();
}

// fetch() relative to the page's <base>, with "Authorization: Bearer <key>" when a key is set.
export function call(path, options = {}) {
  const headers = new Headers(options.headers ?? {});
  const key = currentKey();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  return fetch(path, { ...options, headers });
}

// JSON with integers beyond 2^53 (seeds, hook bounds) kept exact, as strings.
export function parseJson(text) {
  return JSON.parse(text, (key, value, context) => {
    if (typeof value === "number" && !Number.isSafeInteger(value) && context && /^-?\d+$/.test(context.source)) {
      return context.source;
    }
    return value;
  });
}

// The body of a refused call: the service's JSON error, or its text.
export async function errorBody(response) {
  const text = await response.text();
  try {
    const body = parseJson(text);
    if (body && typeof body === "object") return body;
  } catch {
    // not JSON: a proxy's page or a plain message
  }
  return { error: text.trim().slice(0, 300) || response.statusText };
}

// What to tell the user about a refused call that no single field explains.
export function statusMessage(status, body, retryAfter) {
  const message = body?.error ?? `HTTP ${status}`;
  const wait = retryAfter ? ` Try again in ${retryAfter} s.` : " Try again in a moment.";
  if (status === 401) return "This service needs an API key (401): enter yours under “API key” at the top.";
  if (status === 403) return `This API key may not do that (403): ${message}`;
  if (status === 429) return `Too many requests for now (429): ${message}.${wait}`;
  if (status === 503) return `The service is busy (503): ${message}.${wait}`;
  if (status === 0) return `Could not reach the service: ${message}`;
  return `${status}: ${message}`;
}

// Server-Sent Events from a fetch() response: yields {event, data} with data parsed as JSON.
export async function* serverSentEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value.replace(/\r\n/g, "\n");
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
  } finally {
    reader.releaseLock();
  }
}

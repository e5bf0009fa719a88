// Talking to the service: JSON in, JSON out, and problems (RFC 9457) turned into plain words.

export class ProblemError extends Error {
  constructor(title, detail, status) {
    super(detail);
    this.title = title;
    this.status = status;
  }
}

// The service answers errors as application/problem+json; anything else (a proxy's HTML page,
// a dropped connection) still becomes a sentence a person can act on.
async function problemOf(response) {
  const type = response.headers.get("content-type") || "";
  if (type.includes("json")) {
    try {
      const body = await response.json();
      if (body && body.detail) {
        return new ProblemError(body.title || response.statusText, body.detail, response.status);
      }
    } catch {
      // not JSON after all: fall through to the status line
    }
  }
  return new ProblemError(
    `HTTP ${response.status}`,
    `the service answered ${response.status} ${response.statusText} without details`,
    response.status,
  );
}

export async function request(url, options = {}) {
  let response;
  try {
    response = await fetch(url, options);
  } catch (error) {
    throw new ProblemError("Service unreachable", `could not reach the service (${error.message})`, 0);
  }
  if (!response.ok) {
    throw await problemOf(response);
  }
  return response.json();
}

// One image as the raw request body, with its own type (or octet-stream when it has none).
export function postImage(url, blob) {
  return request(url, {
    method: "POST",
    headers: { "Content-Type": blob.type || "application/octet-stream", Accept: "application/json" },
    body: blob,
  });
}

// A base64 float32 array from the explorer route -> { shape, values: Float32Array }.
export function decodeTensor(tensor) {
  const text = atob(tensor.data);
  const bytes = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i += 1) {
    bytes[i] = text.charCodeAt(i);
  }
  return { shape: tensor.shape, values: new Float32Array(bytes.buffer) };
}

export function query(params) {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== null && value !== undefined && value !== "") {
      search.set(key, String(value));
    }
  }
  const text = search.toString();
  return text ? `?${text}` : "";
}

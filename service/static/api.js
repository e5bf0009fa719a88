// Talking to the service: JSON in, JSON out, and problems (RFC 9457) turned into plain words.

export class ProblemError extends Error {
  constructor(title, detail, status, type = "") {
    super(detail);
    this.title = title;
    this.status = status;
    this.type = type;
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
        return new ProblemError(body.title || response.statusText, body.detail, response.status, body.type || "");
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

// The response, once it is known to be a success; a ProblemError otherwise.
async function exchange(url, options) {
  let response;
  try {
    response = await fetch(url, options);
  } catch (error) {
    throw new ProblemError("Service unreachable", `could not reach the service (${error.message})`, 0);
  }
  if (!response.ok) {
    throw await problemOf(response);
  }
  return response;
}

export async function request(url, options = {}) {
  return (await exchange(url, options)).json();
}

// An image the page shows, and the id the service keeps it under once sent: every later
// request about it (other heatmaps, the layer explorer, another top-k) names it instead of
// uploading it again.
export class Picture {
  constructor(blob) {
    this.blob = blob;
    this.id = null;
  }
}

function withParams(url, params) {
  const target = new URL(url, location.href);
  for (const [key, value] of Object.entries(params)) {
    target.searchParams.set(key, value);
  }
  return `${target.pathname}${target.search}`;
}

// POST about one picture: by its id when the service holds it, else its bytes (kept from then on).
export async function postPicture(url, picture) {
  const accept = { Accept: "application/json" };
  if (picture.id) {
    try {
      return await request(withParams(url, { image: picture.id }), { method: "POST", headers: accept });
    } catch (error) {
      if (!(error instanceof ProblemError) || !error.type.endsWith("image-not-held")) {
        throw error;
      }
      picture.id = null; // the service let it go (or restarted): send it again
    }
  }
  const response = await exchange(withParams(url, { keep: "true" }), {
    method: "POST",
    headers: { "Content-Type": picture.blob.type || "application/octet-stream", ...accept },
    body: picture.blob,
  });
  picture.id = response.headers.get("Image-Id"); // none when the service keeps no images
  return response.json();
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

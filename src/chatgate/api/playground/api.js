// Talking to the server's OpenAI API: the API key, JSON calls, SSE streams, and errors that
// carry the API's own message.

const KEY = "chatgate.apiKey";

/** An error answer from the API (or the network), with the API's message. */
export class ApiError extends Error {
  constructor(message, status = 0) {
    super(message);
    this.name = "ApiError";
    this.status = status;
  }
}

/** The API key kept for this browser tab (sessionStorage: gone when the tab closes). */
export function apiKey() {
  return sessionStorage.getItem(KEY) ?? "";
}

/** Keep `key` for this tab; an empty key is forgotten. */
export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY, key);
  else sessionStorage.removeItem(KEY);
}

function headers() {
  const out = { "Content-Type": "application/json" };
  const key = apiKey();
  if (key) out.Authorization = `Bearer ${key}`;
  return out;
}

async function send(path, body, signal) {
  let response;
  try {
    response = await fetch(path, {
      method: body === undefined ? "GET" : "POST",
      headers: headers(),
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
    });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(`The server could not be reached (${error.message}).`);
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body?.error?.message) message = body.error.message;
  } catch {
    // Not an OpenAI-shaped error (a proxy's page, say): the status line says enough.
  }
  return new ApiError(message, response.status);
}

/** GET or POST `path` (relative, so the page works under a path prefix) and parse the JSON. */
export async function call(path, body, signal) {
  return (await send(path, body, signal)).json();
}

/** POST `body` and yield each JSON event of the SSE answer until `[DONE]`. */
export async function* stream(path, body, signal) {
  const response = await send(path, { ...body, stream: true }, signal);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replaceAll("\r\n", "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const data = dataOf(buffer.slice(0, end));
      buffer = buffer.slice(end + 2);
      if (data === "[DONE]") return;
      if (data === null) continue;
      const event = JSON.parse(data);
      // An error after the stream began arrives as an event of its own.
      if (event.error) throw new ApiError(event.error.message ?? "The stream failed.", 500);
      yield event;
    }
  }
}

function dataOf(event) {
  const lines = event.split("\n").filter((line) => line.startsWith("data:"));
  if (!lines.length) return null;
  return lines.map((line) => line.slice(5).trimStart()).join("\n");
}

/** The served models, with what each can do (a chatgate extension; absent: unknown). */
export async function listModels() {
  const { data } = await call("v1/models");
  return data.map((model) => ({ id: model.id, capabilities: model.capabilities ?? null }));
}

// Small pieces the three tabs share: sampling fields, model pickers, running one streamed
// request at a time with Send/Stop, timing, and messages in a log.

/** Copy the shared sampling fields into each `.sampling` slot of `root`. */
export function addSamplingFields(root) {
  const fields = document.getElementById("sampling-fields");
  for (const slot of root.querySelectorAll(".sampling")) {
    slot.append(fields.content.cloneNode(true));
    slot.querySelector("[name=max_tokens]").value = slot.dataset.maxTokens;
  }
}

/** The sampling parameters filled in on `panel`; empty fields are left to the server. */
export function sampling(panel) {
  const out = {};
  for (const input of panel.querySelectorAll(".sampling input")) {
    if (input.value.trim() !== "") out[input.name] = Number(input.value);
  }
  return out;
}

/** Offer in `select` the models that have `capability` (or whose capabilities are unknown),
 * the most specialised first: a dedicated embedding model before a chat model that also embeds. */
export function fillModels(select, models, capability) {
  const previous = select.value;
  const breadth = (m) => m.capabilities?.length ?? Infinity;
  const usable = models
    .filter((m) => !m.capabilities || m.capabilities.includes(capability))
    .sort((a, b) => breadth(a) - breadth(b));
  select.replaceChildren(...usable.map((m) => new Option(m.id, m.id)));
  if (usable.some((m) => m.id === previous)) select.value = previous;
  select.disabled = usable.length === 0;
}

/** When a request started, when its first text came and when it ended. */
export class Timer {
  constructor() {
    this.start = performance.now();
    this.first = null;
    this.end = null;
  }

  token() {
    this.first ??= performance.now();
  }

  stop() {
    this.end = performance.now();
  }
}

/** "12 prompt + 30 completion tokens · first token 0.41 s · 18.2 tokens/s" */
export function statsText(usage, timer) {
  const parts = [];
  if (usage) parts.push(`${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens`);
  if (timer.first !== null) parts.push(`first token ${((timer.first - timer.start) / 1000).toFixed(2)} s`);
  // The rate after the first token: decoding speed, not prompt processing.
  const decoding = (timer.end - (timer.first ?? timer.end)) / 1000;
  if (usage && usage.completion_tokens > 1 && decoding > 0) {
    parts.push(`${((usage.completion_tokens - 1) / decoding).toFixed(1)} tokens/s`);
  }
  return parts.join(" · ");
}

/** One request at a time on a panel: Send is disabled and Stop enabled while it runs. */
export class Generation {
  constructor(panel) {
    this.send = panel.querySelector("[data-action=send]");
    this.stopButton = panel.querySelector("[data-action=stop]");
    this.controller = null;
    this.stopButton?.addEventListener("click", () => this.stop());
  }

  get busy() {
    return this.controller !== null;
  }

  /** Abort the request in flight, if any (the server then cancels the generation). */
  stop() {
    this.controller?.abort();
  }

  /** Run `task(signal, timer)`; resolve to {outcome: "done" | "stopped" | "error", timer, error}. */
  async run(task) {
    const controller = (this.controller = new AbortController());
    const timer = new Timer();
    this.#buttons(true);
    try {
      await task(controller.signal, timer);
      return { outcome: "done", timer };
    } catch (error) {
      if (controller.signal.aborted) return { outcome: "stopped", timer };
      return { outcome: "error", timer, error };
    } finally {
      timer.stop();
      this.controller = null;
      this.#buttons(false);
    }
  }

  #buttons(running) {
    this.send.disabled = running;
    if (this.stopButton) this.stopButton.disabled = !running;
  }
}

/** Run `change` and keep `log` scrolled to the end if it was there before. */
export function keepScrolled(log, change) {
  const atEnd = log.scrollHeight - log.scrollTop - log.clientHeight < 48;
  change();
  if (atEnd) log.scrollTop = log.scrollHeight;
}

/** Append a message to `log`: who said it, its body and a line for details. */
export function appendMessage(log, role, who) {
  const message = document.createElement("article");
  message.className = `message ${role}`;
  const name = document.createElement("div");
  name.className = "who";
  name.textContent = who;
  const body = document.createElement("div");
  body.className = "body";
  const meta = document.createElement("div");
  meta.className = "meta";
  message.append(name, body, meta);
  keepScrolled(log, () => log.append(message));
  return { message, body, meta };
}

/** Show `error` (an ApiError's message) in `where`, marked as an error. */
export function showError(where, error) {
  where.classList.add("error");
  where.textContent = error.status ? `Error ${error.status}: ${error.message}` : error.message;
}

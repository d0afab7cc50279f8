// The chat tab: a conversation kept while the page is open, streamed replies, Stop, New chat.

import { stream } from "./api.js";
import { render } from "./markdown.js";
import { Generation, appendMessage, keepScrolled, sampling, showError, statsText } from "./ui.js";

/** Wire up the chat panel. */
export function setupChat(panel) {
  const log = panel.querySelector("[role=log]");
  const form = panel.querySelector("form");
  const box = form.elements.message;
  const history = [];
  const generation = new Generation(panel);

  box.addEventListener("keydown", (event) => {
    // Enter sends; Shift+Enter (and Enter while an input method composes) adds a line.
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = box.value.trim();
    if (!text || generation.busy) return;
    box.value = "";
    ask(text);
  });
  panel.querySelector("[data-action=new-chat]").addEventListener("click", () => {
    generation.stop();
    history.length = 0;
    log.replaceChildren();
    box.focus();
  });

  async function ask(text) {
    const model = panel.querySelector("[name=model]").value;
    history.push({ role: "user", content: text });
    appendMessage(log, "user", "You").body.textContent = text;
    const reply = appendMessage(log, "assistant", model || "model");
    reply.message.classList.add("pending");
    const system = panel.querySelector("[name=system]").value.trim();
    const body = {
      model,
      messages: [...(system ? [{ role: "system", content: system }] : []), ...history],
      stream_options: { include_usage: true },
      ...sampling(panel),
    };
    let answer = "";
    let usage = null;
    const result = await generation.run(async (signal, timer) => {
      for await (const chunk of stream("v1/chat/completions", body, signal)) {
        const delta = chunk.choices?.[0]?.delta?.content;
        if (delta) {
          timer.token();
          answer += delta;
          reply.message.classList.remove("pending");
          keepScrolled(log, () => render(reply.body, answer));
        }
        if (chunk.usage) usage = chunk.usage;
      }
    });
    reply.message.classList.remove("pending");
    finish(result, reply, answer, usage, text);
  }

  function finish({ outcome, timer, error }, reply, answer, usage, text) {
    if (outcome !== "done" && !answer) {
      // Nothing came back: forget the question so it can be sent again (after fixing the key, say).
      history.pop();
      if (!box.value) box.value = text;
      if (error) showError(reply.body, error);
      else reply.meta.textContent = "Stopped before any text";
      return;
    }
    history.push({ role: "assistant", content: answer });
    if (outcome === "error") showError(reply.meta, error);
    else if (outcome === "stopped") reply.meta.textContent = ["Stopped", statsText(null, timer)].filter(Boolean).join(" · ");
    else reply.meta.textContent = statsText(usage, timer);
  }
}

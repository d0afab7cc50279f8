// The completions tab: a prompt and its streamed continuation.

import { stream } from "./api.js";
import { Generation, keepScrolled, sampling, showError, statsText } from "./ui.js";

/** Wire up the completions panel. */
export function setupCompletions(panel) {
  const output = panel.querySelector("[role=log]");
  const stats = panel.querySelector(".stats");
  const form = panel.querySelector("form");
  const generation = new Generation(panel);

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const prompt = form.elements.prompt.value;
    if (!prompt || generation.busy) return;
    const shown = span("prompt", prompt);
    const generated = span("generated", "");
    output.classList.remove("error");
    output.replaceChildren(shown, generated);
    stats.textContent = "";
    let usage = null;
    const body = {
      model: panel.querySelector("[name=model]").value,
      prompt,
      stream_options: { include_usage: true },
      ...sampling(panel),
    };
    const { outcome, timer, error } = await generation.run(async (signal, t) => {
      for await (const chunk of stream("v1/completions", body, signal)) {
        const text = chunk.choices?.[0]?.text;
        if (text) {
          t.token();
          keepScrolled(output, () => generated.append(text));
        }
        if (chunk.usage) usage = chunk.usage;
      }
    });
    if (outcome === "error") showError(stats, error);
    else stats.textContent = [outcome === "stopped" ? "Stopped" : "", statsText(usage, timer)].filter(Boolean).join(" · ");
  });
}

function span(className, text) {
  const node = document.createElement("span");
  node.className = className;
  node.textContent = text;
  return node;
}
